"""A fuzzer over every file the project reads, and the malformed values issue 27 found, one test each.

The fuzzer mutates, one at a time, a field of config.json, model.safetensors.index.json, adapter_config.json,
tokenizer_config.json (and chat_template.jinja) and a data record, into the values a careless tool or a hostile
file holds (null, booleans, strings, lists, NaN and Infinity, integers of 400 and 5000 digits, lone surrogates,
nesting a hundred thousand deep), and cuts or garbles whole files. Seeded: the same cases on every run.

Oracle: the contract. Each case goes to the reader the scripts use (load_pretrained, load_adapter, Tokenizer,
load_preference_data); it must either succeed or raise that reader's own error type (CheckpointError,
AdapterError, DataError) with one line naming the file; any other exception is what a user would have seen as
a traceback. One case in eight also goes through train.main / sample.main in this process: exit 0, or exit 1/2
with one line and no traceback; on failure no run directory; and, always, no file the run read has changed.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from data.preferences import DataError
from models import CheckpointError, Tokenizer, add_lora, load_adapter, load_pretrained, save_adapter, save_pretrained
from data.tokenization import load_preference_data

pytestmark = pytest.mark.usefixtures("one_thread")

RAW = "\u0000raw:"  # a value written into the file as raw JSON text (what json.dumps would refuse or rewrite)
HOSTILE = [None, True, False, "", "x", "false", [], {}, [1, 2], {"a": 1}, -1, 0, 1, 3, 2**31, 2**63, 0.5, 1e308,
           1e-320, "\ud800", RAW + "NaN", RAW + "Infinity", RAW + "-Infinity", RAW + "1" + "0" * 400,
           RAW + "9" * 5000, RAW + "[" * 100_000 + "]" * 100_000]
WHOLE_FILE = [b"", b"[]", b"null", b"\xff\xfe{}", b"{" * 100_000, None]  # None: the real file cut in half


def dumps(value) -> str:
    """JSON text of `value`, with RAW strings anywhere in it replaced by their raw text."""
    raws = []

    def mark(v):
        if isinstance(v, str) and v.startswith(RAW):
            raws.append(v[len(RAW):])
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(v, dict):
            return {k: mark(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mark(x) for x in v]
        return v
    text = json.dumps(mark(value))
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@raw{i}@@"', raw)
    return text


def mutations(base: dict, keys: list[str], rng: random.Random, count: int) -> list[tuple[str, bytes | None]]:
    """`count` (name, new file bytes) cases: one key of `base` set to a hostile value, or the whole file
    replaced (None: cut in half, filled in by the caller)."""
    pairs = [(key, value) for key in keys for value in HOSTILE]
    cases = [(f"{key}={str(value)[:24]!r}", dumps(base | {key: value}).encode("utf-8", "surrogatepass"))
             for key, value in rng.sample(pairs, min(count, len(pairs)))]
    return cases + [(f"file={str(raw)[:12]!r}", raw) for raw in WHOLE_FILE]


def tree(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_naming(error: Exception, path: Path) -> None:
    message = str(error)
    assert "\n" not in message and str(path.parent) in message, message


@pytest.fixture(scope="module")
def inputs(tiny_run, tmp_path_factory):
    """Copies of the tiny model (without its manifest: a file edited by hand has none), a sharded copy, an
    adapter, a tokenizer_config.json and the data, under one root."""
    root = tmp_path_factory.mktemp("fuzz")
    model_dir = root / "model"
    shutil.copytree(tiny_run["model"], model_dir)
    (model_dir / "manifest.json").unlink()
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512, "added_tokens_decoder": {
        "1": {"content": "<s>", "special": True}}, "clean_up_tokenization_spaces": False}))
    model = load_pretrained(model_dir)
    save_pretrained(model, root / "sharded", max_shard_bytes=20_000, tokenizer_path=model_dir / "tokenizer.model")
    (root / "sharded" / "manifest.json").unlink()
    add_lora(model, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    save_adapter(model, root / "adapter")
    (root / "adapter" / "manifest.json").unlink()
    shutil.copy(tiny_run["data"], root / "prefs.jsonl")
    return root


def fuzz_cases(root: Path):
    """(file, name, new bytes, reader) for every case; reader(path) -> None, raising the reader's own error."""
    rng = random.Random(27)
    model_dir, sharded, adapter = root / "model", root / "sharded", root / "adapter"
    tokenizer_path = model_dir / "tokenizer.model"
    cases = []

    config = json.loads((model_dir / "config.json").read_text())
    keys = sorted(config) + ["rope_parameters", "rope_scaling", "attention_bias", "head_dim", "num_key_value_heads"]
    for name, raw in mutations(config, keys, rng, 110):
        cases.append((model_dir / "config.json", name, raw, lambda p: load_pretrained(p.parent)))

    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    tensor_names = sorted(weight_map)
    for name, raw in mutations(index, ["weight_map", "metadata"], rng, 20):
        cases.append((sharded / "model.safetensors.index.json", name, raw, lambda p: load_pretrained(p.parent)))
    for value in ["../model/model.safetensors", "/etc/passwd", "", ".", None, 3, *sorted(set(weight_map.values()))]:
        tensor = rng.choice(tensor_names)
        raw = dumps(index | {"weight_map": weight_map | {tensor: value}}).encode()
        cases.append((sharded / "model.safetensors.index.json", f"weight_map[{tensor}]={value!r}", raw,
                      lambda p: load_pretrained(p.parent)))

    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    for name, raw in mutations(adapter_config, sorted(adapter_config), rng, 90):
        cases.append((adapter / "adapter_config.json", name, raw,
                      lambda p: load_adapter(load_pretrained(model_dir), p.parent)))

    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    for name, raw in mutations(tokenizer_config, ["chat_template", "added_tokens_decoder", "model_max_length"],
                               rng, 40):
        cases.append((model_dir / "tokenizer_config.json", name, raw, lambda p: Tokenizer(tokenizer_path)))
    for raw in [b"\xff\xfe{% for m in messages %}", b"", "{{ '[INST]' }}\ud800".encode("utf-8", "surrogatepass")]:
        cases.append((model_dir / "chat_template.jinja", f"jinja={raw[:12]!r}", raw,
                      lambda p: Tokenizer(tokenizer_path)))

    records = [json.loads(line) for line in (root / "prefs.jsonl").read_text().splitlines()]
    tokenizer = Tokenizer(tokenizer_path)
    keys = ["prompt", "chosen", "rejected", "chosen_prob"]
    pairs = [(key, value) for key in keys for value in HOSTILE]
    for key, value in rng.sample(pairs, 70):
        line = rng.randrange(len(records))
        rows = [dumps(r) for r in records]
        rows[line] = dumps(records[line] | {key: value})
        raw = ("\n".join(rows) + "\n").encode("utf-8", "surrogatepass")
        cases.append((root / "prefs.jsonl", f"line {line + 1} {key}={str(value)[:24]!r}", raw,
                      lambda p: load_preference_data(p, tokenizer, 40, 24, vocab_size=300)))
    for name, raw in [("file=''", b""), ("file=utf16", "\ufeff{}".encode("utf-16")), ("file=cut", None)]:
        cases.append((root / "prefs.jsonl", name, raw, lambda p: load_preference_data(p, tokenizer, 40, 24)))
    return cases


