"""Pictures of a run: curves.png at the end (and `python -m spl.plot RUN_DIR`), TensorBoard scalars with --tensorboard.

Oracles: the PNG file format (its signature and the size matplotlib was asked for, read back by matplotlib's own
reader), the invariant that redrawing from metrics.jsonl gives the same bytes, TensorBoard's own event reader
(tensorboard.backend.event_processing) against metrics.jsonl, and one-line messages when the optional packages
are absent (simulated: a module set to None in sys.modules is one Python cannot import).
"""
import json
import sys

import pytest

import train
from spl import plot


def args(tiny, out, *extra):
    return ["--model", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out), "--steps", "3",
            "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1", "--lora-rank", "2", "--no-progress",
            "--max-length", "40", "--max-prompt-length", "24", "--threads", "1", "--eval-fraction", "0.25",
            "--eval-every", "2", *extra]


def test_curves_png_at_the_end_and_redrawn_the_same(tiny_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread
    out = tmp_path / "run"
    assert train.main(args(tiny_run, out)) == 0
    picture = out / "curves.png"
    assert f"curves: {picture}" in capsys.readouterr().out
    data = picture.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(picture).shape[:2] == (round(3.4 * 90), round(3 * 4.2 * 90))  # 3 panels at 90 dpi
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert plot.curves(records, "loss")[0] == [1, 2, 3] and plot.curves(records, "eval_loss")[0] == [2, 3]
    picture.unlink()
    assert plot.main([str(out)]) == 0 and picture.read_bytes() == data


def test_without_matplotlib_no_picture_and_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "run"
    assert train.main(args(tiny_run, out)) == 0
    assert not (out / "curves.png").exists() and "curves:" not in capsys.readouterr().out
    assert plot.main([str(out)]) == 1
    assert capsys.readouterr().err.strip() == ("spl.plot: error: drawing needs the optional package matplotlib: "
                                              "pip install matplotlib")
    assert plot.main([str(tmp_path)]) == 1
    assert "no such file (is" in capsys.readouterr().err


def test_tensorboard_scalars_equal_metrics_jsonl(tiny_run, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    assert train.main(args(tiny_run, out, "--tensorboard", "--no-plot")) == 0
    assert not (out / "curves.png").exists()
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for tag, key in (("train/loss", "loss"), ("train/reward_accuracy", "reward_accuracy"), ("eval/loss", "eval_loss"),
                     ("eval/margin", "eval_margin")):
        steps, values = plot.curves(records, key)
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == steps
        assert [s.value for s in scalars] == pytest.approx(values, rel=1e-6, abs=1e-7)  # stored as float32


def test_tensorboard_absent_is_refused_at_start_up(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    out = tmp_path / "run"
    assert train.main(args(tiny_run, out, "--tensorboard")) == 2
    assert capsys.readouterr().err.strip() == ("train.py: error: --tensorboard needs the optional package "
                                              "tensorboard: pip install tensorboard")
    assert not out.exists()
