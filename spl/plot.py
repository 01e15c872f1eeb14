"""Pictures of a run: its training and eval curves as OUT/curves.png, and TensorBoard scalars when asked for.

    python -m spl.plot RUN_DIR          # draw RUN_DIR/curves.png again from RUN_DIR/metrics.jsonl (any run, any time)

train.py draws curves.png at the end of every run when matplotlib is installed (optional: `pip install
matplotlib`; a run without it just has no picture), from metrics.jsonl alone, so the command above draws the same
picture of a finished, stopped or running run. Three panels against the optimizer step: the loss, the reward
accuracy and the margin (for SPL the logit z of Eq. 5), each as trained (the step's batch) and as evaluated on the
held-out pairs (the `eval_` keys, spl/evaluation.py) when there are any; a run without a metric (SFT logs no
margin) leaves its panel out.

With --tensorboard, every metrics.jsonl line also goes to TensorBoard's event files under OUT/tensorboard/ (`train/`
and `eval/` scalars by step; view with `tensorboard --logdir OUT`), through torch.utils.tensorboard, which needs the
optional tensorboard package (`pip install tensorboard`, checked at start-up).
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

PANELS = (("loss", "loss"), ("reward_accuracy", "reward accuracy"), ("margin", "margin"))
PICTURE = "curves.png"


def installed(module: str) -> bool:
    """Whether an optional package imports here."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def read_metrics(run_dir) -> list[dict]:
    """metrics.jsonl's records, in order (a line cut short by a crash mid-write is left out)."""
    records = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def curves(records: list[dict], key: str) -> tuple[list, list]:
    """(steps, values) of `key` over the records that have it."""
    kept = [(r["step"], r[key]) for r in records if key in r and "step" in r]
    return [step for step, _ in kept], [value for _, value in kept]


def draw_curves(run_dir) -> Path | None:
    """Draw run_dir/curves.png from run_dir/metrics.jsonl and return its path; None when matplotlib is not
    installed or there is nothing to draw."""
    if not installed("matplotlib"):
        return None
    import matplotlib
    matplotlib.use("Agg")  # files only: no display needed (a server, a job)
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    panels = [(key, title) for key, title in PANELS if curves(records, key)[0] or curves(records, f"eval_{key}")[0]]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels):
        for name, label, style in ((key, "training batch", "-"), (f"eval_{key}", "held-out pairs", "o-")):
            steps, values = curves(records, name)
            if steps:
                axis.plot(steps, values, style, label=label, markersize=3, linewidth=1.2)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(str(run_dir), fontsize=9)
    figure.tight_layout()
    path = Path(run_dir) / PICTURE
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def check_tensorboard() -> str | None:
    """None when TensorBoard logging can work here, else the one line saying what to install."""
    if not installed("tensorboard"):
        return "--tensorboard needs the optional package tensorboard: pip install tensorboard"
    return None


class TensorBoardLog:
    """metrics.jsonl (a spl.runs.MetricsLog) with every record also written as TensorBoard scalars: the eval_ keys
    as eval/<metric>, the others as train/<metric>, at the record's step."""

    def __init__(self, log, directory: Path):
        from torch.utils.tensorboard import SummaryWriter  # the optional tensorboard package, checked at start-up

        self.log, self.writer = log, SummaryWriter(log_dir=str(directory))

    def write(self, record: dict) -> None:
        self.log.write(record)
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                tag = f"eval/{name.removeprefix('eval_')}" if name.startswith("eval_") else f"train/{name}"
                self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.log.close()
        self.writer.close()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m spl.plot RUN_DIR   (draws RUN_DIR/curves.png from RUN_DIR/metrics.jsonl)",
              file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    if not (run_dir / "metrics.jsonl").is_file():
        print(f"spl.plot: error: {run_dir / 'metrics.jsonl'}: no such file (is {run_dir} a train.py run directory?)",
              file=sys.stderr)
        return 1
    if not installed("matplotlib"):
        print("spl.plot: error: drawing needs the optional package matplotlib: pip install matplotlib",
              file=sys.stderr)
        return 1
    path = draw_curves(run_dir)
    if path is None:
        print(f"spl.plot: error: {run_dir / 'metrics.jsonl'}: no loss, reward accuracy or margin to draw",
              file=sys.stderr)
        return 1
    print(f"curves: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