EXPECTED = {"config.json": CheckpointError, "model.safetensors.index.json": CheckpointError,
            "adapter_config.json": CheckpointError, "tokenizer_config.json": CheckpointError,
            "chat_template.jinja": CheckpointError, "prefs.jsonl": DataError}


def test_fuzz_every_file_the_project_reads(inputs, script, tmp_path):
    """A few hundred mutated files: each read raises only its reader's error, in one line naming the file (or
    reads); one in eight also runs through the script; no input file is ever changed by a read or a run."""
    cases = fuzz_cases(inputs)
    assert len(cases) >= 300
    outcomes = {"read": 0, "refused": 0, "scripts": 0}
    for number, (path, name, raw, reader) in enumerate(cases):
        original = path.read_bytes() if path.exists() else None
        if raw is None:
            raw = original[:len(original) // 2]
        path.write_bytes(raw)
        before = tree(inputs)
        try:
            try:
                reader(path)
                outcomes["read"] += 1
            except EXPECTED[path.name] as error:
                one_line_naming(error, path)
                outcomes["refused"] += 1
            except Exception as error:  # a traceback for the user
                pytest.fail(f"{path.name} {name}: {type(error).__name__}: {str(error)[:300]}")
            if number % 8 == 0:
                run_script(path, inputs, script, tmp_path / f"run{number}", name)
                outcomes["scripts"] += 1
            assert tree(inputs) == before, f"{path.name} {name}: an input file changed"
        finally:
            path.write_bytes(original) if original is not None else path.unlink()
    assert outcomes["refused"] > 150 and outcomes["read"] > 10 and outcomes["scripts"] >= 35, outcomes


def run_script(path: Path, root: Path, script, out: Path, name: str) -> None:
    """The case through train.main (data, model, index, tokenizer) or sample.main (adapter): exit 0, or exit 1/2
    with one line and no traceback and no run directory."""
    model = root / ("sharded" if path.parent.name == "sharded" else "model")
    if path.parent.name == "adapter":
        code, _, err = script("sample.py", ["--model", model, "--adapter", path.parent, "--prompt", "hi", "-n", "1",
                                            "--max-new-tokens", "2", "--device", "cpu"])
    else:
        code, _, err = script("train.py", ["--model", model, "--data", root / "prefs.jsonl", "--out", out,
                                           "--steps", "1", "--batch-size", "4", "--lora-rank", "2", "--max-length",
                                           "40", "--max-prompt-length", "24", "--no-progress", "--no-plot",
                                           "--threads", "1"])
    if code == 0:
        return
    err = err.strip()
    assert code in (1, 2) and len(err.splitlines()) == 1 and "Traceback" not in err, f"{name}: {err[-2000:]}"
    assert not out.exists(), name


# ---------------------------------------------------------------------------------------------- named cases

def test_sliding_window_true_is_refused_not_read_as_one(inputs, tmp_path):
    """JSON true is Python's int 1: it used to build a one-token attention window."""
    model_dir = tmp_path / "model"
    shutil.copytree(inputs / "model", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    for value in (True, False, "4096", 0, 2.5):
        (model_dir / "config.json").write_text(json.dumps(config | {"sliding_window": value}))
        with pytest.raises(CheckpointError, match=r"config\.json: sliding_window must be null or a positive integer"):
            load_pretrained(model_dir)


def test_a_tensor_in_two_shards_is_refused(inputs, tmp_path):
    """Both shards hold embed_tokens (the second a different tensor); the index names the first: refused, where
    the later shard used to win silently against the index."""
    from safetensors.torch import load_file, save_file
    sharded = tmp_path / "sharded"
    shutil.copytree(inputs / "sharded", sharded)
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.embed_tokens.weight"
    home = weight_map[name]
    other = next(f for f in sorted(set(weight_map.values())) if f != home)
    tensors = load_file(str(sharded / other))
    save_file(tensors | {name: torch.zeros_like(load_file(str(sharded / home))[name])}, str(sharded / other))
    with pytest.raises(CheckpointError, match=rf"{name} is in {other}, but the index puts it in {home}"):
        load_pretrained(sharded)


@pytest.mark.parametrize("change, words", [
    ({"rope_theta": -1.0, "rope_parameters": {"rope_theta": -1.0, "rope_type": "default"}}, "rope_theta must be in (0"),
    ({"rms_norm_eps": "1e-6"}, "rms_norm_eps must be a number"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"hidden_size": 10**400}, "hidden_size must be an integer in [1, 16777216], got an integer of 1329 bits"),
])
def test_config_values_are_refused_in_one_line_by_train(inputs, tmp_path, script, change, words):
    model_dir = tmp_path / "model"
    shutil.copytree(inputs / "model", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | change))
    code, _, err = script("train.py", ["--model", model_dir, "--data", inputs / "prefs.jsonl", "--out",
                                       tmp_path / "run", "--steps", "1", "--threads", "1"])
    assert code == 1 and len(err.strip().splitlines()) == 1 and words in err, err
    assert str(model_dir / "config.json") in err and not (tmp_path / "run").exists()


