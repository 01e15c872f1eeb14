"""Whose directory is it: a run directory is one this project made, used by one process, for one set of inputs.

    out/
      .spl-run      the marker, written when train.py creates the run (JSON: format, created); --overwrite
                    deletes only a directory that carries it (or an empty one)
      .lock         held (flock) by the one process using the directory; names it (pid, host, start)
      config.json   the resolved options, plus "inputs": fingerprints of the data's records, the model's weights
                    and the tokenizer; --resume refuses other options (but those it may change) or other inputs

Checked before anything is read, created or deleted (check_out): an empty --out (what an unset shell variable
gives: "" is the current directory), the current directory or any parent of it, $HOME, /, a directory that
holds, is, or lies inside the model, the data or a reward model the run reads, and, for --overwrite, a
non-empty directory without the marker. Nothing here deletes a file the project did not write.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import stat
import time
from pathlib import Path

from models.files import write_json_atomic
from spl.files import RunError, writing

MARKER = ".spl-run"
MARKER_FORMAT = "spl-run-1"
LOCK_NAME = ".lock"
INPUTS_KEY = "inputs"  # config.json's entry holding the input fingerprints (not an option)
INPUT_NAMES = {"data": "the data's records", "model": "the model's weights", "tokenizer": "the tokenizer"}


# ------------------------------------------------------------------------------------------------ ownership

def has_marker(out: Path) -> bool:
    """Whether `out` carries the marker train.py writes when it creates a run (a regular file, not a link)."""
    try:
        return stat.S_ISREG(os.lstat(Path(out) / MARKER).st_mode)
    except OSError:
        return False


def write_marker(out: Path) -> None:
    with writing(Path(out) / MARKER):
        write_json_atomic(Path(out) / MARKER, {"format": MARKER_FORMAT, "by": "train.py",
                                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _own_files(out: Path) -> list[Path]:
    """What a run wrote in `out`: all but its lock and marker (a directory holding only those is empty)."""
    return [p for p in Path(out).iterdir() if p.name not in (LOCK_NAME, MARKER)]


def check_out(out: str, resume: bool, overwrite: bool, inputs: dict) -> None:
    """Refuse, in one line and before anything is read, created or deleted, an --out that is not a directory
    a run may own (module docstring). inputs: {flag: path} of what the run reads (--model, --data, ...; None
    entries are skipped)."""
    if not str(out).strip():
        raise RunError("--out is empty (an unset shell variable?): give the run directory, e.g. --out runs/NAME")
    path = Path(out)
    where = path.resolve()
    cwd = Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        what = "the current directory" if where == cwd else "a parent of the current directory"
        raise RunError(f"--out {out}: is {what}; a run directory must be a directory of its own "
                       f"(e.g. --out runs/NAME)")
    if where == Path.home().resolve():
        raise RunError(f"--out {out}: is your home directory; a run directory must be a directory of its own "
                       f"(e.g. --out runs/NAME)")
    for flag, values in inputs.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:  # --data may name several
            if value is None or not str(value):
                continue
            read = Path(value).resolve()
            if where == read or where in read.parents or (read.is_dir() and read in where.parents):
                relation = "is" if where == read else "holds" if where in read.parents else "is inside"
                raise RunError(f"--out {out}: {relation} {flag} {value}; a run directory must be apart from what "
                               f"the run reads: give another --out")
    if path.exists() and not path.is_dir():
        raise RunError(f"{out}: exists and is not a directory; give another --out")
    if overwrite and not resume and path.is_dir():
        _refuse_unmarked(path)


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, a run directory that cannot be used as asked. Writes nothing. (Its own lock file,
    held by this process, does not make it non-empty.)"""
    if resume and overwrite:
        raise RunError("--resume and --overwrite contradict each other: pick one")
    if out.exists() and not out.is_dir():
        raise RunError(f"{out}: exists and is not a directory; give another --out")
    if resume and not (out / "config.json").is_file():
        raise RunError(f"{out}: nothing to resume (no config.json); drop --resume to start a new run")
    if not resume and not overwrite and out.is_dir() and _own_files(out):
        raise RunError(f"{out}: already exists and is not empty; pass --resume to continue it or "
                       f"--overwrite to replace it")
    if overwrite and out.is_dir():
        _refuse_unmarked(out)


