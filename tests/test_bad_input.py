"""Bad input, end to end: train.py and sample.py as a user runs them, one case per kind: each case through the
script's main(argv) in this process (the exit code it returns, what it prints), and a few as real processes.

Every case must end the same way: a non-zero exit, one line on stderr that starts with the script's name,
names what was wrong (the option, the field, the file; `path:line` where a line applies), no traceback, and
nothing written (for train.py: no run directory; for sample.py: no file anywhere). The cases are what a user
does by mistake (mistypes, truncates, mixes up files) and what a file made to break a reader does (a header
that claims exabytes, JSON nested a million deep, a manifest pointing outside its directory).

Oracle: the contract itself, checked on the exit status, stderr and the file system; each case names the words
its line must contain, so a message that says nothing useful fails. The real processes also check that main(argv)
in-process returns and prints exactly what the process does.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    id: str
    script: str  # "train.py" or "sample.py"
    argv: Callable  # (inputs: dict, tmp: Path) -> list[str], after the base arguments (later flags win)
    expect: Callable | str  # substring(s) the one line must contain; callable(inputs, tmp) -> list[str]


def _jsonl(tmp, name, rows, raw=None):
    path = tmp / name
    path.write_bytes(raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows).encode())
    return str(path)


def _folder(path):
    path.mkdir()
    return str(path)


def _pairs(n=8, **change):
    return [{"prompt": f"which pet is best? {i}", "chosen": "dogs are loyal", "rejected": "fish are quiet",
             "chosen_prob": 0.75, **change} for i in range(n)]


def _model_copy(inputs, tmp, edit):
    """A copy of the tiny model directory with `edit(path)` applied to it."""
    path = tmp / "model"
    shutil.copytree(inputs["model"], path)
    edit(path)
    return str(path)


def _replace(name, data):
    def edit(path):
        (path / name).write_bytes(data)
    return edit


def _truncate(name, keep=0.5):
    def edit(path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[:int(len(data) * keep)])
    return edit


def _remove(name):
    def edit(path):
        (path / name).unlink()
    return edit


def _edit_config(**change):
    def edit(path):
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(config | change))
        (path / "manifest.json").unlink()  # edited by hand, as a user would: no manifest to disagree with
    return edit


def _adapter_copy(inputs, tmp, edit):
    path = tmp / "adapter"
    shutil.copytree(inputs["adapter"], path)
    edit(path)
    return str(path)


HUGE_HEADER = struct.pack("<Q", 1 << 62) + b"{}"  # a safetensors header that claims 4 EiB
NESTED = b"[" * 1_000_000 + b"]" * 1_000_000  # deep enough to break a recursive parser

TRAIN_CASES = [
    # ---- data: every field of every layout, and the file itself
    Case("data-missing-rejected", "train.py", lambda i, t: ["--data", _jsonl(t, "d.jsonl", [{"prompt": "a", "chosen": "b"}])],
         lambda i, t: [f"{t / 'd.jsonl'}:1:", '"rejected"']),
    Case("data-missing-chosen", "train.py", lambda i, t: ["--data", _jsonl(t, "d.jsonl", _pairs(2) + [{"prompt": "a", "rejected": "b"}])],
         lambda i, t: [f"{t / 'd.jsonl'}:3:", '"chosen"']),
    Case("data-chosen-not-text", "train.py", lambda i, t: ["--data", _jsonl(t, "d.jsonl", _pairs(1, chosen=5))],
         lambda i, t: [f"{t / 'd.jsonl'}:1:", "chosen"]),
    Case("data-prompt-not-text", "train.py", lambda i, t: ["--data", _jsonl(t, "d.jsonl", _pairs(1, prompt={"a": 1}))],
         lambda i, t: [f"{t / 'd.jsonl'}:1:", "prompt"]),
    Case("data-chosen-prob-above-one", "train.py", lambda i, t: ["--data", _jsonl(t, "d.jsonl", _pairs(2, chosen_prob=1.5))],
         lambda i, t: [f"{t / 'd.jsonl'}:1:", "chosen_prob"]),
    Case("data-chosen-prob-text", "train.py", lambda i, t: ["--data", _jsonl(t, "d.jsonl", _pairs(2, chosen_prob="high"))],
         lambda i, t: [f"{t / 'd.jsonl'}:1:", "chosen_prob"]),
    Case("data-chosen-prob-nan", "train.py", lambda i, t: ["--data", _jsonl(t, "d.jsonl", [], raw=b'{"prompt": "a", "chosen": "b", "rejected": "c", "chosen_prob": NaN}\n')],
         lambda i, t: [f"{t / 'd.jsonl'}:1:", "chosen_prob"]),
    Case("data-conversation-wrong-role", "train.py", lambda i, t: ["--data", _jsonl(t, "d.jsonl", [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]}])], lambda i, t: [f"{t / 'd.jsonl'}:1:", "chosen"]),
    Case("data-conversation-message-without-content", "train.py", lambda i, t: ["--data", _jsonl(t, "d.jsonl", [
        {"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]}])], lambda i, t: [f"{t / 'd.jsonl'}:1:", "content"]),
    Case("data-hh-not-a-string", "train.py", lambda i, t: ["--data", _jsonl(t, "d.jsonl", [{"chosen": ["x"], "rejected": "\n\nHuman: a\n\nAssistant: b"}])],
         lambda i, t: [f"{t / 'd.jsonl'}:1:"]),
    Case("data-renamed-column-missing", "train.py", lambda i, t: ["--prompt-key", "question"],
         lambda i, t: [f"{i['data']}:1:", '"question"']),
    Case("data-sft-missing-response", "train.py", lambda i, t: ["--loss", "sft", "--data", _jsonl(t, "s.jsonl", [{"prompt": "a", "answer": "b"}])],
         lambda i, t: [f"{t / 's.jsonl'}:1:", '"response"']),
    Case("data-malformed-jsonl", "train.py", lambda i, t: ["--data", _jsonl(t, "d.jsonl", [], raw=json.dumps(_pairs(1)[0]).encode() + b'\n{"prompt": "a", "chosen": \n')],
         lambda i, t: [f"{t / 'd.jsonl'}:2:", "JSON"]),
    Case("data-not-utf8", "train.py", lambda i, t: ["--data", _jsonl(t, "d.jsonl", [], raw=b'{"prompt": "\xff\xfe"}\n')],
         lambda i, t: [f"{t / 'd.jsonl'}:1:", "UTF-8"]),
    Case("data-empty-file", "train.py", lambda i, t: ["--data", _jsonl(t, "d.jsonl", [], raw=b"")],
         lambda i, t: [f"{t / 'd.jsonl'}:", "empty"]),
    # a folder of its own: --out (tmp/run) inside --data would be refused first (tests/test_spl_rundir.py)
    Case("data-is-a-directory", "train.py", lambda i, t: ["--data", _folder(t / "folder")],
         lambda i, t: [f"{t / 'folder'}:", "directory"]),
    Case("data-no-such-file", "train.py", lambda i, t: ["--data", str(t / "nope.jsonl")], lambda i, t: [f"{t / 'nope.jsonl'}:", "no such file"]),
    Case("data-array-of-numbers", "train.py", lambda i, t: ["--data", _jsonl(t, "d.json", [], raw=b"[1, 2, 3]")],
         lambda i, t: [f"{t / 'd.json'}:1:", "object"]),
    Case("data-hostile-deep-nesting", "train.py", lambda i, t: ["--data", _jsonl(t, "d.jsonl", [], raw=NESTED + b"\n")],
         lambda i, t: [f"{t / 'd.jsonl'}:1:"]),
    Case("data-model-file-given-as-data", "train.py", lambda i, t: ["--data", str(Path(i["model"]) / "model.safetensors")],
         lambda i, t: [str(Path(i["model"]) / "model.safetensors")]),

    # ---- every file of a model directory
    Case("model-no-such-directory", "train.py", lambda i, t: ["--model", str(t / "nowhere")], lambda i, t: [str(t / "nowhere"), "no such model directory"]),
    Case("model-config-missing", "train.py", lambda i, t: ["--model", _model_copy(i, t, _remove("config.json"))],
         lambda i, t: [str(t / "model"), "config.json"]),
    Case("model-config-not-json", "train.py", lambda i, t: ["--model", _model_copy(i, t, _replace("config.json", b"{hidden_size: 32"))],
         lambda i, t: [str(t / "model" / "config.json")]),
    Case("model-config-negative-size", "train.py", lambda i, t: ["--model", _model_copy(i, t, _edit_config(hidden_size=-32))],
         lambda i, t: [str(t / "model" / "config.json"), "hidden_size"]),
    Case("model-config-hostile-layers", "train.py", lambda i, t: ["--model", _model_copy(i, t, _edit_config(num_hidden_layers=10**12))],
         lambda i, t: [str(t / "model"), "num_hidden_layers"]),
    Case("model-weights-truncated", "train.py", lambda i, t: ["--model", _model_copy(i, t, _truncate("model.safetensors"))],
         lambda i, t: [str(t / "model" / "model.safetensors"), "truncated"]),
    Case("model-weights-missing", "train.py", lambda i, t: ["--model", _model_copy(i, t, _remove("model.safetensors"))],
         lambda i, t: [str(t / "model" / "model.safetensors")]),
    Case("model-weights-hostile-header", "train.py", lambda i, t: ["--model", _model_copy(i, t, lambda p: (_remove("manifest.json")(p), _replace("model.safetensors", HUGE_HEADER)(p)))],
         lambda i, t: [str(t / "model" / "model.safetensors"), "safetensors"]),
    Case("model-weights-wrong-shape", "train.py", lambda i, t: ["--model", _model_copy(i, t, _edit_config(intermediate_size=48))],
         lambda i, t: [str(t / "model"), "mis-shaped"]),
    Case("model-tokenizer-missing", "train.py", lambda i, t: ["--model", _model_copy(i, t, _remove("tokenizer.model"))],
         lambda i, t: [str(t / "model" / "tokenizer.model")]),
    Case("model-tokenizer-garbage", "train.py", lambda i, t: ["--model", _model_copy(i, t, lambda p: (_remove("manifest.json")(p), _replace("tokenizer.model", b"not a sentencepiece model")(p)))],
         lambda i, t: [str(t / "model" / "tokenizer.model")]),
    Case("model-manifest-mangled", "train.py", lambda i, t: ["--model", _model_copy(i, t, _replace("manifest.json", b'{"format": "spl-manifest-1", "fi'))],
         lambda i, t: [str(t / "model" / "manifest.json")]),
    Case("init-config-missing", "train.py", lambda i, t: ["--model", "", "--init-config", str(t / "none.json"), "--lora-rank", "0"],
         lambda i, t: [str(t / "none.json")]),

    # ---- numeric options
    Case("alpha-nan", "train.py", lambda i, t: ["--alpha", "nan"], "--alpha"),
    Case("beta-inf", "train.py", lambda i, t: ["--beta", "inf"], "--beta"),
    Case("lr-zero", "train.py", lambda i, t: ["--lr", "0"], "--lr"),
    Case("lr-nan", "train.py", lambda i, t: ["--lr", "nan"], "--lr"),
    Case("steps-zero", "train.py", lambda i, t: ["--steps", "0"], "--steps"),
    Case("steps-not-a-number", "train.py", lambda i, t: ["--steps", "ten"], "--steps"),
    Case("epochs-negative", "train.py", lambda i, t: ["--epochs", "-1", "--steps", "1"], "--epochs"),
    Case("batch-size-zero", "train.py", lambda i, t: ["--batch-size", "0"], "--batch-size"),
    Case("max-length-below-prompt", "train.py", lambda i, t: ["--max-length", "8", "--max-prompt-length", "16"], "--max-length"),
    Case("lora-dropout-one", "train.py", lambda i, t: ["--lora-dropout", "1"], "--lora-dropout"),
    Case("lora-rank-negative", "train.py", lambda i, t: ["--lora-rank", "-4"], "--lora-rank"),
    Case("label-smoothing-half", "train.py", lambda i, t: ["--loss", "cdpo", "--label-smoothing", "0.5"], "--label-smoothing"),
    Case("warmup-negative", "train.py", lambda i, t: ["--warmup-steps", "-1"], "--warmup-steps"),
    Case("max-grad-norm-nan", "train.py", lambda i, t: ["--max-grad-norm", "nan"], "--max-grad-norm"),
    Case("weight-decay-inf", "train.py", lambda i, t: ["--weight-decay", "inf"], "--weight-decay"),
    Case("keep-checkpoints-zero", "train.py", lambda i, t: ["--keep-checkpoints", "0"], "--keep-checkpoints"),
    Case("threads-negative", "train.py", lambda i, t: ["--threads", "-2"], "--threads"),
    Case("device-unknown", "train.py", lambda i, t: ["--device", "tpu9"], "--device"),
    Case("loss-unknown", "train.py", lambda i, t: ["--loss", "ppo"], "--loss"),
    Case("out-is-a-file", "train.py", lambda i, t: ["--out", _jsonl(t, "file.txt", [], raw=b"x")], lambda i, t: [str(t / "file.txt"), "not a directory"]),
    Case("resume-nothing", "train.py", lambda i, t: ["--resume"], "nothing to resume"),
]


def _sample_prompts(tmp, name, raw):
    path = tmp / name
    path.write_bytes(raw)
    return str(path)


SAMPLE_CASES = [
    Case("sample-prompts-missing", "sample.py", lambda i, t: ["--prompts", str(t / "p.txt")], lambda i, t: [str(t / "p.txt"), "no such file"]),
    Case("sample-prompts-bad-jsonl", "sample.py", lambda i, t: ["--prompts", _sample_prompts(t, "p.jsonl", b'{"prompt": "a"}\n{"prompt": \n')],
         lambda i, t: [f"{t / 'p.jsonl'}:2:"]),
    Case("sample-prompts-jsonl-no-field", "sample.py", lambda i, t: ["--prompts", _sample_prompts(t, "p.jsonl", b'{"text": "a"}\n')],
         lambda i, t: [f"{t / 'p.jsonl'}:1:", '"prompt"']),
    Case("sample-prompts-not-utf8", "sample.py", lambda i, t: ["--prompts", _sample_prompts(t, "p.txt", b"\xff\xfe\x00a\n")],
         lambda i, t: [str(t / "p.txt"), "UTF-8"]),
    Case("sample-prompts-empty", "sample.py", lambda i, t: ["--prompts", _sample_prompts(t, "p.txt", b"\n\n")],
         lambda i, t: [str(t / "p.txt"), "no prompts"]),
    Case("sample-prompts-hostile-nesting", "sample.py", lambda i, t: ["--prompts", _sample_prompts(t, "p.jsonl", NESTED + b"\n")],
         lambda i, t: [f"{t / 'p.jsonl'}:1:"]),
    Case("sample-prompt-too-long", "sample.py", lambda i, t: ["--prompt", "cats and dogs " * 400],
         ["--prompt", "512"]),
    Case("sample-adapter-missing", "sample.py", lambda i, t: ["--adapter", str(t / "nowhere")], lambda i, t: [str(t / "nowhere"), "no such adapter directory"]),
    Case("sample-adapter-config-not-json", "sample.py", lambda i, t: ["--adapter", _adapter_copy(i, t, lambda p: (_remove("manifest.json")(p), _replace("adapter_config.json", b"{r: 4")(p)))],
         lambda i, t: [str(t / "adapter" / "adapter_config.json"), "JSON"]),
    Case("sample-adapter-weights-truncated", "sample.py", lambda i, t: ["--adapter", _adapter_copy(i, t, _truncate("adapter_model.safetensors"))],
         lambda i, t: [str(t / "adapter" / "adapter_model.safetensors"), "truncated"]),
    Case("sample-adapter-hostile-header", "sample.py", lambda i, t: ["--adapter", _adapter_copy(i, t, lambda p: (_remove("manifest.json")(p), _replace("adapter_model.safetensors", HUGE_HEADER)(p)))],
         lambda i, t: [str(t / "adapter" / "adapter_model.safetensors"), "safetensors"]),
    Case("sample-adapter-manifest-escapes", "sample.py", lambda i, t: ["--adapter", _adapter_copy(i, t, _replace("manifest.json", json.dumps({"format": "spl-manifest-1", "files": {"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}}).encode()))],
         lambda i, t: [str(t / "adapter" / "manifest.json"), "outside"]),
    Case("sample-adapter-for-another-model", "sample.py", lambda i, t: ["--adapter", _adapter_copy(i, t, lambda p: (_remove("manifest.json")(p), (p / "adapter_config.json").write_text(json.dumps(json.loads((p / "adapter_config.json").read_text()) | {"r": 8}))))],
         lambda i, t: [str(t / "adapter"), "mis-shaped"]),
    Case("sample-model-weights-truncated", "sample.py", lambda i, t: ["--model", _model_copy(i, t, _truncate("model.safetensors"))],
         lambda i, t: [str(t / "model" / "model.safetensors")]),
    Case("sample-model-tokenizer-missing", "sample.py", lambda i, t: ["--model", _model_copy(i, t, _remove("tokenizer.model"))],
         lambda i, t: [str(t / "model" / "tokenizer.model")]),
    Case("sample-num-samples-zero", "sample.py", lambda i, t: ["-n", "0"], "-n"),
    Case("sample-temperature-negative", "sample.py", lambda i, t: ["--temperature", "-1"], "--temperature"),
    Case("sample-temperature-nan", "sample.py", lambda i, t: ["--temperature", "nan"], "--temperature"),
    Case("sample-top-p-zero", "sample.py", lambda i, t: ["--top-p", "0"], "--top-p"),
    Case("sample-top-k-zero", "sample.py", lambda i, t: ["--top-k", "0"], "--top-k"),
    Case("sample-min-p-two", "sample.py", lambda i, t: ["--min-p", "2"], "--min-p"),
    Case("sample-max-new-tokens-zero", "sample.py", lambda i, t: ["--max-new-tokens", "0"], "--max-new-tokens"),
    Case("sample-max-new-tokens-text", "sample.py", lambda i, t: ["--max-new-tokens", "many"], "--max-new-tokens"),
]


@pytest.fixture(scope="module")
def inputs(tiny_run, tmp_path_factory):
    """The tiny run's model and data, plus an adapter for that model (saved by save_adapter, B random)."""
    import torch

    from models import add_lora, load_pretrained, save_adapter

    root = tmp_path_factory.mktemp("bad_input")
    model = add_lora(load_pretrained(tiny_run["model"]), rank=4, alpha=8, targets=("q_proj", "v_proj"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    save_adapter(model, root / "adapter")
    return {"model": str(tiny_run["model"]), "data": str(tiny_run["data"]), "adapter": str(root / "adapter")}


def base_argv(script, inputs, tmp):
    if script == "train.py":
        return ["--model", inputs["model"], "--data", inputs["data"], "--out", str(tmp / "run"), "--steps", "2",
                "--batch-size", "4", "--lora-rank", "4", "--no-progress", "--no-plot", "--max-length", "40",
                "--max-prompt-length", "24", "--threads", "1"]
    return ["--model", inputs["model"], "--prompt", "which pet is best?", "-n", "2", "--max-new-tokens", "4",
            "--device", "cpu"]


def listing(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*")}


def case_argv(case: Case, inputs: dict, tmp: Path) -> list[str]:
    """Build the case's files under `tmp` and return its command line (the base arguments, then the case's)."""
    argv = base_argv(case.script, inputs, tmp)
    extra = case.argv(inputs, tmp)
    if "--prompts" in extra:  # one prompt source at a time
        del argv[argv.index("--prompt"):argv.index("--prompt") + 2]
    return argv + extra


def check_outcome(case: Case, inputs: dict, tmp: Path, code: int, stdout: str, stderr: str, before: dict) -> None:
    """The contract: a non-zero exit, one line on stderr starting with the script's name and naming what the case
    names, no traceback, no run directory, and every file under `tmp` as it was (nothing written or removed)."""
    err = stderr.strip()
    assert code != 0, stdout[-2000:]
    assert "Traceback" not in stderr and len(err.splitlines()) == 1, stderr[-3000:]
    assert err.startswith(f"{case.script}: error: "), err
    expected = case.expect(inputs, tmp) if callable(case.expect) else case.expect
    for words in [expected] if isinstance(expected, str) else expected:
        assert words in err, err
    assert not (tmp / "run").exists()
    assert listing(tmp) == before  # nothing written, nothing removed (sample.py and train.py alike)


@pytest.mark.parametrize("case", TRAIN_CASES + SAMPLE_CASES, ids=lambda case: case.id)
def test_bad_input_is_one_line_without_traceback(case, inputs, tmp_path, script):
    """Each case through the script's main(argv) in this process (tests/conftest.py `script`), from a working
    directory of its own: what a process would print and return, without starting one per case."""
    work = tmp_path / "work"
    work.mkdir()
    argv = case_argv(case, inputs, tmp_path)
    before = listing(tmp_path)
    code, stdout, stderr = script(case.script, argv, cwd=work)
    check_outcome(case, inputs, tmp_path, code, stdout, stderr, before)


PROCESS_CASES = ["data-missing-rejected", "steps-not-a-number", "model-weights-truncated", "sample-adapter-missing",
                 "sample-num-samples-zero"]


@pytest.mark.parametrize("case_id", PROCESS_CASES)
def test_a_few_cases_as_real_processes(case_id, inputs, tmp_path, tmp_path_factory, script):
    """The same contract from a real process (`python train.py ...` as a user runs it, one per script and per
    exit code: 1 for bad files, 2 for a bad command line), and the process's exit code and line equal what
    main(argv) returns and prints in this process for the same case."""
    case = next(c for c in TRAIN_CASES + SAMPLE_CASES if c.id == case_id)
    work = tmp_path / "work"
    work.mkdir()
    argv = case_argv(case, inputs, tmp_path)
    before = listing(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, str(ROOT / case.script), *argv], cwd=work, env=env,
                            capture_output=True, text=True, timeout=300)
    check_outcome(case, inputs, tmp_path, result.returncode, result.stdout, result.stderr, before)
    other = tmp_path_factory.mktemp(case_id)  # the same case in this process, in a directory of its own
    (other / "work").mkdir()
    code, _, stderr = script(case.script, case_argv(case, inputs, other), cwd=other / "work")
    assert code == result.returncode == (2 if case_id in ("steps-not-a-number", "sample-num-samples-zero") else 1)
    assert stderr.strip().replace(str(other), "TMP") == result.stderr.strip().replace(str(tmp_path), "TMP")


def test_the_sweep_covers_at_least_thirty_kinds():
    ids = [case.id for case in TRAIN_CASES + SAMPLE_CASES]
    assert len(ids) == len(set(ids)) >= 30
    assert {case.script for case in TRAIN_CASES} == {"train.py"} and {c.script for c in SAMPLE_CASES} == {"sample.py"}