def test_nan_weights_stop_before_the_run_directory(inputs, tmp_path, script):
    """A NaN in one tensor: named (file, tensor) while loading, before anything is written; sample.py too."""
    from safetensors.torch import load_file, save_file
    model_dir = tmp_path / "model"
    shutil.copytree(inputs / "model", model_dir)
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(model_dir / "model.safetensors"))
    code, _, err = script("train.py", ["--model", model_dir, "--data", inputs / "prefs.jsonl", "--out",
                                       tmp_path / "run", "--steps", "1", "--threads", "1"])
    assert code == 1 and "model.norm.weight holds NaN or infinite values" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
    code, out, err = script("sample.py", ["--model", model_dir, "--prompt", "hi", "--temperature", "0", "--json"])
    assert code == 1 and "model.norm.weight holds NaN" in err and out == "", err


@pytest.mark.parametrize("name, argv, code, words", [
    ("train.py", ["--seed", "-1"], 2, "--seed must be in [0, 2^63)"),
    ("train.py", ["--seed", str(2**64)], 2, "--seed must be in [0, 2^63)"),
    ("sample.py", ["--seed", "-1"], 2, "--seed must be in [0, 2^63)"),
    ("sample.py", ["--seed", str(2**63)], 2, "--seed must be in [0, 2^63)"),
    ("train.py", ["--threads", "1000000"], 2, "--threads must be at most"),
    ("sample.py", ["--threads", "1000000"], 2, "--threads must be at most"),
    ("train.py", ["--lora-rank", "1000000"], 2,
     "--lora-rank 1000000 exceeds min(in, out) = 16 of layers.0.self_attn.k_proj"),
    ("train.py", ["--max-length", "100000"], 2, "--max-length 100000: longer than the max_position_embeddings 512"),
    ("sample.py", ["-n", str(10**12)], 2, "-n 1000000000000 samples"),
])
def test_absurd_sizes_and_numbers_are_refused_before_work(inputs, tmp_path, script, name, argv, code, words):
    """Limits relative to the model (LoRA rank <= min(in, out): the tiny model's k/v projections map 32 -> 16,
    head_dim 8 x 2 kv heads, the smallest of the default targets; positions) and the machine (threads, memory),
    refused in one line."""
    common = (["--model", inputs / "model", "--data", inputs / "prefs.jsonl", "--out", tmp_path / "run",
               "--steps", "1", "--max-prompt-length", "24", "--max-length", "40", "--lora-rank", "2"]
              if name == "train.py" else ["--model", inputs / "model", "--prompt", "hi", "--max-new-tokens", "2"])
    result, _, err = script(name, common + argv)
    assert result == code and len(err.strip().splitlines()) == 1 and words in err, err
    assert not (tmp_path / "run").exists()


