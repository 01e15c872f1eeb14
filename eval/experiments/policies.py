"""Policies for the experiments: train one with train.py on the embedded world, or load one back.

Every experiment compares the reference model, DPO and SPL at several global temperatures alpha/beta. A policy
is a train.py run directory; `train_policy` trains it in this process through `train.main`, the entry a user's
command line takes (the same options, the same one-line errors), and reuses a finished run whose config.json
matches the one train.py would write now (spl.config.parse_args), so sweeps are cheap to re-run. `load_policy` returns the world's reference model with the run's
adapter loaded (LoRA on, `disable_lora` gives the reference back).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from data.world import MODEL_DIR
from models import Tokenizer, load_adapter, load_pretrained
from spl.config import OWN_MODEL_PRESET, PRESETS, WORLD_MAIN_JOB, parse_args

IGNORED = ("resume", "overwrite", "progress", "plot", "inputs", "detected_chat_format")  # options that do not change
# what a run trains, and what train.py records beside them in config.json (the inputs' fingerprints, the chat format
# it detected), which parse_args cannot know: without them no finished run ever matched and every sweep retrained


def main_job_options(model: bool = False) -> tuple[str, ...]:
    """The main job's recipe (spl/config.py WORLD_MAIN_JOB: the option-mass anchor, whole prompts per batch, LoRA on
    the seven projections and the output head) as train.py options, for runs that give --data (which, unlike the
    embedded world's default run, do not take that recipe by themselves). With --model (`model=True`) the options
    a preset would otherwise fill are pinned to the world's defaults too, so a run does not silently take the
    paper-chat preset's LoRA dropout 0.05, step size, warm-up and lengths; --steps stays the caller's."""
    extra = ["--anchor", str(WORLD_MAIN_JOB["anchor"]), "--prompts-per-batch", str(WORLD_MAIN_JOB["prompts_per_batch"]),
             "--lora-targets", ",".join(WORLD_MAIN_JOB["lora_targets"])]
    if model:
        defaults = parse_args([])
        for name in PRESETS[OWN_MODEL_PRESET]:
            if name not in ("steps", "epochs", "batch_size", "beta"):  # the caller's, or replaced by the recipe
                extra += ["--" + name.replace("_", "-"), str(getattr(defaults, name))]
    return tuple(extra)


def recipe_line(argv) -> str:
    """One line naming the recipe a policy was trained with (the experiments print it and write it beside their
    results)."""
    return "train.py " + " ".join(map(str, argv))


def train_policy(out, data, alpha: float, beta: float, loss: str = "spl", steps: int = 150,
                 extra: tuple = (), progress: bool = False) -> Path:
    """Train (or reuse) a LoRA policy on `data` with train.py; returns the run directory. No curves.png per
    policy (`--no-plot`): the experiments draw their own figures, and matplotlib takes ~0.5 s a run."""
    out = Path(out)
    argv = ["--data", str(data), "--loss", loss, "--alpha", str(alpha), "--beta", str(beta), "--steps", str(steps),
            "--out", str(out), *map(str, extra), "--no-plot"]
    if not progress:
        argv.append("--no-progress")
    if finished_run_matches(out, argv):
        return out
    import train  # the script's own entry (imported here: train.py imports the world, which this package reads)
    code = train.main([*argv, "--overwrite"])
    if code != 0:
        raise RuntimeError(f"train.py exited {code} for {' '.join(argv)}")
    return out


def finished_run_matches(out: Path, argv: list[str]) -> bool:
    """Whether `out` holds a finished run (its adapter written) of exactly the configuration of `argv`."""
    config_path = out / "config.json"
    if not ((out / "adapter" / "adapter_model.safetensors").is_file() and config_path.is_file()):
        return False
    saved = json.loads(config_path.read_text(encoding="utf-8"))
    wanted = json.loads(json.dumps(dataclasses.asdict(parse_args(argv))))  # as config.json holds it
    return ({k: v for k, v in saved.items() if k not in IGNORED} ==
            {k: v for k, v in wanted.items() if k not in IGNORED})


def load_policy(run_dir=None, device=None, dtype=None, model_dir=MODEL_DIR):
    """(model, tokenizer): the reference model in `model_dir` (the world's by default), with the adapter of
    `run_dir` if given."""
    model = load_pretrained(model_dir, dtype=dtype, device=device)
    if run_dir is not None:
        load_adapter(model, Path(run_dir) / "adapter")
    model.eval()
    return model, Tokenizer(Path(model_dir) / "tokenizer.model")
