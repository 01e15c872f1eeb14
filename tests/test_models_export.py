"""Exports keep the chat format: a full fine-tune's OUT/model and a merged adapter (python -m models.export) carry
their base's tokenizer.json, tokenizer_config.json and chat template, so sample.py and HF transformers see the same
format and stop token as on the base.

A tiny ChatML checkpoint whose only tokenizer is a tokenizer.json written by transformers 5 (SmolLM2's template,
which adds a default system message). Oracles: the merged model's logits against the unmerged model with its
adapter (the invariant merged = unmerged) and against HF transformers loading the merged directory; HF's
apply_chat_template on the exported directory against the base's, and our tokenizer's prompt ids against both;
the file system for the refusals (nothing replaced that this project did not write).
"""
from __future__ import annotations

import json

import pytest
import torch

import sample
import train
from models import load_adapter, load_pretrained
from models.export import main as export_main
from models.tokenizer import load_tokenizer

pytest.importorskip("tokenizers")
from test_train_bpe import hf_checkpoint, hf_tokenizer_dir  # noqa: E402,F401  (fixtures shared with the BPE tests)
from test_train_formats import pairs, run_args  # noqa: E402,F401

CONVERSATION = [{"role": "user", "content": "Which pet is best, 42 or 7?"}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, hf_tokenizer_dir, pairs):
    """(base, LoRA run, full fine-tune run) on the ChatML checkpoint, one step each."""
    tmp = tmp_path_factory.mktemp("export")
    tokenizer_dir, hf_tokenizer = hf_tokenizer_dir
    base = hf_checkpoint(tmp / "base", tokenizer_dir, len(hf_tokenizer))
    assert train.main(run_args(base, pairs, tmp / "lora", "--lora-targets", "q_proj,v_proj,lm_head",
                               "--lora-dropout", "0")) == 0
    assert train.main(run_args(base, pairs, tmp / "full", "--lora-rank", "0")) == 0
    return base, tmp / "lora", tmp / "full"


def _hf_ids(directory):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def _sample_line(model, capsys) -> tuple[str, list[int]]:
    """sample.py's start-up line naming the tokenizer and chat format, and a greedy completion's token ids."""
    assert sample.main(["--model", str(model), "--prompt", CONVERSATION[0]["content"], "--max-new-tokens", "6",
                        "--temperature", "0", "--threads", "1", "--json"]) == 0
    captured = capsys.readouterr()
    line = next(line for line in (captured.out + captured.err).splitlines() if line.startswith("tokenizer: "))
    return line, json.loads(captured.out.splitlines()[0])["token_ids"]


def _same_chat_format(base, exported, capsys=None):
    if capsys is not None:  # sample.py prints the same format for both, and stops where the format's turn ends
        (base_line, _), (line, tokens) = _sample_line(base, capsys), _sample_line(exported, capsys)
        assert line == base_line and "chat format: chatml" in line
        end = load_tokenizer(exported)[0].end_of_turn_id
        assert end not in tokens[:-1] and len(tokens) <= 6
    ours_base, _ = load_tokenizer(base)
    ours, path = load_tokenizer(exported)
    assert path.name == "tokenizer.json" and (exported / "chat_template.jinja").is_file()
    assert (ours.chat_format, ours.format_origin) == (ours_base.chat_format, ours_base.format_origin)
    assert ours.end_of_turn_id == ours_base.end_of_turn_id == ours.special_id("<|im_end|>")
    assert _hf_ids(exported) == _hf_ids(base) == ours.encode_prompt(CONVERSATION)


def test_full_fine_tune_keeps_the_chat_format(trained, capsys):
    base, _, full = trained
    _same_chat_format(base, full / "model", capsys)


def test_merged_adapter_keeps_the_chat_format_and_computes_the_adapted_model(trained, tmp_path, capsys):
    import transformers

    base, lora, _ = trained
    out = tmp_path / "merged"
    assert export_main(["--adapter", str(lora / "adapter"), "--out", str(out)]) == 0  # base from adapter_config
    assert "merged model:" in capsys.readouterr().out
    _same_chat_format(base, out, capsys)
    tokens = torch.tensor([load_tokenizer(base)[0].encode_prompt(CONVERSATION)])
    adapted = load_adapter(load_pretrained(base), lora / "adapter").eval()
    merged = load_pretrained(out).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = adapted(tokens)
        assert torch.allclose(merged(tokens), expected, atol=1e-5, rtol=0)
        assert torch.allclose(hf(tokens).logits, expected, atol=1e-4, rtol=0)


def test_export_refuses_to_replace_what_it_did_not_write(trained, tmp_path, capsys):
    base, lora, _ = trained
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        assert export_main(["--adapter", str(lora / "adapter"), "--out", str(out), *extra]) == 1
        line = capsys.readouterr().err.strip()
        assert line.startswith("models.export: error:") and str(out) in line and "\n" not in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    merged = tmp_path / "merged"
    assert export_main(["--adapter", str(lora / "adapter"), "--model", str(base), "--out", str(merged)]) == 0
    assert export_main(["--adapter", str(lora / "adapter"), "--model", str(base), "--out", str(merged),
                        "--overwrite"]) == 0  # its own model directory: replaced
