"""Rater groups holding whole rankings: populations the paper's propositions do not cover, and their pair files.

The world's opinion pairs are Bradley-Terry in the population p (data/world/pairs.py), where Prop. A.1's optimum
pi ∝ pi_ref^(beta/alpha) p^(1/alpha) is exact. Here a population of one question is a list of groups, each a share
w_g of the raters holding one full ranking of the options, and everything a rater says follows from that ranking:

    top-choice share   p_best(y)       = sum_g w_g [g ranks y first]
    pairwise share     P(y_i > y_j)    = sum_g w_g [g ranks y_i above y_j]

A Plackett-Luce population (each ranking picks its next option with probability ∝ p among those left) has
p_best = p and P(y_i > y_j) = p_i / (p_i + p_j): Bradley-Terry, the case Prop. A.1 assumes. The other structures
give one group per option, share p_i with y_i its favourite, so p_best = p again, and differ only in how each group
orders the rest. The propositions see p_best only and so predict the same optimum for all of them; the loss sees
only the pairwise shares, and its minimiser over the options is the Bradley-Terry fit of P (Zermelo 1929), which
equals p only when P is Bradley-Terry.

  consensus      after its favourite each group follows the population's order (most popular first)
  single-peaked  the options lie on a line in the order written; each group ranks them by distance from its
                 favourite (nearer first, the earlier-written on a tie): the median group's favourite beats every
                 other option in a head-to-head vote (Black 1948)
  polarised      every group but the majority ranks the majority's favourite last, and ranks the largest minority's
                 favourite second (a compromise); the majority orders the rest as the population does

With 0.55 / 0.20 / 0.15 / 0.10 (the world's first question) the polarised population's compromise, favourite of
only 0.20, wins 0.85 and 0.90 of its other head-to-head votes and loses only to the majority's, 0.45 to 0.55; its
Bradley-Terry fit ranks it first. Every structure keeps each pair contested (group i ranks y_i above y_j, group j
the reverse), so the soft labels are strictly between 0 and 1 and the loss has a finite minimiser.

Files in TRL's layout, as data/world/pairs.py writes them: "soft" (one record per pair, chosen the more preferred,
chosen_prob = max(P, 1 - P)) and "sampled" (k hard labels per pair, each the verdict of one rater drawn from the
population: chosen = y_i with probability P(y_i > y_j)).
"""
from __future__ import annotations

import itertools
import random

STRUCTURES = ("plackett-luce", "consensus", "single-peaked", "polarised")


def plackett_luce_rankings(population) -> list[tuple[float, tuple[int, ...]]]:
    """Every ranking of the K options with its Plackett-Luce probability: prod_t p_(r_t) / (1 - p_(r_1) - ... -
    p_(r_(t-1))). K! groups (K <= 5 in the world: 120)."""
    groups = []
    for ranking in itertools.permutations(range(len(population))):
        share, left = 1.0, 1.0
        for option in ranking:
            share *= population[option] / left
            left -= population[option]
        groups.append((share, ranking))
    return groups


def group_rankings(population, structure: str) -> list[tuple[float, tuple[int, ...]]]:
    """(share, ranking) per group of a question's raters; a ranking lists option indices, favourite first."""
    k = len(population)
    by_share = sorted(range(k), key=lambda i: (-population[i], i))  # the population's order
    if structure == "plackett-luce":
        return plackett_luce_rankings(population)
    if structure == "consensus":
        rankings = [(f, *(o for o in by_share if o != f)) for f in range(k)]
    elif structure == "single-peaked":
        rankings = [tuple(sorted(range(k), key=lambda o: (abs(o - f), o))) for f in range(k)]
    elif structure == "polarised":
        majority, compromise = by_share[0], by_share[1]
        rankings = []
        for f in range(k):
            if f == majority:
                rankings.append(tuple(by_share))
                continue
            rest = [o for o in by_share if o not in (f, majority, compromise)]
            middle = rest if f == compromise else [compromise, *rest]
            rankings.append((f, *middle, majority))
    else:
        raise ValueError(f"group_rankings: structure must be one of {', '.join(STRUCTURES)}, got {structure!r}")
    return [(population[f], ranking) for f, ranking in enumerate(rankings)]


def top_choice_shares(groups, k: int) -> list[float]:
    """p_best(y_i) = sum_g w_g [g ranks y_i first]."""
    shares = [0.0] * k
    for share, ranking in groups:
        shares[ranking[0]] += share
    return shares


def pairwise_shares(groups, k: int) -> list[list[float]]:
    """P[i][j] = sum_g w_g [g ranks y_i above y_j] (P[i][i] = 0; P[i][j] + P[j][i] = total share)."""
    matrix = [[0.0] * k for _ in range(k)]
    for share, ranking in groups:
        for above, below in itertools.combinations(ranking, 2):  # every ordered pair the ranking decides
            matrix[above][below] += share
    return matrix


def ranking_records(questions, structure: str, mode: str, k: int = 1, rng: random.Random | None = None) -> list[dict]:
    """Every unordered option pair (i < j) of every question as TRL-layout records {"id", "prompt", "chosen",
    "rejected"} (+ "chosen_prob" for soft), the population of each question given by `structure` on its p.

    soft:    one record, chosen = the more preferred, chosen_prob = max(P_ij, P_ji)
    sampled: k records, each chosen = y_i with probability P_ij (one rater drawn from the groups by share)
    """
    if mode not in ("soft", "sampled"):
        raise ValueError(f"ranking_records: mode must be soft or sampled, got {mode!r}")
    if mode == "sampled" and (rng is None or not (isinstance(k, int) and k >= 1)):
        raise ValueError(f"ranking_records: mode 'sampled' needs an rng and an integer k >= 1, got k = {k!r}")
    records = []
    for q in questions:
        matrix = pairwise_shares(group_rankings(q.population, structure), len(q.options))
        for i, j in itertools.combinations(range(len(q.options)), 2):
            prob = matrix[i][j] / (matrix[i][j] + matrix[j][i])
            if mode == "soft":
                order = (i, j) if prob >= 0.5 else (j, i)
                records.append(_record(q, *order) | {"chosen_prob": max(prob, 1.0 - prob)})
            else:
                records += [_record(q, *((i, j) if rng.random() < prob else (j, i))) for _ in range(k)]
    return records


def _record(question, winner: int, loser: int) -> dict:
    return {"id": question.id, "prompt": question.prompt, "chosen": question.options[winner],
            "rejected": question.options[loser]}
