"""sample.py end to end, in-process through `main(argv)`, on a tiny random HF checkpoint and a tokenizer trained here.

Oracles: HF transformers' greedy `generate` on the same checkpoint and prompt ids (token for token), and with a
PEFT-written adapter, HF + peft's; prompt ids composed independently from raw sentencepiece
(BOS + enc("[INST] p [/INST]"), or BOS + enc(p) with --no-chat); each completion's log-prob recomputed from one
HF forward (temperature 1, unfiltered); HF's logits warpers (temperature, top-k, top-p, min-p) as the support
every sampled token must lie in. Bad input: exit codes and one-line messages naming file:line.
"""
import json

import pytest
import sentencepiece
import torch
from conftest import TINY, randomize_weights_

import sample

TEXT = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran to the park with a red ball",
    "which pet is best? cats are calm, dogs are loyal, fish are quiet",
    "tell me a story about a doctor who lived by the sea",
]
PROMPT = "which pet is best?"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A sentencepiece tokenizer trained here and a randomized HF Mistral (window 6) saved beside it."""
    import transformers

    root = tmp_path_factory.mktemp("sample")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT * 20), model_prefix=str(root / "sp"), vocab_size=300, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        user_defined_symbols=["[INST]", "[/INST]"], minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(root / "sp.model"))
    config = transformers.MistralConfig(**(TINY | dict(vocab_size=sp.vocab_size(), sliding_window=6)),
                                        attn_implementation="eager")
    hf_model = randomize_weights_(transformers.MistralForCausalLM(config).float(), seed=1).eval()
    model_dir = root / "model"
    hf_model.save_pretrained(model_dir)
    (model_dir / "tokenizer.model").write_bytes((root / "sp.model").read_bytes())
    return {"dir": model_dir, "hf": hf_model, "sp": sp, "root": root}


def run_json(capsys, *argv):
    assert sample.main([*map(str, argv), "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def hf_greedy(model, prompt_ids, max_new_tokens):
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def hf_logprob(model, prompt_ids, completion):
    """sum_t log softmax(logits_t)[y_t] over the completion, from one HF forward over prompt + completion."""
    sequence = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logprobs = model(sequence).logits[0].float().log_softmax(-1)  # (T, V)
    positions = torch.arange(len(prompt_ids) - 1, sequence.shape[1] - 1)
    return logprobs[positions, sequence[0, len(prompt_ids):]].sum().item()


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "no_chat"])
def test_greedy_json_matches_hf_generate(world, capsys, chat):
    """--temperature 0 --json: prompt ids as composed from raw sentencepiece; every one of the 3 samples is HF's
    greedy continuation (window 6, so decoding runs past it); text, eos flag and logprob agree with HF."""
    sp, hf = world["sp"], world["hf"]
    expected_prompt = [1] + (sp.encode(f"[INST] {PROMPT} [/INST]") if chat else sp.encode(PROMPT))
    extra = [] if chat else ["--no-chat"]
    rows = run_json(capsys, "--model", world["dir"], "--prompt", PROMPT, "--temperature", 0, "-n", 3,
                    "--max-new-tokens", 20, *extra)
    expected = hf_greedy(hf, expected_prompt, 20)
    assert len(expected) >= 8  # the comparison covers decoding well past the window
    assert [r["index"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert row["prompt"] == PROMPT and row["prompt_index"] == 0
        assert row["prompt_ids"] == expected_prompt
        assert row["token_ids"] == expected
        assert row["eos"] == (expected[-1] == 2)
        assert row["text"] == sp.decode([t for t in expected if t != 2])
        assert row["logprob"] == pytest.approx(hf_logprob(hf, expected_prompt, expected), abs=1e-4)


def test_greedy_with_adapter_matches_peft(world, tmp_path, capsys):
    """--adapter with an adapter written by peft (random, nonzero B): greedy output equals HF + peft's greedy
    `generate`, and differs from the base model's (so the adapter is really applied)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    base = transformers.MistralForCausalLM.from_pretrained(world["dir"], attn_implementation="eager").float()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()

    prompt_ids = [1] + world["sp"].encode(f"[INST] {PROMPT} [/INST]")
    rows = run_json(capsys, "--model", world["dir"], "--adapter", tmp_path / "adapter", "--prompt", PROMPT,
                    "--temperature", 0, "--max-new-tokens", 16)
    expected = hf_greedy(peft_model, prompt_ids, 16)
    assert rows[0]["token_ids"] == expected
    assert expected != hf_greedy(world["hf"], prompt_ids, 16)
    assert rows[0]["logprob"] == pytest.approx(hf_logprob(peft_model, prompt_ids, expected), abs=1e-4)