def _made_before_markers(out: Path) -> bool:
    """A run directory from before markers existed: its config.json is a JSON object of train.py's options (it
    names "loss", "out" and "lora_rank"; an HF model's config.json names none of them)."""
    try:
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(saved, dict) and {"loss", "out", "lora_rank"} <= set(saved)


def _refuse_unmarked(out: Path) -> None:
    """--overwrite deletes a directory only if train.py made it (its marker, or a config.json of train.py's from
    before markers) or it is empty."""
    if _own_files(out) and not has_marker(out) and not _made_before_markers(out):
        raise RunError(f"{out}: not empty and not a run directory made by train.py (no {MARKER} marker); "
                       f"--overwrite deletes only those: delete it yourself or give another --out")


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, config: dict | None = None,
                    inputs: dict | None = None, say=print) -> None:
    """Create `out` (emptying a marked one first with --overwrite, the lock file kept) with its marker and, given
    `config`, its config.json (the options plus the input fingerprints); or, for --resume, check that the inputs
    are the run's (check_resumed_inputs) and accept it."""
    check_run_dir(out, resume, overwrite)
    if resume:
        check_resumed_inputs(out, inputs, say)
        if not has_marker(out):  # a run made before markers existed: it is ours (its config.json was accepted)
            write_marker(out)
        return
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for path in _own_files(out):  # the marker was checked: everything here is a run's
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    write_marker(out)
    if config is not None:
        with writing(out / "config.json"):
            write_json_atomic(out / "config.json", config | ({INPUTS_KEY: inputs} if inputs else {}))


# ------------------------------------------------------------------------------------------------ the same run

def _read_saved_config(out: Path) -> dict:
    path = out / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise RunError(f"{path}: unreadable ({type(error).__name__}); it records the options the run started "
                       f"with, which --resume compares with this command line") from None
    if not isinstance(saved, dict):
        raise RunError(f"{path}: not a JSON object of training options")
    return saved


def check_resumed_config(out: Path, config: dict, may_change=()) -> None:
    """--resume continues the run that out/config.json describes: every option of `config` (the new command
    line, resolved) must equal the saved one, except those named in `may_change`. A difference is a RunError in
    one line naming the first differing option, both values and how many others differ; so is a config.json
    that cannot be read or that holds an option `config` does not know. Options missing from the saved file
    (added to train.py after the run started) are not compared. Writes nothing."""
    path = out / "config.json"
    saved = _read_saved_config(out)
    saved.pop(INPUTS_KEY, None)
    current = json.loads(json.dumps(config))  # as it would be saved: tuples as lists
    unknown = sorted(set(saved) - set(current))
    if unknown:
        raise RunError(f"{path}: option {unknown[0]!r} is not one of this train.py's (written by another version?)")
    differ = [name for name in current if name in saved and name not in may_change and saved[name] != current[name]]
    if differ:
        name = differ[0]
        _refuse(path, f"{_flag(name)} was {json.dumps(saved[name])} when the run started, {json.dumps(current[name])} "
                      f"now", [_flag(n) for n in differ[1:]], "give the same value")


def check_resumed_inputs(out: Path, inputs: dict | None, say=print) -> None:
    """--resume continues the run on the inputs it started with: config.json's fingerprints of the data's
    records, the model's weights and the tokenizer must equal `inputs` (computed now). A difference is a RunError
    naming what changed; a run from before fingerprints were recorded resumes with a one-line note."""
    if inputs is None:
        return
    path = out / "config.json"
    saved = _read_saved_config(out).get(INPUTS_KEY)
    if saved is None:
        say(f"{path}: records no input fingerprints (a run from an earlier version): resuming without checking "
            f"that the data, the model and the tokenizer are the ones it started with")
        return
    if not isinstance(saved, dict):
        raise RunError(f'{path}: "{INPUTS_KEY}" must be an object of fingerprints, got {json.dumps(saved)[:60]}')
    changed = [name for name in INPUT_NAMES if name in inputs and saved.get(name) != inputs[name]]
    if changed:
        name = changed[0]
        _refuse(path, f"{INPUT_NAMES[name]} changed since the run started (fingerprint {str(saved.get(name))[:12]} "
                      f"then, {str(inputs[name])[:12]} now)", [INPUT_NAMES[n] for n in changed[1:]], "restore them")


