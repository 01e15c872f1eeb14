"""eval/experiments/representation.py: experiment 1 (learned vs closed-form opinion distributions) in its --quick mode.

Oracles: the closed form recomputed here with numpy from the saved reference and population columns,
pi* = pi_ref^(beta/alpha) p^(1/alpha) / Z (Prop. A.1), not through spl.theory; the table's summaries recomputed
from the per-option rows; the world's own populations; and two invariants. (1) For a fixed beta,
pi* = softmax(log(pi_ref^beta p) / alpha) is one distribution at temperature alpha, so on every question its
entropy rises strictly with alpha unless that distribution is uniform: DPO's closed form (alpha = 0.1) has lower
entropy than alpha = 1's. (2) Trained from the same reference, DPO's learned distribution is at least as peaked
as SPL alpha = 1's (lower mean entropy, more mass on the majority option): what Props. 3.1 and 3.2 predict and
what the quick run's few steps already show.
"""
import importlib.util
import math
from collections import defaultdict

import numpy as np
import pytest

from data.world import load_world
from eval.experiments import representation as exp
from eval.experiments.common import read_csv

TABLE_COLUMNS = ["policy", "alpha", "beta", "alpha_over_beta", "mean_tv_learned_vs_closed_form",
                 "max_tv_learned_vs_closed_form", "majority_learned", "majority_closed_form", "entropy_learned",
                 "entropy_closed_form", "tv_learned_vs_population", "tv_closed_form_vs_population", "option_mass"]