def test_sampled_completions_follow_the_filters(world, capsys):
    """Sampling with temperature 1.5, top-k 40, top-p 0.95 and min-p 0.05: every sampled token lies in the
    support HF's warper chain leaves at its position; EOS only ever ends a completion; each logprob is the
    model's own (temperature 1, unfiltered); the same seed repeats the output and another seed changes it."""
    from transformers.generation import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                                         TopKLogitsWarper, TopPLogitsWarper)

    settings = ["--temperature", 1.5, "--top-k", 40, "--top-p", 0.95, "--min-p", 0.05, "-n", 6,
                "--max-new-tokens", 12, "--model", world["dir"], "--prompt", PROMPT]
    rows = run_json(capsys, *settings, "--seed", 3)
    chain = LogitsProcessorList([TemperatureLogitsWarper(1.5), TopKLogitsWarper(40), TopPLogitsWarper(0.95),
                                 MinPLogitsWarper(0.05)])
    hf = world["hf"]
    for row in rows:
        prompt_ids, tokens = row["prompt_ids"], row["token_ids"]
        assert 1 <= len(tokens) <= 12 and 2 not in tokens[:-1]
        assert row["eos"] == (tokens[-1] == 2)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1:-1]  # (len, V)
        allowed = torch.isfinite(chain(None, logits.clone()))  # (len, V)
        assert allowed[torch.arange(len(tokens)), torch.tensor(tokens)].all()
        assert not allowed.all()  # the filters do cut something, so the check above can fail
        assert row["logprob"] == pytest.approx(hf_logprob(hf, prompt_ids, tokens), abs=1e-4)
    assert len({tuple(r["token_ids"]) for r in rows}) > 1
    assert run_json(capsys, *settings, "--seed", 3) == rows
    assert run_json(capsys, *settings, "--seed", 4) != rows


def test_prompts_files_txt_and_jsonl(world, tmp_path, capsys):
    """A .txt file (one prompt per line, blank lines skipped) and the same prompts as JSONL give the same
    completions: N per prompt, in order, numbered by prompt_index and index."""
    prompts = ["which pet is best?", "tell me a story", "the cat sat"]
    txt = tmp_path / "prompts.txt"
    txt.write_text(prompts[0] + "\n\n" + "\n".join(prompts[1:]) + "\n", encoding="utf-8")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "other": 1}) + "\n" for p in prompts), encoding="utf-8")
    common = ["--model", world["dir"], "-n", 2, "--max-new-tokens", 5, "--seed", 1]
    from_txt = run_json(capsys, *common, "--prompts", txt)
    from_jsonl = run_json(capsys, *common, "--prompts", jsonl)
    assert from_txt == from_jsonl
    assert [(r["prompt"], r["prompt_index"], r["index"]) for r in from_txt] == [
        (p, i, j) for i, p in enumerate(prompts) for j in range(2)]


def test_readable_output(world, capsys):
    assert sample.main(["--model", str(world["dir"]), "--prompt", PROMPT, "-n", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert f"=== prompt 1: {PROMPT}" in out and "[0] " in out and "[1] " in out and "logprob" in out


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"prompt": \n', "{path}:2: not valid JSON"),
    ('{"prompt": "a"}\n\n{"text": "b"}\n', '{path}:3: missing field "prompt" (or "messages", chat messages)'),
    ('{"prompt": 5}\n', '{path}:1: field "prompt" must be a non-empty string'),
    ("\n\n", "{path}: no prompts"),
], ids=["bad_json", "missing_field", "not_a_string", "empty"])
def test_bad_prompts_file_exits_with_one_line(world, tmp_path, capsys, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content, encoding="utf-8")
    assert sample.main(["--model", str(world["dir"]), "--prompts", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("sample.py: error:") and message.format(path=path) in err and "\n" not in err


@pytest.mark.parametrize("extra, code, message", [
    (["-n", "0"], 2, "-n must be >= 1, got 0"),
    (["--temperature", "-1"], 2, "--temperature must be >= 0"),
    (["--top-p", "0"], 2, "--top-p must be in (0, 1]"),
    (["--min-p", "1.5"], 2, "--min-p must be in [0, 1]"),
    (["--top-k", "0"], 2, "--top-k must be >= 1"),
    (["--max-new-tokens", "0"], 2, "--max-new-tokens must be >= 1"),
    (["--threads", "-1"], 2, "--threads must be >= 0 (0: automatic)"),
    (["--model", "{tmp}/nowhere"], 1, "{tmp}/nowhere: no such model directory"),
    (["--adapter", "{tmp}"], 1, "adapter_config.json: no such file"),
    (["--prompts", "{tmp}/none.txt"], 1, "{tmp}/none.txt: no such file"),
])
def test_bad_options_exit_with_one_line(world, tmp_path, capsys, extra, code, message):
    argv = ["--model", str(world["dir"]), "--prompt", PROMPT] if "--prompts" not in extra else ["--model",
                                                                                                str(world["dir"])]
    argv += [e.format(tmp=tmp_path) for e in extra]  # later flags win
    assert sample.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert message.format(tmp=tmp_path) in err and "\n" not in err, err


def test_missing_default_model_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "DEFAULT_MODEL", tmp_path / "world" / "model")
    assert sample.main(["--prompt", PROMPT]) == 1
    err = capsys.readouterr().err.strip()
    assert "model: the embedded world's reference model is not built yet; pass --model DIR" in err
    assert "\n" not in err


def test_script_reports_bad_input_without_traceback(world, tmp_path, script):
    """As a process would run it (tests/conftest.py `script`; tests/test_bad_input.py starts real processes)."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("not json\n", encoding="utf-8")
    code, _, stderr = script("sample.py", ["--model", world["dir"], "--prompts", path])
    assert code == 1
    assert "Traceback" not in stderr and stderr.count("\n") == 1
    assert f"{path}:1: not valid JSON" in stderr