def _refuse(path: Path, first: str, others: list[str], fix: str) -> None:
    """RunError("<path>: <first> (and N more: a, b); --resume continues the same run: <fix>, or start a new run in
    another --out"): what differs from the run being resumed, the first in full and the others by name."""
    more = f" (and {len(others)} more: {', '.join(others)})" if others else ""
    raise RunError(f"{path}: {first}{more}; --resume continues the same run: {fix}, or start a new run in another "
                   f"--out")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ------------------------------------------------------------------------------------------------ the lock

class RunLock:
    """`with RunLock(out):` holds out/.lock for the block; a second process asking for it gets RunError naming
    the holder ("in use by process 1234 on host since ..."), whatever its flags (--resume, --overwrite).

    The lock is flock(2) on out/.lock, which the kernel drops when the holder exits in any way, SIGKILL included:
    a lock left by a dead process never blocks. The file names its holder (JSON: pid, host, started); finding
    that text when taking the lock means its writer died holding it, and `took_over` names that process (the
    caller prints it). The file is opened without following links (O_NOFOLLOW): a .lock that is a symbolic link
    (or a hard link to some other file) is replaced by a file of our own, never written through. On release the
    file is unlinked (while still locked; a process that opened the old file in the meantime sees that it is no
    longer the one at out/.lock and opens the new one), and `out` itself is removed if this lock created it and
    nothing else was written (a run refused for bad input leaves nothing); `abandon()` removes it even then.
    Under torchrun only rank 0 takes it."""

    def __init__(self, out):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self.fd = None
        self.created = False
        self.took_over: str | None = None

    def __enter__(self):
        if self.out.exists() and not self.out.is_dir():
            raise RunError(f"{self.out}: exists and is not a directory; give another --out")
        self.created = not self.out.exists()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            while self.fd is None:
                fd = _open_own_file(self.path)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise RunError(f"{self.out}: in use by {holder}; wait for it to finish or stop it "
                                   f"(one process per run directory)") from None
                try:
                    same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:  # its holder unlinked it between our open and our flock: open the new one
                    os.close(fd)
                    continue
                self.fd = fd
            stale = _read_holder(self.fd, default=None)
            holder = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(holder).encode(), 0)
            os.fsync(self.fd)
        except OSError as error:
            self.__exit__(None, None, None)
            raise RunError(f"{self.path}: cannot take the run directory's lock ({error.strerror})") from None
        if stale is not None:
            self.took_over = f"{self.path}: took over the lock of {stale}, which no longer runs"
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None
        if self.created:  # rmdir refuses a directory that is not empty again
            try:
                os.rmdir(self.out)
            except OSError:
                pass
        return False

    def abandon(self) -> bool:
        """Remove `out` and all in it, if this lock created it (a new run that failed before it had anything
        worth keeping); returns whether it did. Call before leaving the block."""
        if not self.created:
            return False
        shutil.rmtree(self.out, ignore_errors=True)
        return True


def _open_own_file(path: Path) -> int:
    """Open (creating) `path` read-write as a regular file of our own: a symbolic link or a hard link there is
    unlinked (the file it points to is untouched) and a new file created in its place."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno != errno.ELOOP:  # ELOOP: the last component is a symbolic link
                raise
            os.unlink(path)
            continue
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
            return fd
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EEXIST, f"{path.name} exists and is not a regular file")
        os.unlink(path)  # a hard link to a file elsewhere: writing it would change that file
    raise OSError(errno.EAGAIN, "the lock file keeps being replaced")


def _read_holder(fd, default="another process"):
    """The holder a lock file names, as "process 1234 on host (since ...)", or `default` if it names none."""
    text = ""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
        holder = json.loads(text)
        return f"process {int(holder['pid'])} on {holder['host']} (since {holder['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return default if not text.strip() else f"a process ({text.strip()[:80]!r})"
