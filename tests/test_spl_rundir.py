"""spl/rundir.py through train.main: a run directory cannot destroy what it does not own.

Oracle: the contract, checked on the file system. Each refusal is one line on stderr naming the --out and the
reason, exit code 1, and every file under the test's directory is byte for byte what it was (a sha256 of each
file, and the set of paths, before and after). The lock's cases check the file a link points to is untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import train
from spl import runs
from spl.rundir import MARKER

pytestmark = pytest.mark.usefixtures("one_thread", "script")  # script: restores what main() sets (RNGs, ...)


def tree(root: Path) -> dict:
    """{relative path: sha256 of the file, or "dir" / "link -> target"} of everything under root."""
    found = {}
    for path in sorted(Path(root).rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            found[key] = f"link -> {os.readlink(path)}"
        elif path.is_dir():
            found[key] = "dir"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture
def place(tiny_run, tmp_path, monkeypatch):
    """A working directory with files of the user's, a copy of the tiny model, the data inside a folder, and
    the current directory inside it all: tmp/home/work (cwd), tmp/home/model, tmp/home/data/prefs.jsonl."""
    home = tmp_path / "home"
    work = home / "work"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("mine\n")
    (work / "src").mkdir()
    (work / "src" / "thesis.tex").write_text("years of work\n")
    shutil.copytree(tiny_run["model"], home / "model")
    (home / "data").mkdir()
    shutil.copy(tiny_run["data"], home / "data" / "prefs.jsonl")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    return home


def base(home: Path) -> list[str]:
    return ["--model", str(home / "model"), "--data", str(home / "data" / "prefs.jsonl"), "--steps", "1",
            "--batch-size", "4", "--lora-rank", "2", "--max-length", "40", "--max-prompt-length", "24",
            "--no-progress", "--no-plot", "--threads", "1"]


def refused(argv, root: Path, capsys, words) -> str:
    """Run train.main(argv); assert exit 1, one line naming `words`, no traceback, nothing under root changed."""
    before = tree(root)
    code = train.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("train.py: error: "), err
    for word in words:
        assert word in err, err
    assert tree(root) == before
    return err


@pytest.mark.parametrize("out, words", [
    ("", ["--out is empty"]),
    (".", ["the current directory"]),
    ("..", ["a parent of the current directory"]),
    ("/", ["a parent of the current directory"]),
    ("../../", ["a parent of the current directory"]),
])
def test_out_that_would_swallow_the_working_directory_is_refused(place, capsys, out, words):
    """`--out "" --overwrite` (an unset variable) used to empty the current directory and exit 0."""
    for flags in (["--overwrite"], [], ["--resume"]):
        refused(base(place) + ["--out", out, *flags], place.parent, capsys, words)


def test_out_home_is_refused(place, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so that $HOME is not also a parent of the current directory
    refused(base(place) + ["--out", str(place), "--overwrite"], tmp_path, capsys, ["home directory"])


@pytest.mark.parametrize("out, words", [
    ("model", ["is --model"]),
    ("model/sub", ["is inside --model"]),
    ("data", ["holds --data"]),
])
def test_out_holding_or_inside_an_input_is_refused(place, capsys, out, words):
    """--out equal to the model directory with --overwrite used to delete model.safetensors and tokenizer.model."""
    for flags in (["--overwrite"], []):
        refused(base(place) + ["--out", str(place / out), *flags], place.parent, capsys, words)


def test_out_holding_the_world_or_a_reward_model_is_refused(place, capsys):
    """The embedded world's folder (its model and data) when no --model/--data is given; a reward model run
    given to --loss spl-online (a stand-in: the files validation looks for)."""
    from data.world import DEFAULT_DIR
    refused(["--out", str(DEFAULT_DIR), "--overwrite", "--steps", "1"], DEFAULT_DIR, capsys,
            [str(DEFAULT_DIR), "holds --model"])
    reward = place / "reward_run"
    (reward / "adapter").mkdir(parents=True)
    (reward / "adapter" / "reward_head.safetensors").write_bytes(b"")
    (reward / MARKER).write_text("{}")
    refused(base(place) + ["--loss", "spl-online", "--reward-model", str(reward), "--out", str(reward),
                           "--overwrite"], place.parent, capsys, ["is --reward-model"])


def test_overwrite_refuses_a_directory_this_project_did_not_make(place, capsys):
    """A directory with files but no marker is refused, an HF model's config.json included; one whose config.json
    holds train.py's options (a run from before markers) is replaced."""
    mine = place / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "mistral", "loss": "not an option here"}')
    (mine / "checkpoints").mkdir()
    refused(base(place) + ["--out", str(mine), "--overwrite"], place.parent, capsys, [str(mine), MARKER])
    (mine / "config.json").write_text(json.dumps({"loss": "spl", "out": str(mine), "lora_rank": 2}))
    assert train.main(base(place) + ["--out", str(mine), "--overwrite"]) == 0
    assert (mine / MARKER).is_file() and not (mine / "checkpoints").exists()
    capsys.readouterr()


