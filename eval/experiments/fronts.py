"""Summaries over seeds for the experiments: means with Student t intervals, and Pareto fronts.

A setting measured under several training seeds has one value per seed; `summarise` gives its mean and the 95%
t interval over them (the seeds are independent runs; with 3 seeds t has 2 degrees of freedom, so the interval
is mean -+ 4.30 s / sqrt(3)). A diversity-quality comparison (the paper's Figure 2) asks which settings no other
setting beats on both axes: `pareto_front`.
"""
from __future__ import annotations

import math

T_975 = (12.706204736, 4.30265273, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252,  # df = 1..
         2.306004135, 2.262157163, 2.228138852)  # ..10: Student t's 0.975 quantiles


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def pareto_front(diversity, quality) -> list[bool]:
    """For points (d_i, q_i), both higher-is-better: True where no point j has d_j >= d_i and q_j >= q_i with one
    of the two strict. Equal points are on the front together. NaN (an undefined metric) is never on it."""
    diversity, quality = [float(d) for d in diversity], [float(q) for q in quality]
    if len(diversity) != len(quality):
        raise ValueError(f"pareto_front: {len(diversity)} diversity values for {len(quality)} quality values")
    points = list(zip(diversity, quality))
    beaten = dominated(points, points)
    return [not (math.isnan(d) or math.isnan(q) or out) for (d, q), out in zip(points, beaten)]


def dominated(points, by) -> list[bool]:
    """For each (d, q) in points (both higher-is-better): whether some point of `by` is at least as good on both
    and better on one."""
    return [any(d2 >= d and q2 >= q and (d2 > d or q2 > q) for d2, q2 in by) for d, q in points]


def t_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student t interval over independent runs (seeds), mean -+ t_{df} s / sqrt(n) with
    the sample standard deviation s and df = n - 1 (95% only: T_975 holds t's 0.975 quantiles for df 1..10). One
    value: no interval (NaN ends)."""
    values = [float(v) for v in values]
    if level != 0.95 or not 1 <= len(values) <= len(T_975) + 1:
        raise ValueError(f"t_interval: 95% intervals over 1..{len(T_975) + 1} values, got {len(values)} at {level}")
    centre = mean(values)
    if len(values) == 1:
        return centre, math.nan, math.nan
    spread = math.sqrt(sum((v - centre) ** 2 for v in values) / (len(values) - 1))
    half = T_975[len(values) - 2] * spread / math.sqrt(len(values))
    return centre, centre - half, centre + half


def summarise(rows, keys, by: str) -> list[dict]:
    """Per value of `by` (in first-seen order): its other fields from the first row, then for each key the mean
    over the rows (seeds) and the ends of the 95% t interval (`key_lo`, `key_hi`)."""
    summary = []
    for name in dict.fromkeys(r[by] for r in rows):
        group = [r for r in rows if r[by] == name]
        entry = {k: v for k, v in group[0].items() if k != "seed" and k not in keys}
        entry["seeds"] = len(group)
        for key in keys:
            entry[key], entry[f"{key}_lo"], entry[f"{key}_hi"] = t_interval([r[key] for r in group])
        summary.append(entry)
    return summary


def mark_fronts(summary, panels) -> None:
    """A 0/1 column per (diversity, quality) panel of `panels` (on the seed means): the Pareto front among the trained settings (DPO
    and SPL), as in Figure 2; the reference row, shown for scale, gets empty marks."""
    trained = [row for row in summary if row["method"] != "reference"]
    for diversity, quality in panels:
        on = pareto_front([r[diversity] for r in trained], [r[quality] for r in trained])
        for row in summary:
            row[f"front:{diversity}/{quality}"] = ""
        for row, flag in zip(trained, on):
            row[f"front:{diversity}/{quality}"] = int(flag)