DIST_COLUMNS = ["alpha", "beta", "alpha_over_beta", "question", "option", "population", "reference", "learned",
                "closed_form"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp_representation")
    assert exp.main(["--quick", "--out", str(out)]) == 0
    table_columns, table = read_csv(out / "runs.csv")
    dist_columns, dists = read_csv(out / "distributions.csv")
    runs = defaultdict(lambda: defaultdict(list))  # alpha -> question -> rows, in option order
    for row in dists:
        runs[float(row["alpha"])][row["question"]].append(row)
    return {"out": out, "table_columns": table_columns, "table": table, "dist_columns": dist_columns,
            "runs": runs}


def column(rows, key):
    return np.array([float(r[key]) for r in rows])


def entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_outputs_and_table_structure(quick_run):
    assert quick_run["table_columns"] == TABLE_COLUMNS
    assert quick_run["dist_columns"] == DIST_COLUMNS
    table = quick_run["table"]
    assert [r["policy"] for r in table] == ["population", "reference", "DPO", "SPL"]
    assert [float(r["alpha"]) for r in table[2:]] == [0.1, 1.0] and {r["beta"] for r in table[2:]} == {"0.1"}
    assert [float(r["alpha_over_beta"]) for r in table[2:]] == pytest.approx([1.0, 10.0])
    assert table[0]["option_mass"] == "" and all(0 < float(r["option_mass"]) <= 1 for r in table[1:])
    world = load_world()
    assert set(quick_run["runs"]) == {0.1, 1.0}
    for questions in quick_run["runs"].values():
        assert [q.prompt for q in world.opinions] == list(questions)  # every question, in the world's order
        for q in world.opinions:
            rows = questions[q.prompt]
            assert [r["option"] for r in rows] == list(q.options)
            np.testing.assert_allclose(column(rows, "population"), q.population, rtol=0, atol=1e-15)
    assert (quick_run["out"] / "representation.png").exists() == _has_matplotlib()  # the plot is optional


def _has_matplotlib():
    return importlib.util.find_spec("matplotlib") is not None


def test_closed_form_recomputed_independently(quick_run):
    """pi* = pi_ref^(beta/alpha) p^(1/alpha) / Z per question, from the saved reference and population."""
    for alpha, questions in quick_run["runs"].items():
        beta = 0.1
        for rows in questions.values():
            weights = column(rows, "reference") ** (beta / alpha) * column(rows, "population") ** (1 / alpha)
            np.testing.assert_allclose(column(rows, "closed_form"), weights / weights.sum(), rtol=1e-10, atol=1e-12)
            for key in ("reference", "learned"):
                distribution = column(rows, key)
                assert (distribution > 0).all() and distribution.sum() == pytest.approx(1.0, abs=1e-9)


def test_reference_is_the_same_model_in_every_run(quick_run):
    """Each run's reference column is the world's model with LoRA off: identical across runs."""
    dpo, alpha_one = quick_run["runs"][0.1], quick_run["runs"][1.0]
    for question in dpo:
        np.testing.assert_allclose(column(dpo[question], "reference"), column(alpha_one[question], "reference"),
                                   rtol=0, atol=1e-12)


def test_table_summaries_recomputed_from_distributions(quick_run):
    table = {r["policy"]: r for r in quick_run["table"]}
    for policy, alpha in (("DPO", 0.1), ("SPL", 1.0)):
        questions = list(quick_run["runs"][alpha].values())
        tv, majority, ent, tv_pop = [], defaultdict(list), defaultdict(list), []
        for rows in questions:
            population, learned, closed = (column(rows, k) for k in ("population", "learned", "closed_form"))
            tv.append(0.5 * np.abs(learned - closed).sum())
            tv_pop.append(0.5 * np.abs(learned - population).sum())
            top = int(np.argmax(population))
            for key, values in (("learned", learned), ("closed_form", closed)):
                majority[key].append(values[top])
                ent[key].append(entropy(values))
        row = table[policy]
        assert float(row["mean_tv_learned_vs_closed_form"]) == pytest.approx(np.mean(tv), rel=1e-10)
        assert float(row["max_tv_learned_vs_closed_form"]) == pytest.approx(np.max(tv), rel=1e-10)
        assert float(row["tv_learned_vs_population"]) == pytest.approx(np.mean(tv_pop), rel=1e-10)
        for key in ("learned", "closed_form"):
            assert float(row[f"majority_{key}"]) == pytest.approx(np.mean(majority[key]), rel=1e-10)
            assert float(row[f"entropy_{key}"]) == pytest.approx(np.mean(ent[key]), rel=1e-10)
    questions = list(quick_run["runs"][0.1].values())
    population_entropy = np.mean([entropy(column(rows, "population")) for rows in questions])
    assert float(table["population"]["entropy_learned"]) == pytest.approx(population_entropy, rel=1e-10)
    assert float(table["population"]["tv_learned_vs_population"]) == 0.0


def test_closed_form_entropy_rises_with_alpha_on_every_question(quick_run):
    dpo, alpha_one = quick_run["runs"][0.1], quick_run["runs"][1.0]
    for question in dpo:
        assert entropy(column(dpo[question], "closed_form")) < entropy(column(alpha_one[question], "closed_form"))


def test_dpo_learns_a_more_peaked_distribution_than_alpha_one(quick_run):
    table = {r["policy"]: r for r in quick_run["table"]}
    assert float(table["DPO"]["entropy_learned"]) < float(table["SPL"]["entropy_learned"])
    assert float(table["DPO"]["majority_learned"]) > float(table["SPL"]["majority_learned"])


def test_pure_helpers_against_hand_values():
    assert exp.sweep((1, 1.1, 10), 0.1) == [(0.1, 0.1), (0.11, 0.1), (1.0, 0.1)]  # alpha = 1 not doubled
    assert exp.sweep((2,), 0.1, alpha_one=False) == [(0.2, 0.1)]
    assert exp.entropy([0.5, 0.5, 0.0]) == pytest.approx(math.log(2))
    assert exp.total_variation([0.2, 0.8], [0.5, 0.5]) == pytest.approx(0.3)


def test_bad_arguments_fail_at_start(capsys):
    for argv, message in ((["--ratios", "0.5"], "--ratios: alpha/beta must be >= 1"),
                          (["--ratios", "two"], "--ratios: expected comma-separated numbers"),
                          (["--steps", "0"], "--steps must be > 0")):
        with pytest.raises(SystemExit) as error:
            exp.main(argv)
        assert error.value.code == 2
        assert message in capsys.readouterr().err
