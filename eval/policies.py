"""Policies for the experiments: train one with train.py on the embedded world, or load one back.

Every experiment compares the reference model, DPO and SPL at several global temperatures alpha/beta. A policy
is a train.py run directory; `train_policy` runs train.py in-process (the same loop a user runs) and reuses a
finished run whose config.json matches, so sweeps are cheap to re-run. `load_policy` returns the world's
reference model with the run's adapter loaded (LoRA on, `disable_lora` gives the reference back).
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORLD_MODEL = ROOT / "data" / "world" / "model"


def train_policy(out, data, alpha: float, beta: float, loss: str = "spl", steps: int = 150,
                 extra: tuple = (), progress: bool = False) -> Path:
    """Train (or reuse) a LoRA policy on `data` with train.py; returns the run directory."""
    import train

    out = Path(out)
    argv = ["--data", str(data), "--loss", loss, "--alpha", str(alpha), "--beta", str(beta), "--steps", str(steps),
            "--out", str(out), *map(str, extra)]
    if not progress:
        argv.append("--no-progress")
    wanted = train.parse_args(argv)
    config_path = out / "config.json"
    if (out / "adapter" / "adapter_model.safetensors").is_file() and config_path.is_file():
        import dataclasses

        ignore = ("resume", "overwrite", "progress")
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        wanted = json.loads(json.dumps(dataclasses.asdict(wanted)))
        if {k: v for k, v in saved.items() if k not in ignore} == {k: v for k, v in wanted.items() if k not in ignore}:
            return out  # a finished run of exactly this configuration
    code = train.main(argv + ["--overwrite"])
    if code != 0:
        raise RuntimeError(f"train.py exited {code} for {' '.join(argv)}")
    return out


def load_policy(run_dir=None, device=None, dtype=None):
    """(model, tokenizer): the world's reference model, with the adapter of `run_dir` if given."""
    from models import Tokenizer, load_adapter, load_pretrained

    model = load_pretrained(WORLD_MODEL, dtype=dtype, device=device)
    if run_dir is not None:
        load_adapter(model, Path(run_dir) / "adapter")
    model.eval()
    return model, Tokenizer(WORLD_MODEL / "tokenizer.model")
