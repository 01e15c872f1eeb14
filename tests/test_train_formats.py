"""train.py and sample.py on tiny random checkpoints that carry each real tokenizer and chat template.

Oracles: the chat format each checkpoint's files name (a real Mistral tokenizer.model from the mistral-common
wheel, alone or with a real chat template from tests/fixtures/chat_templates/), which train.py must print and
record; the invariant that a refused run leaves no run directory behind; and mistral-common / transformers'
own ids for what sample.py feeds the model (the formats themselves are checked token for token in
tests/test_models_chat_format.py). The weights are random (1 layer, hidden 16): only the plumbing is under test.
"""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

import sample
import train
from models import MistralConfig, build_model, save_pretrained

mistral_common = pytest.importorskip("mistral_common")
DATA = Path(mistral_common.__file__).parent / "data"
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
CHATML_TOKENS = {"32000": {"content": "<|im_end|>", "special": True}, "32001": {"content": "<|im_start|>", "special": True}}
# name -> (tokenizer model, template fixture or None, added tokens, the model's vocab_size, expected origin)
CHECKPOINTS = {
    "mistral-v1": ("tokenizer.model.v1", None, {}, 32000, "no chat_template; [INST] is not a control piece"),
    "mistral-v3": ("mistral_instruct_tokenizer_240323.model.v3", None, {}, 32768,
                   "no chat_template; [INST] is a control piece"),
    "zephyr": ("tokenizer.model.v1", "zephyr.jinja", {}, 32000, "chat_template in tokenizer_config.json"),
    "llama-2": ("tokenizer.model.v1", "llama-2.jinja", {}, 32000, "chat_template in tokenizer_config.json"),
    "chatml": ("tokenizer.model.v1", "chatml.jinja", CHATML_TOKENS, 32002, "chat_template in tokenizer_config.json"),
}


def make_checkpoint(directory: Path, tokenizer_model: str, template: str | None, added: dict, vocab_size: int) -> Path:
    config = MistralConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6,
                           rope_theta=1e6, sliding_window=None, tie_word_embeddings=False, max_position_embeddings=256)
    save_pretrained(build_model(config, seed=0), directory)
    shutil.copy(DATA / tokenizer_model, directory / "tokenizer.model")
    tokenizer_config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    if template:
        tokenizer_config["chat_template"] = (TEMPLATES / template).read_text(encoding="utf-8")
    if added:
        tokenizer_config["added_tokens_decoder"] = added
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Preference pairs as HH-RLHF distributes them: a gzipped JSON Lines file of transcripts."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl.gz"
    rows = [{"chosen": f"\n\nHuman: Which pet is best? {i}\n\nAssistant: Dogs are loyal.",
             "rejected": f"\n\nHuman: Which pet is best? {i}\n\nAssistant: Fish are quiet."} for i in range(8)]
    path.write_bytes(gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode()))
    return path


def run_args(model, data, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--steps", "1", "--batch-size", "2",
            "--lora-rank", "2", "--lora-alpha", "2", "--max-length", "48", "--max-prompt-length", "32", "--lr", "1e-3",
            "--warmup-steps", "1", "--threads", "1", "--no-progress", "--no-plot", *extra]


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_train_runs_on_each_real_tokenizer_and_prints_its_format(tmp_path, pairs, capsys, name):
    tokenizer_model, template, added, vocab_size, origin = CHECKPOINTS[name]
    model = make_checkpoint(tmp_path / "model", tokenizer_model, template, added, vocab_size)
    out = tmp_path / "run"
    assert train.main(run_args(model, pairs, out)) == 0
    printed = capsys.readouterr().out
    assert f"chat format: {name} ({origin}" in printed
    assert json.loads((out / "config.json").read_text())["chat_format"] is None  # none given: detected
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_chat_format_flag_overrides_and_unknown_names_stop(tmp_path, pairs, capsys):
    model = make_checkpoint(tmp_path / "model", *CHECKPOINTS["zephyr"][:4])
    assert train.main(run_args(model, pairs, tmp_path / "run", "--chat-format", "mistral-v1")) == 0
    assert "chat format: mistral-v1 (--chat-format)" in capsys.readouterr().out
    assert train.main(run_args(model, pairs, tmp_path / "run2", "--chat-format", "alpaca")) == 2  # a usage error
    error = capsys.readouterr().err.strip()
    assert error == ("train.py: error: --chat-format alpaca: unknown format (known: mistral-v1, mistral-v3, "
                     "mistral-v7, zephyr, llama-2, chatml, llama-3)")
    assert not (tmp_path / "run2").exists()


