"""data/world/rankings.py: rater groups holding whole rankings, their shares and their pair files.

Oracles: the Plackett-Luce marginal P(y_i > y_j) = p_i / (p_i + p_j) (Luce's choice axiom: among the rankings, i comes
before j exactly when i is picked first of the two, with odds p_i : p_j whatever was picked before); a hand-worked
polarised population for the world's first question (0.55 / 0.20 / 0.15 / 0.10, derived below); Black's median-voter
theorem for the single-peaked one; invariants of every population (shares sum to one, each pair's two shares sum to
one, each pair contested, the top-choice shares are the world's p); binomial bounds for the sampled labels.
"""
import itertools
import math
import random

import pytest

from data.world import load_world
from data.world.rankings import (STRUCTURES, group_rankings, pairwise_shares, plackett_luce_rankings,
                                 ranking_records, top_choice_shares)

WORLD = load_world()


@pytest.mark.parametrize("structure", STRUCTURES)
def test_every_population_keeps_the_worlds_top_choice_shares_and_contests_every_pair(structure):
    for q in WORLD.opinions:
        k = len(q.options)
        groups = group_rankings(q.population, structure)
        assert sum(share for share, _ in groups) == pytest.approx(1.0, abs=1e-12)
        assert all(sorted(ranking) == list(range(k)) for _, ranking in groups)  # whole rankings
        assert top_choice_shares(groups, k) == pytest.approx(list(q.population), abs=1e-12)
        matrix = pairwise_shares(groups, k)
        for i, j in itertools.combinations(range(k), 2):
            assert matrix[i][j] + matrix[j][i] == pytest.approx(1.0, abs=1e-12)
            assert 0 < matrix[i][j] < 1


def test_plackett_luce_population_is_bradley_terry_in_p():
    for q in WORLD.opinions:
        p, k = q.population, len(q.options)
        assert len(plackett_luce_rankings(p)) == math.factorial(k)
        matrix = pairwise_shares(group_rankings(p, "plackett-luce"), k)
        for i, j in itertools.permutations(range(k), 2):
            assert matrix[i][j] == pytest.approx(p[i] / (p[i] + p[j]), abs=1e-12)


def test_polarised_population_of_the_first_question_by_hand():
    """A 0.55 (Increase minimum wage), B 0.20, C 0.15, D 0.10. Groups: A: A>B>C>D; B: B>C>D>A; C: C>B>D>A;
    D: D>B>C>A. So A beats each other option only with its own group, 0.55; B beats C with B's and D's groups and
    A's (0.85), D with A's, B's and C's (0.90); C beats D with A's, B's and C's (0.90)."""
    q = WORLD.opinions[0]
    assert q.population == (0.55, 0.20, 0.15, 0.10)
    groups = group_rankings(q.population, "polarised")
    assert [ranking for _, ranking in groups] == [(0, 1, 2, 3), (1, 2, 3, 0), (2, 1, 3, 0), (3, 1, 2, 0)]
    expected = [[0, .55, .55, .55], [.45, 0, .85, .90], [.45, .15, 0, .90], [.45, .10, .10, 0]]
    for row, want in zip(pairwise_shares(groups, 4), expected):
        assert row == pytest.approx(want, abs=1e-12)


def test_single_peaked_median_favourite_wins_every_head_to_head():
    """Black (1948): with single-peaked rankings the favourite of the median group (by share, along the line)
    beats every other option in a pairwise majority vote (ties impossible here unless a share is exactly 1/2)."""
    for q in WORLD.opinions:
        p, k = q.population, len(q.options)
        cumulative = list(itertools.accumulate(p))
        median = next(i for i, c in enumerate(cumulative) if c >= 0.5)
        matrix = pairwise_shares(group_rankings(p, "single-peaked"), k)
        if any(math.isclose(c, 0.5) for c in cumulative):
            continue  # a tie at the median: two median options
        assert all(matrix[median][j] > 0.5 for j in range(k) if j != median), q.prompt


def test_soft_records_carry_the_pairwise_shares():
    records = ranking_records(WORLD.opinions[:3], "consensus", "soft")
    for q in WORLD.opinions[:3]:
        k = len(q.options)
        matrix = pairwise_shares(group_rankings(q.population, "consensus"), k)
        mine = [r for r in records if r["id"] == q.id]
        assert len(mine) == k * (k - 1) // 2
        for r in mine:
            i, j = q.options.index(r["chosen"]), q.options.index(r["rejected"])
            assert r["prompt"] == q.prompt and r["chosen_prob"] >= 0.5
            assert r["chosen_prob"] == pytest.approx(matrix[i][j], abs=1e-12)


def test_sampled_records_follow_the_pairwise_shares():
    """k = 4000 draws per pair: each pair's share of wins within 5 binomial standard deviations of P_ij."""
    q, k = WORLD.opinions[0], 4000
    records = ranking_records([q], "polarised", "sampled", k, random.Random(0))
    matrix = pairwise_shares(group_rankings(q.population, "polarised"), 4)
    assert len(records) == 6 * k and all("chosen_prob" not in r for r in records)
    for i, j in itertools.combinations(range(4), 2):
        pair = [r for r in records if {r["chosen"], r["rejected"]} == {q.options[i], q.options[j]}]
        wins = sum(r["chosen"] == q.options[i] for r in pair)
        sd = math.sqrt(k * matrix[i][j] * (1 - matrix[i][j]))
        assert abs(wins - k * matrix[i][j]) < 5 * sd
    again = ranking_records([q], "polarised", "sampled", k, random.Random(0))
    assert again == records  # a pure function of the rng


def test_bad_arguments():
    with pytest.raises(ValueError, match="structure must be one of"):
        group_rankings((0.5, 0.5), "cyclic")
    with pytest.raises(ValueError, match="mode must be soft or sampled"):
        ranking_records(WORLD.opinions[:1], "consensus", "counts")
    with pytest.raises(ValueError, match="needs an rng"):
        ranking_records(WORLD.opinions[:1], "consensus", "sampled", 3)
