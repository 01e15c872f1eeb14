"""Held-out evaluation: --eval-data / --eval-split / --eval-fraction, every --eval-every steps and at the end.

Oracles: TRL's DPOTrainer.evaluate() on the same held-out pairs with the adapter train.py wrote, loaded into HF
transformers + peft (a reference library, used only here): DPO (alpha = beta) eval loss, reward accuracy, margins,
rewards and log-probs equal within 1e-4, after the token ids of every pair are checked equal (TRL tokenises prompt +
response as one string, spl each segment on its own: with ASCII words and sentencepiece's whitespace split they
coincide). The cut by prompt is checked by invariants: no prompt on both sides, every pair on exactly one, the same
cut for the same seed; refusals by their one line.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

import train
from data.heldout import split_by_prompt
from data.tokenization import PreferenceExample
from models import MistralConfig, build_model, save_pretrained

WORDS = "the cat sat on a mat and looked at dog which ran to park with red ball sun is warm sky blue".split()


def sentence(rng, n):
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), n))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random Mistral (1 layer, hidden 16) with Mistral's real v1 tokenizer (mistral-common's wheel), and
    pairs of plain ASCII words: 8 to train on, 4 held out, each with its own prompt."""
    mistral_common = pytest.importorskip("mistral_common")
    import numpy as np

    root = tmp_path_factory.mktemp("eval")
    config = MistralConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6,
                           rope_theta=1e4, sliding_window=None, tie_word_embeddings=False, max_position_embeddings=128)
    model = root / "model"
    save_pretrained(build_model(config, seed=0), model,
                    tokenizer_path=Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1")
    (model / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                             "add_bos_token": True}), encoding="utf-8")
    rng = np.random.default_rng(0)
    rows = [{"prompt": f"question {i}: {sentence(rng, 5)}", "chosen": sentence(rng, 4), "rejected": sentence(rng, 6)}
            for i in range(12)]
    for name, part in (("train.jsonl", rows[:8]), ("test.jsonl", rows[8:])):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    return {"model": model, "train": root / "train.jsonl", "test": root / "test.jsonl", "rows": rows, "root": root}


def run_args(checkpoint, out, *extra):
    return ["--model", str(checkpoint["model"]), "--data", str(checkpoint["train"]), "--out", str(out), "--steps", "2",
            "--batch-size", "4", "--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--lr", "2e-2",
            "--warmup-steps", "0", "--max-length", "64", "--max-prompt-length", "48", "--threads", "1",
            "--no-progress", "--no-plot", "--no-compile", *extra]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


EVAL_KEYS = ("eval_loss", "eval_reward_accuracy", "eval_margin", "eval_reward_chosen", "eval_reward_rejected",
             "eval_logps_chosen", "eval_logps_rejected")


def trl_evaluate(checkpoint, adapter, rows, beta):
    """TRL's DPOTrainer.evaluate() of base + `adapter` (reference: the base model) on
    `rows`, in one batch, float32; and the token ids TRL built."""
    import datasets
    import peft
    import torch
    import transformers
    trl = pytest.importorskip("trl")
    tokenizer = transformers.LlamaTokenizer.from_pretrained(checkpoint["model"], add_bos_token=True,
                                                            add_eos_token=False)
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint["model"], dtype=torch.float32,
                                                             attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base, adapter, is_trainable=True)
    # The base model as the reference, passed explicitly: given a PeftModel alone, TRL takes a frozen copy of its
    # adapter as the reference (an SFT adapter's reading), not the base model that train.py's reference is.
    reference = transformers.AutoModelForCausalLM.from_pretrained(checkpoint["model"], dtype=torch.float32,
                                                                  attn_implementation="eager")
    # The v1 chat format as plain text: BOS + "[INST] prompt [/INST]" + " reply" + "</s>" (TRL adds BOS and EOS)
    dataset = datasets.Dataset.from_list([{"prompt": f"[INST] {r['prompt']} [/INST]", "chosen": " " + r["chosen"],
                                           "rejected": " " + r["rejected"]} for r in rows])
    config = trl.DPOConfig(output_dir=str(checkpoint["root"] / "trl"), beta=beta, loss_type=["sigmoid"],
                           per_device_eval_batch_size=len(rows), max_length=64, use_cpu=True, report_to="none",
                           disable_tqdm=True, bf16=False, seed=0)
    trainer = trl.DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset, eval_dataset=dataset,
                             processing_class=tokenizer)
    results = trainer.evaluate()
    evaluated = trainer.eval_dataset
    ids = [(p, c, r) for p, c, r in zip(evaluated["prompt_ids"], evaluated["chosen_ids"], evaluated["rejected_ids"])]
    return results, ids


