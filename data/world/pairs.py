"""The embedded world's preferences: Bradley-Terry groups of candidates written as pairs, and the fits back.

Preferences are Bradley-Terry everywhere (Eq. 2) with reward r = log p over a group of candidates for one
prompt: P(y_i > y_j) = sigma(r_i - r_j) = p_i / (p_i + p_j). `preference_records` writes a group as pairs in
TRL's layout {"id", "prompt", "chosen", "rejected"} in three forms: "counts" (K comparisons per unordered pair,
round(K sigma) of them to the first), "sampled" (each winner drawn with probability sigma) and "soft" (one
record per pair with `chosen_prob` = sigma, the exact form).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import random


@dataclasses.dataclass(frozen=True)
class PreferenceGroup:
    """Candidate responses to one prompt and the population's distribution over them (reward r = log p)."""
    id: str
    prompt: str
    candidates: tuple[str, ...]
    population: tuple[float, ...]


def preference_probability(p_i: float, p_j: float) -> float:
    """P(y_i > y_j) = sigma(log p_i - log p_j) = p_i / (p_i + p_j)  (Eq. 2 with r = log p)."""
    return p_i / (p_i + p_j)


def split_counts(prob: float, k: int) -> int:
    """How many of k comparisons prefer the first response: round(k * prob), halves up, so |n/k - prob| <= 1/(2k).
    The 1e-9 keeps an exact half that floating point put just below .5 (e.g. k * 0.75 with k = 2) rounding up."""
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"split_counts: k must be an integer >= 1, got {k!r}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"split_counts: prob must be in [0, 1], got {prob!r}")
    return min(k, math.floor(k * prob + 0.5 + 1e-9))


def preference_records(groups, mode: str, k: int = 1, rng: random.Random | None = None) -> list[dict]:
    """Every unordered candidate pair (i < j) of every group as TRL-layout records.

    counts:  k records, split_counts(sigma_ij, k) with chosen = y_i, the rest with chosen = y_j
    sampled: k records, each winner y_i with probability sigma_ij (needs rng)
    soft:    one record, chosen = the more preferred of the two, chosen_prob = max(sigma_ij, 1 - sigma_ij)
    """
    if mode not in ("counts", "sampled", "soft"):
        raise ValueError(f"preference_records: mode must be counts, sampled or soft, got {mode!r}")
    if mode == "sampled" and rng is None:
        raise ValueError("preference_records: mode 'sampled' needs an rng")
    records = []
    for group in groups:
        for i, j in itertools.combinations(range(len(group.candidates)), 2):
            prob = preference_probability(group.population[i], group.population[j])
            first, second = group.candidates[i], group.candidates[j]
            if mode == "soft":
                chosen, rejected = (first, second) if prob >= 0.5 else (second, first)
                records.append({"id": group.id, "prompt": group.prompt, "chosen": chosen, "rejected": rejected,
                                "chosen_prob": max(prob, 1.0 - prob)})
                continue
            if mode == "counts":
                wins = split_counts(prob, k)
                winners = [True] * wins + [False] * (k - wins)
            else:
                winners = [rng.random() < prob for _ in range(k)]
            for first_wins in winners:
                chosen, rejected = (first, second) if first_wins else (second, first)
                records.append({"id": group.id, "prompt": group.prompt, "chosen": chosen, "rejected": rejected})
    return records


def bradley_terry_fit(wins, iterations: int = 10_000, tol: float = 1e-13) -> list[float]:
    """Maximum-likelihood p (summing to 1) for a win matrix, wins[i][j] = times i was preferred to j, by
    Hunter's MM update p_i <- W_i / sum_{j != i} n_ij / (p_i + p_j), with W_i = sum_j wins[i][j] and
    n_ij = wins[i][j] + wins[j][i]. For counts files this is the population the data actually encodes."""
    n = len(wins)
    p = [1.0 / n] * n
    for _ in range(iterations):
        new = [sum(wins[i]) / sum((wins[i][j] + wins[j][i]) / (p[i] + p[j]) for j in range(n) if j != i)
               for i in range(n)]
        total = sum(new)
        new = [x / total for x in new]
        if max(abs(a - b) for a, b in zip(new, p)) < tol:
            return new
        p = new
    return p


def counts_population(population, k: int) -> list[float]:
    """The Bradley-Terry fit of the 'counts' records of one group: p as rounded to k comparisons per pair."""
    n = len(population)
    wins = [[0.0] * n for _ in range(n)]
    for i, j in itertools.combinations(range(n), 2):
        wins[i][j] = split_counts(preference_probability(population[i], population[j]), k)
        wins[j][i] = k - wins[i][j]
    return bradley_terry_fit(wins)


def apportion(weights, total: int) -> list[int]:
    """Integer counts summing to `total` in proportion to `weights` (largest remainder; ties to the first)."""
    scale = total / sum(weights)
    counts = [math.floor(w * scale) for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(weights[i] * scale - counts[i]), i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts
