"""The best-of-N experiment's statistics: unbiased pass@k per problem, and intervals over problems AND training seeds.

A policy trained with another seed is another policy: an interval over problems alone (`eval.metrics
.bootstrap_interval`) says nothing about whether the next training run would agree. Here every policy setting is
run with S training seeds on the same P problems, so its per-problem values form a [S, P] table, and a difference of
two settings is a [S, P] table of paired differences (same seed index, same problem). The interval resamples both
ways at once (a two-way crossed bootstrap, as for a random-effects design with seeds crossed with problems): each
draw takes S seed rows with replacement and P problem columns with replacement and averages the [S, P] sub-table.
With S = 1 it is exactly `eval.metrics.bootstrap_interval` (the same problem draws: the problem indices are drawn
first from the same generator), which the tests check.
"""
from __future__ import annotations

import numpy as np

from eval.metrics import pass_at_k

LEVEL, RESAMPLES = 0.95, 2000  # the intervals


def ks_up_to(n: int) -> list[int]:
    """1, 2, 4, ... up to n (the paper's best-of-N axis)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"ks_up_to: n must be a positive integer, got {n!r}")
    return [2 ** i for i in range(n.bit_length())]


def pass_table(counts, ks) -> np.ndarray:
    """counts [S, P] of (n, c) pairs -> [K, S, P] unbiased pass@k (`eval.metrics.pass_at_k`, Chen et al. 2021)."""
    return np.array([[[pass_at_k(n, c, k) for n, c in row] for row in counts] for k in ks], dtype=np.float64)


def seed_problem_interval(values, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0):
    """Percentile interval for the mean of values [..., S, P] under the two-way bootstrap (module docstring): every
    leading row is resampled with the same seed and problem indices, so intervals of differences are paired.
    -> (low [...], high [...])."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim < 2 or 0 in x.shape[-2:]:
        raise ValueError(f"seed_problem_interval: expected values [..., S, P] with S, P >= 1, got shape {x.shape}")
    if not 0 < level < 1 or not (isinstance(resamples, int) and resamples >= 1):
        raise ValueError(f"seed_problem_interval: need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    seeds, problems = x.shape[-2:]
    rng = np.random.default_rng(seed)
    problem_picks = rng.integers(0, problems, size=(resamples, problems))  # [R, P] first: S = 1 is bootstrap_interval
    seed_picks = rng.integers(0, seeds, size=(resamples, seeds)) if seeds > 1 else np.zeros((resamples, 1), int)
    means = x[..., seed_picks[:, :, None], problem_picks[:, None, :]].mean((-1, -2))  # [..., R, S, P] -> [..., R]
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=-1)
    return low, high


def samples_to_match(curve, target: float) -> int | None:
    """The smallest N with curve[N - 1] >= target (curve[i] = best-of-(i + 1) accuracy), None when the curve
    never reaches it (Figure 9: the samples a method needs to match DPO's best-of-N)."""
    for index, value in enumerate(curve):
        if value >= target - 1e-12:
            return index + 1
    return None


def _table(rows, label: str, level: int, seeds, problem_ids) -> list[list[tuple[int, int]]]:
    """[S, P] (n, c) of one setting at one level, seeds and problems in the given order."""
    by_key = {(r["seed"], r["problem"]): (r["n"], r["correct"]) for r in rows
              if r["setting"] == label and r["level"] == level}
    return [[by_key[s, p] for p in problem_ids] for s in seeds]


def level_problems(rows, level: int) -> list[str]:
    return sorted({r["problem"] for r in rows if r["level"] == level})


def level_rows(rows, labels, ks, seed: int = 0) -> list[dict]:
    """Per setting and level: pass@k averaged over seeds and problems with its two-way interval."""
    out = []
    for level in sorted({r["level"] for r in rows}):
        problem_ids = level_problems(rows, level)
        for label in labels:
            seeds = sorted({r["seed"] for r in rows if r["setting"] == label and r["level"] == level})
            if not seeds:
                continue
            n = min(r["n"] for r in rows if r["setting"] == label and r["level"] == level)
            setting_ks = [k for k in ks if k <= n]
            values = pass_table(_table(rows, label, level, seeds, problem_ids), setting_ks)  # [K, S, P]
            low, high = seed_problem_interval(values, seed=seed + level)
            row = {"setting": label, "level": level, "seeds": len(seeds), "problems": len(problem_ids), "n": n}
            for i, k in enumerate(setting_ks):
                row[f"pass@{k}"] = float(values[i].mean())
                row[f"pass@{k}_low"], row[f"pass@{k}_high"] = float(low[i]), float(high[i])
            out.append(row)
    return out


def difference_rows(rows, baseline: str, others, ks, seed: int = 0) -> list[dict]:
    """Per level, other setting and k: mean pass@k of the other minus the baseline's, paired over the same seeds
    (seed index) and problems, with the two-way interval. An interval that holds 0 cannot tell them apart."""
    out = []
    for level in sorted({r["level"] for r in rows}):
        problem_ids = level_problems(rows, level)
        seeds = sorted({r["seed"] for r in rows if r["setting"] == baseline and r["level"] == level})
        base = pass_table(_table(rows, baseline, level, seeds, problem_ids), ks)  # [K, S, P]
        for other in others:
            theirs = pass_table(_table(rows, other, level, seeds, problem_ids), ks)
            low, high = seed_problem_interval(theirs - base, seed=seed + level)
            out += [{"level": level, "setting": other, "baseline": baseline, "k": k,
                     "difference": float((theirs[i] - base[i]).mean()), "low": float(low[i]),
                     "high": float(high[i]), "excludes_zero": bool(low[i] > 0 or high[i] < 0)}
                    for i, k in enumerate(ks)]
    return out


def matching_rows(rows, baseline: str, others, num_samples: int, at_ks) -> list[dict]:
    """Figure 9 per level: for each N in at_ks, the samples each other setting needs for the baseline's pass@N
    (the mean over seeds and problems of pass@k for every k = 1..n, from the same counts)."""
    all_ks = list(range(1, num_samples + 1))
    out = []
    for level in sorted({r["level"] for r in rows}):
        problem_ids = level_problems(rows, level)
        seeds = sorted({r["seed"] for r in rows if r["setting"] == baseline and r["level"] == level})
        curve = {label: pass_table(_table(rows, label, level, seeds, problem_ids), all_ks).mean((1, 2))
                 for label in (baseline, *others)}
        for n in at_ks:
            target = float(curve[baseline][n - 1])
            out += [{"level": level, "setting": other, "baseline": baseline, "baseline_samples": n,
                     "baseline_pass": target, "samples_needed": samples_to_match(curve[other], target) or ""}
                    for other in others]
    return out
