"""What the four experiment scripts (eval/exp_*.py) share: argument parsing, result files and the optional plot.

Each experiment is one command that prints a table and writes CSVs (and a PNG when matplotlib is installed) to its
--out directory; these helpers keep the four doing that the same way. matplotlib is never a requirement:
`pyplot()` returns None without it and the scripts skip the plot.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def experiment_parser(doc: str, out: str, quick_help: str, ratios_help: str, beta: float, steps: int | str, lr,
                      steps_help: str = "training steps per policy",
                      lr_help: str | None = None) -> argparse.ArgumentParser:
    """The options every experiment takes, in one place: --out, --quick, --ratios, --beta, --steps, --lr,
    --threads, --progress. Each experiment adds its own after these. lr None: train.py's own default (not passed)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--out", default=out, help="output directory")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--ratios", help=ratios_help)
    p.add_argument("--beta", type=float, default=beta)
    p.add_argument("--steps", type=int, help=f"{steps_help} (default {steps})")
    p.add_argument("--lr", type=float, default=lr, help=lr_help or (f"peak learning rate (default {lr:g})" if lr
                   is not None else "peak learning rate (default: train.py's, the main job's)"))
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (default 0: as train.py, one for the world's small model on CPU)")
    p.add_argument("--progress", action="store_true", help="train.py's progress bars")
    return p


def option(value, quick: dict, key: str, default):
    """An option's value: as given (0 included, so that a check refuses it rather than the default replacing it),
    else --quick's (`quick` is {} without --quick), else the default."""
    return value if value is not None else quick.get(key, default)


def parse_list(parser: argparse.ArgumentParser, name: str, text: str | None, default, kind=float) -> tuple:
    """A comma-separated option ("1,1.5,2") as a tuple of `kind`; `default` when the option was not given. A value
    that does not parse is a usage error naming the option (argparse's exit 2)."""
    if text is None:
        return tuple(default)
    try:
        return tuple(kind(x) for x in text.split(","))
    except ValueError:
        parser.error(f"{name}: expected comma-separated {'integers' if kind is int else 'numbers'}, got {text!r}")


def check_arguments(parser: argparse.ArgumentParser, checks) -> None:
    """`checks`: (condition, message) pairs; the first that fails is a usage error with its message (exit 2)."""
    for ok, message in checks:
        if not ok:
            parser.error(message)


def run_name(alpha: float, beta: float) -> str:
    """The training-run directory of one (alpha, beta): "alpha0.2_beta0.1". Runs are reused by train_policy when
    their configuration is unchanged, so the name only has to tell the sweep's points apart."""
    return f"alpha{alpha:g}_beta{beta:g}"


def alpha_for(ratio: float, beta: float) -> float:
    """alpha = ratio * beta, rounded so that 1.1 * 0.1 is 0.11 (not 0.11000000000000001) in names and configs."""
    return round(ratio * beta, 10)


def first_records(out: Path, source: Path, max_records: int | None) -> Path:
    """`source` itself (a JSON Lines file), or its first max_records lines copied into out (the --quick runs)."""
    if max_records is None:
        return source
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)[:max_records]
    path = out / f"{source.stem}_first{max_records}.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    """rows (dicts with the same keys, in the first row's order) as a CSV with a header line."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    """(header, rows) of a CSV written by write_csv; every value is a string, as the csv module reads it."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def write_jsonl(path: Path, records) -> Path:
    """One JSON object per line (non-ASCII text kept as is)."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    return path


def write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    return path


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed (it stays an optional
    extra: the CSVs are the results, the PNG a convenience)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, figure, path: Path, dpi: int = 110) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def git_commit() -> str:
    """The git commit the code runs on, with "+dirty" when tracked files differ from it ("unknown" outside a git
    checkout): written beside an experiment's results so that every figure names the code that made it."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