def test_vocabulary_mismatch_is_refused_before_the_run_directory_exists(tmp_path, pairs, capsys):
    """A v3 tokenizer.model (32768 pieces) beside a v0.1-sized model (32000 rows)."""
    model = make_checkpoint(tmp_path / "model", CHECKPOINTS["mistral-v3"][0], None, {}, 32000)
    out = tmp_path / "run"
    assert train.main(run_args(model, pairs, out)) == 1
    error = capsys.readouterr().err.strip()
    assert error == (f"train.py: error: {model / 'tokenizer.model'}: 32768 tokens, more than the vocab_size 32000 of "
                     f"the model in {model} (a tokenizer of another model?)")
    assert not out.exists()


def test_unrecognised_template_stops_at_start_up(tmp_path, pairs, capsys):
    model = make_checkpoint(tmp_path / "model", "tokenizer.model.v1", None, {}, 32000)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}), encoding="utf-8")
    out = tmp_path / "run"
    assert train.main(run_args(model, pairs, out)) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"train.py: error: {model / 'tokenizer_config.json'}: chat_template is none of the known "
                            f"formats (mistral-v1, mistral-v3, mistral-v7, zephyr, llama-2, chatml, llama-3)")
    assert not out.exists()


def test_data_split_reaches_the_reader(tmp_path, pairs, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(pairs, repo / "train.jsonl.gz")
    shutil.copy(pairs, repo / "test.jsonl.gz")
    model = make_checkpoint(tmp_path / "model", *CHECKPOINTS["mistral-v1"][:4])
    assert train.main(run_args(model, repo, tmp_path / "run", "--data-split", "test")) == 0
    assert f"{repo / 'test.jsonl.gz'}: read 8 pairs, kept 8" in capsys.readouterr().out
    assert train.main(run_args(model, repo, tmp_path / "run2")) == 1
    assert capsys.readouterr().err.strip() == (f"train.py: error: {repo}: has splits test, train: choose one with "
                                               f"--data-split")
    assert not (tmp_path / "run2").exists()


@pytest.mark.parametrize("name, end_of_turn", [("mistral-v3", 2), ("chatml", 32000)])
def test_sample_uses_the_checkpoint_format(tmp_path, capsys, monkeypatch, name, end_of_turn):
    """sample.py's prompt ids are the format's (for v3: mistral-common's [INST] control ids 3 and 4) and
    generation stops at the format's end of turn (ChatML's <|im_end|>, 32000 in OpenHermes), the eos_id it is given."""
    import models.generate
    from models.tokenizer import Tokenizer

    stop_ids = []
    real_generate = models.generate.generate

    def recording_generate(*args, **kwargs):
        stop_ids.append(kwargs["eos_id"])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(models.generate, "generate", recording_generate)
    model = make_checkpoint(tmp_path / "model", *CHECKPOINTS[name][:4])
    assert sample.main(["--model", str(model), "--prompt", "Hi there", "-n", "1", "--max-new-tokens", "3",
                        "--json"]) == 0
    captured = capsys.readouterr()
    completion = json.loads(captured.out.splitlines()[0])
    tokenizer = Tokenizer(model / "tokenizer.model")
    assert completion["prompt_ids"] == tokenizer.encode_prompt([{"role": "user", "content": "Hi there"}])
    if name == "mistral-v3":
        assert completion["prompt_ids"][:2] == [1, 3] and completion["prompt_ids"][-1] == 4
    assert f"chat format: {name}" in captured.err
    assert stop_ids == [end_of_turn]
    assert sample.main(["--model", str(model), "--prompt", "x", "--chat-format", "zephyr", "--max-new-tokens", "1"]) == 0
    assert "chat format: zephyr (--chat-format)" in capsys.readouterr().err