def test_tiny_temperature_is_greedy_and_json_never_holds_nan(inputs, script, monkeypatch):
    """--temperature 1e-40 used to divide the logits into NaN: below 1e-5 sampling is greedy, so it draws what
    --temperature 0 draws. A non-finite log-prob is written as null (JSON has no NaN)."""
    common = ["--model", inputs / "model", "--prompt", "which pet is best?", "-n", "2", "--max-new-tokens", "6",
              "--json"]
    _, greedy, _ = script("sample.py", common + ["--temperature", "0"])
    code, tiny, err = script("sample.py", common + ["--temperature", "1e-40"])
    assert code == 0 and tiny == greedy, err
    import sample
    real = sample.sample_completions

    def nan_logprobs(*args, **kwargs):
        return [c.__class__(**(c.__dict__ | {"logprob": float("nan")})) for c in real(*args, **kwargs)]
    monkeypatch.setattr(sample, "sample_completions", nan_logprobs)
    code, out, err = script("sample.py", common + ["--temperature", "0"])
    assert code == 0, err
    assert [json.loads(line)["logprob"] for line in out.splitlines()] == [None, None]


def test_decompressed_data_is_capped(inputs, tmp_path, script, monkeypatch):
    """A .jsonl.gz that expands past the cap (lowered here to 10 kB through SPL_MAX_DECOMPRESSED_BYTES; 1 GiB by
    default) is refused in one line before it is held in memory; under the cap it reads."""
    import gzip
    data = tmp_path / "big.jsonl.gz"
    data.write_bytes(gzip.compress((inputs / "prefs.jsonl").read_bytes() * 20))
    monkeypatch.setenv("SPL_MAX_DECOMPRESSED_BYTES", "10000")
    argv = ["--model", inputs / "model", "--data", data, "--out", tmp_path / "run", "--steps", "1", "--threads", "1"]
    code, _, err = script("train.py", argv)
    assert code == 1 and f"{data}: decompresses to more than 10000 bytes" in err and len(err.splitlines()) == 1, err
    monkeypatch.setenv("SPL_MAX_DECOMPRESSED_BYTES", str(10**6))
    from data.preferences import read_preferences
    assert len(read_preferences(data)[0]) == 24 * 20


def test_lone_surrogates_and_long_integers_in_records_are_one_line(inputs, tmp_path):
    tokenizer = Tokenizer(inputs / "model" / "tokenizer.model")
    for raw, words in [('{"prompt": "a\\ud800", "chosen": "b", "rejected": "c"}', "lone surrogate"),
                       ('{"prompt": "a", "chosen": "b", "rejected": "c", "chosen_prob": 1' + "0" * 400 + "}",
                        "chosen_prob"),
                       ('{"prompt": "a", "chosen": "b", "rejected": "c", "chosen_prob": ' + "9" * 5000 + "}",
                        "malformed JSON")]:
        data = tmp_path / "d.jsonl"
        data.write_text(raw + "\n")
        with pytest.raises(DataError, match=rf"^{str(data)}:1: .*{words}"):
            load_preference_data(data, tokenizer, 40, 24)


def test_a_prompt_with_a_lone_surrogate_is_one_line(inputs, tmp_path, script):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n{"prompt": "a\\ud800b"}\n')
    code, out, err = script("sample.py", ["--model", inputs / "model", "--prompts", prompts])
    assert code == 1 and err.strip() == f'sample.py: error: {prompts}:2: field "prompt" holds a lone surrogate ' \
                                        f'(\\ud800 at character 1), not text' and out == "", err