def test_dpo_eval_metrics_equal_trl_evaluate_with_the_trained_adapter(checkpoint, tmp_path, capsys):
    """train.py --loss dpo --eval-data: the eval lines of steps 1 and 2 (the end), and the end's figures equal TRL's
    DPOTrainer.evaluate() with the adapter train.py saved."""
    from data.tokenization import load_preference_data
    from models import Tokenizer

    out = tmp_path / "run"
    beta = 0.1
    assert train.main(run_args(checkpoint, out, "--loss", "dpo", "--beta", str(beta), "--eval-data",
                               str(checkpoint["test"]), "--eval-every", "1", "--lr", "0.1")) == 0
    printed = capsys.readouterr().out
    assert "eval at step 1: loss " in printed and "eval at step 2: loss " in printed
    evals = [r for r in metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [1, 2] and all(set(EVAL_KEYS) <= set(r) for r in evals)
    assert evals[0]["eval_loss"] != evals[1]["eval_loss"]  # the policy moved between the two
    ours = evals[-1]

    results, trl_ids = trl_evaluate(checkpoint, out / "adapter", checkpoint["rows"][8:], beta)
    tokenizer = Tokenizer(checkpoint["model"] / "tokenizer.model")
    examples, _ = load_preference_data(checkpoint["test"], tokenizer, 64, 48)
    assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in examples] == trl_ids  # the same tokens
    pairs = {"eval_loss": "eval_loss", "eval_reward_accuracy": "eval_rewards/accuracies",
             "eval_margin": "eval_rewards/margins", "eval_reward_chosen": "eval_rewards/chosen",
             "eval_reward_rejected": "eval_rewards/rejected", "eval_logps_chosen": "eval_logps/chosen",
             "eval_logps_rejected": "eval_logps/rejected"}
    for name, theirs in pairs.items():
        assert math.isclose(ours[name], results[theirs], rel_tol=0, abs_tol=1e-4), (name, ours[name], results[theirs])
    # trained: the adapter moved the rewards well away from 0 (at B = 0 they are 0)
    assert min(abs(ours["eval_reward_chosen"]), abs(ours["eval_reward_rejected"])) > 1e-2, ours


def test_eval_split_of_the_data_directory_and_its_own_reference_cache(checkpoint, tmp_path, capsys):
    """--eval-split test of a dataset directory: the eval pairs are the test split's; their reference log-probs
    get their own cache (two caches); a second run loads both."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(checkpoint["train"], repo / "train.jsonl")
    shutil.copy(checkpoint["test"], repo / "test.jsonl")
    out = tmp_path / "run"
    extra = ("--data", str(repo), "--data-split", "train", "--eval-split", "test")
    assert train.main(run_args(checkpoint, out, *extra)) == 0
    printed = capsys.readouterr().out
    assert f"eval set: {repo / 'test.jsonl'}: read 4 pairs, kept 4" in printed
    assert [r["step"] for r in metrics(out) if "eval_loss" in r] == [2]  # --eval-every 0: at the end only
    assert len(list((out / "cache").glob("ref_logps-*"))) == 2
    assert train.main(run_args(checkpoint, out, *extra, "--overwrite")) == 0
    assert "eval set" in capsys.readouterr().out


def example(index, prompt):
    return PreferenceExample([1, prompt], [5, 2], [6, 2], index=index)


def test_split_by_prompt_keeps_every_prompt_on_one_side():
    """30 pairs over 10 prompts (3 each): a quarter of the prompts is round(2.5) = 2 prompts, 6 pairs; no prompt on
    both sides; every pair exactly once; renumbered from 0; the same seed, the same cut; another seed, another."""
    examples = [example(i, 100 + i % 10) for i in range(30)]
    train_part, held = split_by_prompt(examples, 0.25, seed=0)
    assert len(held) == 6 and len(train_part) == 24
    assert {e.prompt_ids[1] for e in held}.isdisjoint({e.prompt_ids[1] for e in train_part})
    assert sorted(e.chosen_ids + e.prompt_ids for e in held + train_part) == sorted(
        e.chosen_ids + e.prompt_ids for e in examples)
    assert [e.index for e in held] == list(range(6)) and [e.index for e in train_part] == list(range(24))
    assert split_by_prompt(examples, 0.25, seed=0) == (train_part, held)
    cuts = {tuple(sorted({e.prompt_ids[1] for e in split_by_prompt(examples, 0.25, seed)[1]})) for seed in range(8)}
    assert len(cuts) > 1
    with pytest.raises(ValueError, match="1 distinct prompt"):
        split_by_prompt([example(i, 7) for i in range(4)], 0.5, seed=0)


def test_eval_fraction_trains_on_the_rest(checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(run_args(checkpoint, out, "--eval-fraction", "0.25")) == 0
    printed = capsys.readouterr().out
    assert "eval set: 2 pairs of 2 prompts held out of the training data (--eval-fraction 0.25 of its prompts, " \
           "seed 0); 6 pairs left to train on" in printed
    assert "6 examples, 2 steps" in printed
    assert [r["step"] for r in metrics(out) if "eval_loss" in r] == [2]


@pytest.mark.parametrize("extra, said", [
    (("--eval-every", "2"), "--eval-every 2: nothing to evaluate; give --eval-data FILE, --eval-split NAME or "
                            "--eval-fraction F"),
    (("--eval-fraction", "0.2", "--eval-split", "test"), "give --eval-data / --eval-split (a held-out file or split) "
                                                         "or --eval-fraction"),
    (("--eval-fraction", "1.5"), "--eval-fraction must be in [0, 1), got 1.5"),
    (("--eval-fraction", "0.2", "--loss", "sft"), "--loss sft has none to evaluate"),
])
def test_eval_options_refused_in_one_line(checkpoint, tmp_path, capsys, extra, said):
    out = tmp_path / "run"
    assert train.main(run_args(checkpoint, out, *extra)) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("train.py: error: ") and said in error and "\n" not in error
    assert not out.exists()
