"""A training run's directory: its lock, resolved config, metrics log, verified checkpoints, resume, stop signals.

    out/
      .lock                   held (flock) by the one process using the directory; names it (pid, host, start)
      config.json             the resolved training options (written once; checked on --resume)
      metrics.jsonl           one JSON object per logged step
      checkpoints/step_000100/  a checkpoint (complete with its manifest, or absent):
        trainable.safetensors   the trained tensors by parameter name (LoRA A and B, or every weight)
        optimizer.safetensors   AdamW's per-parameter tensors, "state.<i>.<name>" (exp_avg, exp_avg_sq, step)
        optimizer.json          everything else of optimizer.state_dict(): param_groups (lr, betas, ...), scalars
        rng.safetensors         per process r: "rank<r>.torch", "rank<r>.cuda" (where used), "rank<r>.numpy" keys
        rng.json                per process: numpy's position and Gaussian cache, Python random's state
        state.json              the step and the data position
        manifest.json           size and sha256 of each file above, written last (models/files.py)
      adapter/                the final LoRA adapter in PEFT's format (or model/ for a full fine-tune)

Nothing here can execute code when read: tensors are safetensors, the rest JSON (no pickle, no torch.load). A
checkpoint is published atomically (models/files.py: temporary sibling, fsync, manifest last, rename), so a
process killed at any instant (SIGKILL included) leaves the previous complete checkpoints or the new complete
one, plus at most a staging directory that the next resume deletes. Loading verifies the manifest first; resume
takes the newest checkpoint that verifies and loads, saying in one line why each newer one was passed over.
Resume restores the trainable tensors, the optimizer, every RNG and the data position, so a resumed run
continues bit for bit as the uninterrupted run would have.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.checkpoint import save_pretrained
from models.files import (IntegrityError, is_staging, publish_directory, verify_directory, write_file_atomic,
                          write_json_atomic)
from models.peft import save_adapter
from spl.files import RunError, writing
from spl.signals import StopSignals, Stopped  # noqa: F401
from spl.rundir import (RunLock, check_out, check_resumed_config, check_resumed_inputs, check_run_dir,  # noqa: F401
                        has_marker, prepare_run_dir)

__all__ = ["RunError", "RunLock", "writing", "check_out", "check_run_dir", "check_resumed_config",
           "check_resumed_inputs", "prepare_run_dir", "has_marker", "write_json_atomic", "rng_state", "set_rng_state",
           "rng_state_to_json", "rng_state_from_json", "save_checkpoint", "load_checkpoint", "complete_checkpoints",
           "checkpoint_dirs", "load_latest_checkpoint", "clean_interrupted_saves", "worth_keeping", "kept_note",
           "check_finite_reference", "save_outputs", "MetricsLog", "StopSignals", "Stopped"]

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{6,})$")


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
        torch.cuda.set_rng_state(state["cuda"])


def rng_state_to_json(state: dict) -> dict:
    """One process's rng_state() as JSON (exact: bytes and words as integers; Python's repr of a float reads back
    as the same float), to send it between processes (spl/distributed.py gather_to_main)."""
    value = {"torch": state["torch"].tolist(), **_numpy_python_to_json(state)}
    if "cuda" in state:
        value["cuda"] = state["cuda"].cpu().tolist()
    return value


def _numpy_python_to_json(state: dict) -> dict:
    kind, keys, position, has_gauss, cached_gaussian = state["numpy"]
    version, words, gauss_next = state["python"]
    return {"numpy": {"kind": kind, "keys": [int(k) for k in keys], "position": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
            "python": {"version": version, "words": list(words), "gauss_next": gauss_next}}


def rng_state_from_json(value: dict) -> dict:
    """rng_state_to_json's inverse: the state set_rng_state takes."""
    numpy_state, python_state = value["numpy"], value["python"]
    state = {"torch": torch.tensor(value["torch"], dtype=torch.uint8),
             "numpy": (numpy_state["kind"], np.asarray(numpy_state["keys"], dtype=np.uint32), numpy_state["position"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"]),
             "python": (python_state["version"], tuple(python_state["words"]), python_state["gauss_next"])}
    if "cuda" in value:
        state["cuda"] = torch.tensor(value["cuda"], dtype=torch.uint8)
    return state


def _rng_to_files(per_rank: list[dict]) -> tuple[dict, dict]:
    """Per-process RNG states as (tensors, JSON): torch's and CUDA's byte states and numpy's 624 MT19937 words
    as tensors; numpy's position and cached Gaussian, and Python's (version, 625 words, gauss_next), as JSON."""
    tensors, meta = {}, {"processes": len(per_rank), "ranks": []}
    for rank, state in enumerate(per_rank):
        tensors[f"rank{rank}.torch"] = state["torch"].contiguous()
        if "cuda" in state:
            tensors[f"rank{rank}.cuda"] = state["cuda"].cpu().contiguous()
        as_json = _numpy_python_to_json(state)
        numpy_state = as_json["numpy"]
        tensors[f"rank{rank}.numpy"] = torch.tensor(numpy_state.pop("keys"), dtype=torch.int64)  # uint32 words
        meta["ranks"].append({"numpy": numpy_state, "python": as_json["python"]})
    return tensors, meta


def _rng_from_files(tensors: dict, meta: dict) -> list[dict]:
    per_rank = []
    for rank, entry in enumerate(meta["ranks"]):
        value = {"torch": [], "numpy": {**entry["numpy"], "keys": tensors[f"rank{rank}.numpy"].tolist()},
                 "python": entry["python"]}
        state = rng_state_from_json(value) | {"torch": tensors[f"rank{rank}.torch"]}
        if f"rank{rank}.cuda" in tensors:
            state["cuda"] = tensors[f"rank{rank}.cuda"]
        per_rank.append(state)
    return per_rank


# ------------------------------------------------------------------------------------------------ optimizer state

def _to_json(value):
    """A state-dict value as JSON; tuples tagged so that they come back as tuples (AdamW's betas)."""
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint's JSON")


def _from_json(value):
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _optimizer_to_files(state_dict: dict) -> tuple[dict, dict]:
    """optimizer.state_dict() as (tensors "state.<param index>.<name>", JSON of everything else)."""
    tensors, scalars = {}, {}
    for index, entries in state_dict["state"].items():
        scalars[str(index)] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[str(index)][name] = _to_json(value)
    return tensors, {"param_groups": _to_json(state_dict["param_groups"]), "state": scalars}


def _optimizer_from_files(tensors: dict, meta: dict) -> dict:
    state = {int(index): _from_json(entries) for index, entries in meta["state"].items()}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    return {"state": state, "param_groups": _from_json(meta["param_groups"])}


# ------------------------------------------------------------------------------------------------ checkpoints

def save_checkpoint(out: Path, step: int, trainable: dict, optimizer, state: dict, keep: int = 2,
                    rng: dict | None = None) -> Path:
    """Publish checkpoint `step` (trainable tensors by name, optimizer, RNGs, a JSON-able state dict) and delete
    all but the newest `keep` complete checkpoints. rng: what to store as the RNG state, {"per_rank": [...]}
    (train.py gathers every process's under torchrun) or one process's; None: this process's rng_state().

    A save that fails (a full disk, no permission) raises RunError saying so in one line; the directory holds
    exactly the checkpoints it held before (the failed one's staging directory is removed)."""
    root = out / "checkpoints"
    final = root / f"step_{step:06d}"
    rng = rng if rng is not None else rng_state()
    per_rank = rng["per_rank"] if "per_rank" in rng else [rng]
    optimizer_tensors, optimizer_meta = _optimizer_to_files(optimizer.state_dict())
    rng_tensors, rng_meta = _rng_to_files(per_rank)
    previous = [p for p in complete_checkpoints(out) if p != final]
    kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
    with writing(final, kept, failed="checkpoint not saved"):  # a full disk: one line; the staging directory is removed
        with publish_directory(final, overwrite=True) as staging:  # overwrite: a step redone after a resume
            save_file({name: t.detach().cpu().contiguous() for name, t in trainable.items()},
                      str(staging / "trainable.safetensors"))
            save_file(optimizer_tensors, str(staging / "optimizer.safetensors"))
            (staging / "optimizer.json").write_text(json.dumps(optimizer_meta) + "\n", encoding="utf-8")
            save_file(rng_tensors, str(staging / "rng.safetensors"))
            (staging / "rng.json").write_text(json.dumps(rng_meta) + "\n", encoding="utf-8")
            (staging / "state.json").write_text(json.dumps({"step": step, **state}, indent=2) + "\n",
                                                encoding="utf-8")
    for old in complete_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dirs(out: Path) -> list[Path]:
    """Every step_* directory under out/checkpoints, oldest first, complete or not."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints that were completely written (their manifest exists), oldest first; not yet verified."""
    return [p for p in checkpoint_dirs(out) if (p / "manifest.json").is_file()]


def _read_tensors(path: Path) -> dict:
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def worth_keeping(out: Path) -> bool:
    """Whether a run directory holds what a user would want back: a complete checkpoint, or its finished
    adapter or model. A new run that fails or is stopped without either removes its directory (train.py)."""
    return bool(complete_checkpoints(out)) or any((out / name / "manifest.json").is_file()
                                                  for name in ("adapter", "model"))


def save_outputs(out: Path, model, head, base_model: str, tokenizer_path, lora: bool, report: dict | None) -> None:
    """A finished run's outputs: adapter/ in PEFT's format (plus reward_head.safetensors when there is a head) for
    a LoRA run, else model/ in HF's format; report.json when given. Each is published atomically and goes through
    the write path: a full disk is one line naming it and the last checkpoint, which is intact."""
    kept = kept_note(out)
    if lora:
        extra = {"reward_head.safetensors": head.state_dict()} if head is not None else None
        with writing(out / "adapter", kept):
            save_adapter(model, out / "adapter", base_model_name_or_path=base_model, overwrite=True,
                         extra_tensors=extra)
        print(f"adapter: {out / 'adapter'} (PEFT format)")
    else:
        with writing(out / "model", kept):
            save_pretrained(model, out / "model", tokenizer_path=tokenizer_path, overwrite=True)
        print(f"model: {out / 'model'} (HF format)")
    if report is not None:
        with writing(out / "report.json", kept):
            write_json_atomic(out / "report.json", report)


def kept_note(out: Path) -> str:
    """What a failed write of a run's outputs leaves: "the last checkpoint ... is intact", or "" if none."""
    saved = complete_checkpoints(out)
    return f"the last checkpoint {saved[-1]} is intact" if saved else ""


def check_finite_reference(ref_chosen_logps, ref_rejected_logps) -> None:
    """Reference log-probs [N] must be finite: a NaN would poison every step (and the cache). RunError naming how
    many pairs and the first."""
    finite = torch.isfinite(ref_chosen_logps) & torch.isfinite(ref_rejected_logps)  # [N]
    if not bool(finite.all()):
        first = int((~finite).nonzero()[0])
        raise RunError(f"reference log-probs are NaN or infinite for {int((~finite).sum())} of {len(finite)} pairs "
                       f"(the first: pair {first}); the model overflows on this data: check its weights and "
                       f"config.json (rope_theta, rms_norm_eps, dtype)")


def load_checkpoint(path: Path):
    """(trainable tensors, optimizer state dict, {"per_rank": [rng state per process]}, state dict) of one
    checkpoint directory, after verifying it against its manifest; RunError naming the file otherwise."""
    path = Path(path)
    try:
        verify_directory(path)
    except IntegrityError as error:
        raise RunError(f"damaged checkpoint: {error}") from None
    file = path
    try:
        file = path / "trainable.safetensors"
        trainable = _read_tensors(file)
        file = path / "optimizer.json"
        optimizer_state = _optimizer_from_files(_read_tensors(path / "optimizer.safetensors"), _read_json(file))
        file = path / "rng.json"
        rng = {"per_rank": _rng_from_files(_read_tensors(path / "rng.safetensors"), _read_json(file))}
        file = path / "state.json"
        state = _read_json(file)
        step = state["step"]
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step {step!r} is not a step number")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError,
            SafetensorError) as error:
        raise RunError(f"{file}: unreadable checkpoint ({type(error).__name__}: {error})") from None
    return trainable, optimizer_state, rng, state


def load_latest_checkpoint(out: Path, say=print):
    """(path, load_checkpoint(path)) of the newest checkpoint that verifies and loads, or None when the run has
    none yet. Each newer one that fails is reported by `say` in one line and passed over; when every one fails,
    RunError names the newest's problem (nothing is resumed from a damaged checkpoint)."""
    candidates = checkpoint_dirs(out)
    errors = []
    for path in reversed(candidates):
        try:
            return path, load_checkpoint(path)
        except RunError as error:
            errors.append(str(error))
            say(f"{error}; trying the checkpoint before it" if path != candidates[0] else str(error))
    if errors:
        raise RunError(f"{out / 'checkpoints'}: no usable checkpoint ({errors[0]}); start afresh with --overwrite")
    return None


def clean_interrupted_saves(out: Path) -> None:
    """Delete what interrupted publishes left under out/checkpoints (their staging directories)."""
    root = out / "checkpoints"
    if root.is_dir():
        for p in root.iterdir():
            if is_staging(p) or p.name.startswith(".tmp-"):  # .tmp-*: staging names of earlier versions
                shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ metrics log

class MetricsLog:
    """metrics.jsonl, one object per logged step. On resume, lines past the checkpoint's step are dropped so the
    log reads as one uninterrupted run; so is a last line cut short by a kill mid-write (with a word to `say`).
    Every write goes through spl/files.py's path: a full disk is one RunError line."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True, say=print):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        with writing(path):
            if resume_step is not None and path.exists():
                kept = _logged_lines(path, resume_step, say)
                write_file_atomic(path, "".join(line + "\n" for line in kept))
            self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.enabled:
            with writing(self.path):
                self.file.write(json.dumps(record) + "\n")
                self.file.flush()

    def close(self) -> None:
        if self.enabled:
            try:
                self.file.close()
            except OSError:  # what the last flush could not write was already reported by write()
                pass


def _logged_lines(path: Path, resume_step: int, say) -> list[str]:
    """The lines of metrics.jsonl up to `resume_step`. A last line that is not a JSON object is a write cut
    short (a kill, a full disk): dropped, with a word. A bad line before the last is damage: RunError."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = [line for line in text.split("\n") if line.strip()]
    kept = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            step = record.get("step", 0) if isinstance(record, dict) else None
        except (ValueError, RecursionError):
            step = None
        if not isinstance(step, int) or isinstance(step, bool):
            if number == len(lines):
                say(f"{path}:{number}: last line cut short (a write interrupted); dropped it")
                continue
            raise RunError(f"{path}:{number}: not a metrics record; the log is damaged: move it aside to resume")
        if step <= resume_step:
            kept.append(line)
    return kept