def test_overwrite_replaces_a_marked_run_and_an_empty_directory(place, capsys):
    """A run directory train.py made (its marker) is replaced; an empty one is taken; both get the marker."""
    out = place / "run"
    assert train.main(base(place) + ["--out", str(out)]) == 0
    assert (out / MARKER).is_file() and json.loads((out / MARKER).read_text())["format"] == "spl-run-1"
    (out / "stale.txt").write_text("from the old run")
    assert train.main(base(place) + ["--out", str(out), "--overwrite"]) == 0
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file() and (out / "adapter").is_dir()
    empty = place / "empty"
    empty.mkdir()
    assert train.main(base(place) + ["--out", str(empty), "--overwrite"]) == 0
    assert (empty / MARKER).is_file()
    capsys.readouterr()


def test_lock_that_is_a_symbolic_link_is_replaced_never_written_through(tmp_path):
    """A .lock pointing at a file outside used to get that file truncated and overwritten."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch\n" * 10)
    (out / ".lock").symlink_to(victim)
    with runs.RunLock(out):
        assert not (out / ".lock").is_symlink() and json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert victim.read_text() == "do not touch\n" * 10
    (out / ".lock").symlink_to(tmp_path / "dangling")  # a link to nowhere must not create its target either
    with runs.RunLock(out):
        pass
    assert not (tmp_path / "dangling").exists()


def test_lock_that_is_a_hard_link_is_replaced(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "precious.txt"
    victim.write_text("do not touch\n")
    os.link(victim, out / ".lock")
    with runs.RunLock(out):
        pass
    assert victim.read_text() == "do not touch\n"


def test_a_lock_that_is_a_directory_is_one_line(tmp_path):
    out = tmp_path / "run"
    (out / ".lock").mkdir(parents=True)
    with pytest.raises(runs.RunError, match=r"\.lock: cannot take the run directory's lock \(Is a directory\)"):
        with runs.RunLock(out):
            pass
    assert (out / ".lock").is_dir()


# ---------------------------------------------------------------------------------------------- the same run

def started_run(place, capsys) -> tuple[list[str], Path]:
    """A 2-step run with a checkpoint per step on copies of the model and data; (its argv, its --out)."""
    out = place / "run"
    argv = base(place) + ["--out", str(out), "--steps", "2", "--save-every", "1"]
    assert train.main(argv) == 0
    capsys.readouterr()
    return argv, out


def test_resume_refuses_changed_data_records(place, capsys):
    """The same file name, one record's text changed: the run's data is not the data it started on."""
    argv, out = started_run(place, capsys)
    data = place / "data" / "prefs.jsonl"
    data.write_text(data.read_text().replace("dogs are loyal", "dogs are loud", 1))
    err = refused(argv + ["--steps", "3", "--resume"], place.parent, capsys,
                  [str(out / "config.json"), "the data's records changed"])
    assert "the model's weights" not in err


def test_resume_refuses_changed_model_weights(place, capsys):
    import torch

    from models import load_pretrained, save_pretrained
    argv, out = started_run(place, capsys)
    model = load_pretrained(place / "model")
    with torch.no_grad():
        model.norm.weight.mul_(1.5)
    save_pretrained(model, place / "model", tokenizer_path=place / "model" / "tokenizer.model", overwrite=True)
    refused(argv + ["--steps", "3", "--resume"], place.parent, capsys,
            [str(out / "config.json"), "the model's weights changed"])


def test_run_without_fingerprints_resumes_with_a_note_and_shrunk_data_is_one_line(place, capsys):
    """A run made before fingerprints existed resumes, saying it cannot check; if its data has meanwhile shrunk
    below the saved position, resume stops in one line (exit 1) and the run's own files are unchanged."""
    argv, out = started_run(place, capsys)
    config = json.loads((out / "config.json").read_text())
    del config["inputs"]
    (out / "config.json").write_text(json.dumps(config))
    data = place / "data" / "prefs.jsonl"
    full = data.read_text()
    data.write_text("".join(full.splitlines(keepends=True)[:4]))  # 4 pairs: 1 batch per epoch, position was 2
    before = {k: v for k, v in tree(out).items() if not k.startswith("cache")}
    code = train.main(argv + ["--steps", "3", "--resume"])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "data position does not fit this data" in err and "step_000002" in err, err
    assert "records no input fingerprints" in captured.out
    assert {k: v for k, v in tree(out).items() if not k.startswith("cache")} == before
    data.write_text(full)
    assert train.main(argv + ["--steps", "3", "--resume"]) == 0  # the same data: resumes, with the note
    assert "records no input fingerprints" in capsys.readouterr().out


def test_torn_last_metrics_line_is_dropped_with_a_word(place, capsys):
    """A kill mid-write leaves half a line at the end of metrics.jsonl: resume drops it, says so, and the log
    reads steps 1, 2, 3 after one more step. A bad line before the last is damage: one line, exit 1."""
    argv, out = started_run(place, capsys)
    log = out / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "loss": 0.6')
    assert train.main(argv + ["--steps", "3", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"{log}:3: last line cut short" in printed
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    lines = log.read_text().splitlines()
    log.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    refused(argv + ["--steps", "4", "--resume"], place.parent, capsys, [f"{log}:2: not a metrics record"])
