"""train.py's options say what they do: checkpoints by default on long runs, presets overridable flag by flag,
warnings, help text, lengths against the model's context, what config.json and train.log keep.

Oracles: invariants of the run directory (which checkpoints exist after N steps), the parser's own list of
options (every one has help), the model's config.json (max_position_embeddings), and the lines the run printed.
"""
import json
from pathlib import Path

import pytest

import train
from spl.config import PRESETS, parse_args


def args(tiny, out, *extra):
    return ["--model", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out), "--steps", "3",
            "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1", "--lora-rank", "2", "--lora-alpha", "4",
            "--no-progress", "--max-length", "40", "--max-prompt-length", "24", "--threads", "1", *extra]


def checkpoints(out):
    folder = Path(out) / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_checkpoints_by_default_every_500_steps_and_the_last_two_kept(tiny_run, tmp_path):
    """The default --save-every is 500 (a crash of the paper's 5000-step recipe loses at most 500 steps): a run
    shorter than that writes none; a period that fits keeps its last two checkpoints, the final step's among them."""
    assert parse_args(["--model", "m", "--data", "d"]).save_every == 500
    assert parse_args([]).save_every == 500 and parse_args([]).keep_checkpoints == 2
    out = tmp_path / "short"
    assert train.main(args(tiny_run, out)) == 0
    assert checkpoints(out) == []
    out = tmp_path / "periodic"
    assert train.main(args(tiny_run, out, "--steps", "7", "--save-every", "2")) == 0
    assert checkpoints(out) == ["step_000006", "step_000007"]
