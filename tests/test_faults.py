"""Faults: a full disk at every write site, a real full file system, and signals in every phase.

Oracle: the contract, on the file system and the process's exit. A failed write ends train.main with exit
code 1 and one line naming the file and the OS's reason ("No space left on device"), no traceback; every file
written before is byte for byte as it was (sha256 of each), a checkpoint still loads, and a new run that had
only begun leaves no directory. The fault injector fails the real low-level calls for files whose path
contains a pattern: os.fsync and os.pwrite (every JSON file, manifest and the lock are fsync'ed before they
are renamed into place), safetensors' save_file (raising safetensors' own error with the text the real one
has, checked against a real full tmpfs below) and Python's open() in spl/runs.py (metrics.jsonl).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError

import spl.reference
import train
from spl import runs
from tests.test_spl_rundir import base, tree

pytestmark = pytest.mark.usefixtures("one_thread", "script")  # script: restores what main() sets (RNGs, ...)
ROOT = Path(__file__).resolve().parents[1]
# What safetensors raises when the disk is full (read off a full tmpfs: test_real_full_file_system_...)
SAFETENSORS_ENOSPC = "Error while serializing: I/O error: No space left on device (os error 28)"


def _fd_path(fd) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def full_disk_at(monkeypatch, pattern: str) -> None:
    """From now on, every write to a file whose path contains `pattern` fails as on a full disk."""
    def enospc():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    fsync, pwrite = os.fsync, os.pwrite

    def faulty_fsync(fd):
        if pattern in _fd_path(fd):
            raise enospc()
        return fsync(fd)

    def faulty_pwrite(fd, data, offset):
        if pattern in _fd_path(fd):
            raise enospc()
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "fsync", faulty_fsync)
    monkeypatch.setattr(os, "pwrite", faulty_pwrite)
    import data.reference_cache
    import models.checkpoint
    import models.peft
    for module in (runs, data.reference_cache, models.peft, models.checkpoint):
        real = module.save_file

        def faulty_save_file(tensors, filename, *args, _real=real, **kwargs):
            if pattern in str(filename):
                raise SafetensorError(SAFETENSORS_ENOSPC)
            return _real(tensors, filename, *args, **kwargs)
        monkeypatch.setattr(module, "save_file", faulty_save_file)

    class FaultyFile:
        def __init__(self, file):
            self.file = file

        def write(self, text):
            raise enospc()

        def __getattr__(self, name):
            return getattr(self.file, name)

    def faulty_open(path, *args, **kwargs):
        file = open(path, *args, **kwargs)
        return FaultyFile(file) if pattern in str(path) else file
    monkeypatch.setattr(runs, "open", faulty_open, raising=False)


def one_line(capsys, code, expected_code=1) -> str:
    err = capsys.readouterr().err.strip()
    assert code == expected_code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("train.py: error: "), err
    return err


@pytest.fixture
def place(tiny_run, tmp_path, monkeypatch):
    """The tiny model and data under tmp/home, the current directory tmp/home/work (see test_spl_rundir)."""
    home = tmp_path / "home"
    (home / "work").mkdir(parents=True)
    shutil.copytree(tiny_run["model"], home / "model")
    (home / "data").mkdir()
    shutil.copy(tiny_run["data"], home / "data" / "prefs.jsonl")
    monkeypatch.chdir(home / "work")
    return home


@pytest.mark.parametrize("pattern, names", [
    (".lock", [".lock", "cannot take the run directory's lock (No space left on device)"]),
    ("config.json", ["run/config.json: not written (No space left on device)", "removed"]),
    ("ref_logps", ["ref_logps-", "not written (No space left on device)", "removed"]),
    ("step_000001", ["step_000001: checkpoint not saved (No space left on device); no earlier", "removed"]),
    ("metrics.jsonl", ["run/metrics.jsonl: not written (No space left on device)", "removed"]),
    ("adapter_model", ["run/adapter: not written (No space left on device)", "removed"]),
])
def test_full_disk_at_each_write_of_a_new_run(place, capsys, monkeypatch, pattern, names):
    """A new run: the failed write is named, and the run directory it had only begun is gone; nothing else
    under the test's directory changed. (The adapter's case without checkpoints: with one, the directory is
    kept, as the resume cases below show.)"""
    before = tree(place)
    full_disk_at(monkeypatch, pattern)
    save_every = "0" if pattern == "adapter_model" else "1"
    code = train.main(base(place) + ["--out", str(place / "run"), "--steps", "2", "--save-every", save_every])
    err = one_line(capsys, code)
    for words in names:
        assert words in err, err
    assert not (place / "run").exists()
    assert tree(place) == before


@pytest.mark.parametrize("pattern, names", [
    ("step_000003", ["step_000003: checkpoint not saved (No space left on device); the previous checkpoint",
                     "step_000002 is intact"]),
    ("metrics.jsonl", ["run/metrics.jsonl: not written (No space left on device)"]),
    ("adapter_model", ["run/adapter: not written (No space left on device); the last checkpoint",
                       "step_000003 is intact"]),
])
def test_full_disk_while_resuming_keeps_every_earlier_file(place, capsys, monkeypatch, pattern, names):
    """A run with checkpoints at steps 1 and 2, resumed to step 3 on a disk that fills: the files of the run
    before the resume are unchanged (but the metrics log, which the resume rewrites to the checkpoint's step,
    and the rotation of old checkpoints) and its newest checkpoint still loads."""
    out = place / "run"
    argv = base(place) + ["--out", str(out), "--steps", "2", "--save-every", "1"]
    assert train.main(argv) == 0
    capsys.readouterr()
    before = tree(out)
    full_disk_at(monkeypatch, pattern)
    code = train.main(argv + ["--steps", "3", "--resume"])
    err = one_line(capsys, code)
    for words in names:
        assert words in err, err
    after = tree(out)
    for name in ("config.json", ".spl-run", *[k for k in before if k.startswith("checkpoints/step_000002/")]):
        assert after[name] == before[name], name
    assert runs.load_checkpoint(out / "checkpoints" / "step_000002")[3]["step"] == 2


def _mount_tmpfs(size: str) -> Path | None:
    """A fresh tmpfs of `size` (needs root / CAP_SYS_ADMIN); None where mounting is not possible here."""
    where = Path(tempfile.mkdtemp(prefix="spl-tmpfs-"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        where.rmdir()
        return None
    return where


@pytest.fixture
def small_fs():
    """Factory: small_fs(size) -> a mounted tmpfs, unmounted afterwards. Skips (with the reason) where this
    machine cannot mount one (not root, or in a container without CAP_SYS_ADMIN)."""
    mounted = []

    def make(size):
        where = _mount_tmpfs(size)
        if where is None:
            pytest.skip("cannot mount a tmpfs here (needs root); the fault-injection tests above cover the sites")
        mounted.append(where)
        return where
    yield make
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False)
        where.rmdir()


def fill(where: Path, leave_bytes: int) -> None:
    """Fill the file system at `where` until about `leave_bytes` are free (tmpfs counts 4 KiB pages)."""
    free = shutil.disk_usage(where).free
    with open(where / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


def test_real_full_file_system_new_run_and_resume(place, capsys, small_fs):
    """A real tmpfs, as full as it gets: (1) a new run on it finds no room and leaves nothing; (2) a run with
    checkpoints made while there was room, then the disk filled, resumed: one line naming the checkpoint not
    saved and the intact previous one, which still loads; every earlier file unchanged. Also: what safetensors
    raises on a real full disk is the text the injector above imitates."""
    import torch
    from safetensors.torch import save_file
    disk = small_fs("2m")
    (disk / "earlier.txt").write_text("written before the run\n")
    fill(disk, 8 << 10)
    before = tree(disk)
    code = train.main(base(place) + ["--out", str(disk / "run"), "--steps", "2", "--save-every", "1"])
    err = one_line(capsys, code)
    assert "No space left on device" in err and str(disk / "run") in err, err
    assert not (disk / "run").exists() and tree(disk) == before
    with pytest.raises(SafetensorError, match="No space left on device"):
        save_file({"x": torch.zeros(1 << 16)}, str(disk / "x.safetensors"))
    assert not (disk / "x.safetensors").exists() or (disk / "x.safetensors").unlink() is None

    (disk / "filler").unlink()
    out = disk / "run"
    argv = base(place) + ["--out", str(out), "--steps", "2", "--save-every", "1"]
    assert train.main(argv) == 0
    capsys.readouterr()
    before = tree(out)
    fill(disk, 0)
    code = train.main(argv + ["--steps", "3", "--resume"])
    err = one_line(capsys, code)
    assert "No space left on device" in err and str(out) in err, err
    after = tree(out)
    for name in ("config.json", ".spl-run", *[k for k in before if k.startswith("checkpoints/")]):
        assert after.get(name) == before[name], name
    assert runs.load_checkpoint(out / "checkpoints" / "step_000002")[3]["step"] == 2


# ---------------------------------------------------------------------------------------------- signals

def signal_at(monkeypatch, name: str, signum: int, call: int = 1) -> None:
    """Send `signum` to this process from inside train.<name> (or spl.runs.<name>, spl.reference.<name>) on its
    `call`-th call (then run it as usual): the signal arrives in exactly that phase."""
    module = next(m for m in (train, runs, spl.reference) if hasattr(m, name))
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("where, signum, call, words", [
    ("load_pretrained", signal.SIGINT, 1, "SIGINT: stopped before training began; nothing to save yet"),
    ("reference_logprobs", signal.SIGTERM, 2, "SIGTERM: stopped before training began; nothing to save yet"),
    ("accumulate_gradients", signal.SIGINT, 2, "SIGINT: saved "),
    ("save_adapter", signal.SIGTERM, 1, "SIGTERM: came while the outputs were written; they were finished first"),
])
def test_a_signal_in_each_phase_is_one_line_and_its_exit_code(place, capsys, monkeypatch, where, signum, call,
                                                              words):
    """Loading, the reference pass, training (step 2 of 5), writing the adapter: exit 128 + signal, one line,
    no traceback, the handlers as they were. Nothing to save before training: a new run leaves no directory.
    In training: a checkpoint of the step it was in (step 2), which loads. While writing: the adapter is
    finished first and verifies against its manifest."""
    from models.files import verify_directory
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    out = place / "run"
    signal_at(monkeypatch, where, signum, call)
    code = train.main(base(place) + ["--out", str(out), "--steps", "5"])
    err = capsys.readouterr().err.strip()
    assert code == 128 + signum, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("train.py: "), err
    assert words in err, err
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    if where == "accumulate_gradients":
        assert f"{out / 'checkpoints' / 'step_000002'}; continue with the same command plus --resume" in err
        assert runs.load_checkpoint(out / "checkpoints" / "step_000002")[3]["step"] == 2
    elif where == "save_adapter":
        assert verify_directory(out / "adapter")
    else:
        assert not out.exists()


def _start(argv, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (/proc/<pid>/status SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (signum - 1) & 1)


def test_real_signals_while_starting_and_while_loading(place):
    """Real processes. SIGTERM as soon as train.py has a handler (while torch still imports, most likely):
    exit 143 and one line. SIGINT once the data is read (loading / the reference pass / at the latest the
    first steps): exit 130, one line, no traceback, and either no run directory or a checkpoint that loads."""
    out = place / "run"
    argv = base(place) + ["--out", str(out), "--steps", "100000"]
    process = _start(argv, place / "work")
    deadline = time.time() + 60
    while not _catches(process.pid, signal.SIGTERM):
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("train.py: SIGTERM: stopped"), err
    assert not out.exists()

    process = _start(argv, place / "work")
    assert "chat format" in process.stdout.readline()  # load_data's first line: the model is loaded
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("\r") and "it/s]" not in line]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("train.py: SIGINT: "), err
    if out.exists():  # it got as far as training: a checkpoint of that step
        assert runs.load_checkpoint(runs.complete_checkpoints(out)[-1])
