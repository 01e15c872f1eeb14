"""A training run's directory: resolved config, metrics log, atomic checkpoints, resume, and stop signals.

    out/
      config.json             the resolved training options (written once; checked on --resume)
      metrics.jsonl           one JSON object per logged step
      checkpoints/step_000100/  trainable.safetensors, optimizer.pt, rng.pt, state.json  (complete or absent)
      adapter/                the final LoRA adapter in PEFT's format (or model/ for a full fine-tune)

A checkpoint is written into a temporary sibling directory, each file flushed to disk, and then renamed into
place: a rename within one filesystem is atomic, so a process killed at any instant (SIGKILL included) leaves
either the previous complete checkpoints or the new complete one, plus at most a `.tmp-*` directory that the
next resume deletes. Resume restores the trainable tensors, the optimizer, every RNG and the data position, so
on CPU a resumed run continues bit for bit as the uninterrupted run would have.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{6,})$")


class RunError(ValueError):
    """A run directory that cannot be used as asked; the message names it and says what to do."""


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, a run directory that cannot be used as asked. Writes nothing."""
    if resume and overwrite:
        raise RunError("--resume and --overwrite contradict each other: pick one")
    if resume and not (out / "config.json").is_file():
        raise RunError(f"{out}: nothing to resume (no config.json); drop --resume to start a new run")
    if not resume and not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{out}: already exists and is not empty; pass --resume to continue it or "
                       f"--overwrite to replace it")


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Create `out` (deleting it first with --overwrite), or accept it for --resume."""
    check_run_dir(out, resume, overwrite)
    if resume:
        return
    if overwrite and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def write_json_atomic(path: Path, value) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ RNG state

def rng_state() -> dict:
    """Every RNG this process draws from. CUDA: the current device's only (a process drives one GPU; asking
    every visible GPU would create a CUDA context on each, in every torchrun process)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        if isinstance(state["cuda"], (list, tuple)):  # older checkpoints: every visible device's state
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------ checkpoints

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out: Path, step: int, trainable: dict, optimizer, state: dict, keep: int = 2,
                    rng: dict | None = None) -> Path:
    """Atomically write checkpoint `step` (trainable tensors by name, optimizer, RNGs, a JSON-able state dict)
    and delete all but the newest `keep` complete checkpoints. rng: what to store as the RNG state (train.py
    gathers every process's under torchrun); None: this process's rng_state()."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:06d}-", dir=root))
    tensors = {name: t.detach().contiguous().cpu() for name, t in trainable.items()}
    save_file(tensors, str(staging / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), staging / "optimizer.pt")
    torch.save(rng if rng is not None else rng_state(), staging / "rng.pt")
    write_json_atomic(staging / "state.json", {"step": step, **state})
    for file in staging.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(staging)
    if final.exists():  # a checkpoint of this step from a run that was resumed before it: replace it
        shutil.rmtree(final)
    os.rename(staging, final)
    _fsync_dir(root)
    for old in complete_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories of interrupted saves are not listed)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def load_checkpoint(path: Path):
    """(trainable tensors, optimizer state, rng state, state dict) of one checkpoint directory."""
    try:
        trainable = load_file(str(path / "trainable.safetensors"))
        optimizer_state = torch.load(path / "optimizer.pt", weights_only=False)
        rng = torch.load(path / "rng.pt", weights_only=False)
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError) as error:
        raise RunError(f"{path}: unreadable checkpoint ({error})") from None
    return trainable, optimizer_state, rng, state


def clean_interrupted_saves(out: Path) -> None:
    root = out / "checkpoints"
    if root.is_dir():
        for p in root.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ metrics log

class MetricsLog:
    """metrics.jsonl, one object per logged step. On resume, lines past the checkpoint's step are dropped so the
    log reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.enabled:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()


# ------------------------------------------------------------------------------------------------ stop signals

class StopSignals:
    """SIGINT/SIGTERM set a flag the loop checks after each optimizer step (then it saves and exits cleanly).
    A second signal while the flag is set falls back to the default behaviour (immediate exit); checkpoints
    stay consistent because saves are atomic."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
