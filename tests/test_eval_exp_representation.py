"""eval/experiments/representation.py: the loss's exact minimiser against Prop. A.1, and the --quick run.

Oracles. The minimiser (`loss_minimiser`, Newton on spl.losses.spl_loss): on Bradley-Terry pairs, the closed form
pi ∝ pi_ref^(beta/alpha) p^(1/alpha) written here in numpy (Prop. A.1: the loss, in s = alpha log pi - beta log pi_ref,
is the Bradley-Terry likelihood, maximised at s = log p + c); on ranking populations, where no closed form exists,
invariants: the gradient of the summed loss (torch autograd, not the Newton code's hand-written gradient) vanishes
there, the loss is no lower at random perturbations (convexity: a stationary point is the minimum), and the same
point is reached from Hunter's MM fit of the Bradley-Terry model (data/world/pairs.py bradley_terry_fit, a different
algorithm on the win matrix), pi ∝ pi_ref^(beta/alpha) fit^(1/alpha). No minimiser exists when an option never
wins (Ford 1957): then None. The quick run's files: the prediction recomputed in numpy from the saved columns, the
table's summaries recomputed from the per-option rows, the focus question's DPO optimum on the polarised population
on the compromise (the Bradley-Terry fit orders options by their total pairwise wins when every pair is compared
equally: B's 0.45 + 0.85 + 0.90 = 2.20 against A's 1.65), and the run's provenance (commit, recipe).
"""
import importlib.util
import json
import math
import random
from collections import defaultdict

import numpy as np
import pytest
import torch

from data.world import bradley_terry_fit, load_world
from data.world.rankings import ranking_records
from eval.experiments import representation as exp
from eval.experiments.common import read_csv
from spl.losses import spl_loss

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # slow: scheduled first (conftest.py)
WORLD = load_world()


def closed_form(ref, p, alpha, beta):
    weights = np.asarray(ref) ** (beta / alpha) * np.asarray(p) ** (1 / alpha)
    return weights / weights.sum()


def bradley_terry_records(options, p):
    return [{"chosen": options[i], "rejected": options[j], "chosen_prob": p[i] / (p[i] + p[j])}
            for i in range(len(p)) for j in range(i + 1, len(p))]


@pytest.mark.parametrize("alpha,beta", [(0.1, 0.1), (0.2, 0.1), (1.0, 0.1), (0.5, 0.0)])
def test_minimiser_is_prop_a1_on_bradley_terry_pairs(alpha, beta):
    rng = np.random.default_rng(0)
    for k in (2, 3, 5):
        p = rng.dirichlet(np.ones(k))
        ref = rng.dirichlet(np.ones(k))
        options = [f"o{i}" for i in range(k)]
        arrays = exp.pair_arrays(bradley_terry_records(options, p), options)
        pi = exp.loss_minimiser(torch.tensor(np.log(ref) - 0.7), *arrays, alpha, beta)  # any scale of pi_ref
        np.testing.assert_allclose(pi.numpy(), closed_form(ref, p, alpha, beta), rtol=1e-8, atol=1e-10)


def summed_loss(logps, rho, arrays, alpha, beta):
    chosen, rejected, label = arrays
    return spl_loss(logps[chosen], logps[rejected], rho[chosen], rho[rejected], alpha, beta, label)[0].sum()


@pytest.mark.parametrize("structure,labels", [("polarised", "soft"), ("single-peaked", "soft"),
                                              ("polarised", "sampled")])
def test_minimiser_on_ranking_populations_is_stationary_minimal_and_the_mm_fit(structure, labels):
    questions = [WORLD.opinions[0], WORLD.opinions[15]]  # four and five options
    records = ranking_records(questions, structure, labels, 20, random.Random(1))
    gen = torch.Generator().manual_seed(0)
    for q in questions:
        arrays = exp.pair_arrays([r for r in records if r["id"] == q.id], q.options)
        k = len(q.options)
        rho = torch.randn(k, generator=gen, dtype=torch.float64) - 2.0
        wins = exp.win_matrix(k, *arrays)
        fit = torch.tensor(bradley_terry_fit(wins), dtype=torch.float64)
        for alpha, beta in ((0.1, 0.1), (1.0, 0.1)):
            pi = exp.loss_minimiser(rho, *arrays, alpha, beta)
            logps = pi.log().requires_grad_(True)
            loss = summed_loss(logps, rho, arrays, alpha, beta)
            (grad,) = torch.autograd.grad(loss, logps)
            np.testing.assert_allclose(grad.numpy(), 0.0, atol=1e-8)
            for _ in range(20):
                nudged = logps.detach() + 0.05 * torch.randn(k, generator=gen, dtype=torch.float64)
                assert float(summed_loss(nudged, rho, arrays, alpha, beta)) >= float(loss.detach()) - 1e-12
            via_mm = torch.softmax((beta / alpha) * rho.softmax(0).log() + fit.log() / alpha, 0)
            np.testing.assert_allclose(pi.numpy(), via_mm.numpy(), rtol=1e-6, atol=1e-9)


def test_no_minimiser_when_an_option_never_wins():
    options = ["a", "b", "c"]
    records = [{"chosen": "a", "rejected": "b"}, {"chosen": "b", "rejected": "a"}, {"chosen": "a", "rejected": "c"},
               {"chosen": "b", "rejected": "c"}]  # c loses every comparison
    arrays = exp.pair_arrays(records, options)
    assert exp.loss_minimiser(torch.zeros(3, dtype=torch.float64), *arrays, 0.1, 0.1) is None
    records.append({"chosen": "c", "rejected": "a"})  # now a -> b -> ... -> c -> a: strongly connected
    pi = exp.loss_minimiser(torch.zeros(3, dtype=torch.float64), *exp.pair_arrays(records, options), 1.0, 0.1)
    assert pi is not None and float(pi.sum()) == pytest.approx(1.0)


# ---- the --quick run -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp_representation")
    assert exp.main(["--quick", "--out", str(out)]) == 0
    exact_columns, exact = read_csv(out / "exact.csv")
    _, trained = read_csv(out / "trained.csv")
    _, dists = read_csv(out / "distributions.csv")
    rows = defaultdict(list)  # (dataset, alpha, question) -> option rows
    for row in dists:
        rows[row["dataset"], float(row["alpha"]), row["question"]].append(row)
    return {"out": out, "exact_columns": exact_columns, "exact": exact, "trained": trained, "rows": rows,
            "run": json.loads((out / "run.json").read_text(encoding="utf-8"))}


def column(rows, key):
    return np.array([float(r[key]) for r in rows])


def test_quick_run_covers_every_data_set_and_ratio(quick_run):
    assert [(r["dataset"], float(r["alpha_over_beta"])) for r in quick_run["exact"]] == [
        (d, ratio) for d in exp.DATASETS for ratio in exp.QUICK["exact_ratios"]]
    assert [(r["dataset"], float(r["alpha"])) for r in quick_run["trained"]] == [("polarised/soft", 0.1),
                                                                                ("polarised/soft", 1.0)]
    assert (quick_run["out"] / "representation.png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    run = quick_run["run"]
    assert len(run["commit"].removesuffix("+dirty")) == 40 or run["commit"] == "unknown"
    assert "--anchor 0.1 --prompts-per-batch 15" in run["recipe"] and "lm_head" in run["recipe"]
    assert (quick_run["out"] / "runs" / "polarised_soft" / "alpha1_beta0.1" / "config.json").is_file()


def test_prediction_recomputed_and_exact_on_bradley_terry(quick_run):
    for (dataset, alpha, _), rows in quick_run["rows"].items():
        predicted = closed_form(column(rows, "reference"), column(rows, "p_best"), alpha, 0.1)
        np.testing.assert_allclose(column(rows, "predicted"), predicted, rtol=1e-9, atol=1e-12)
        if dataset == "bradley-terry/soft":  # the theory's own case: the loss's minimiser is the prediction
            np.testing.assert_allclose(column(rows, "exact"), predicted, rtol=1e-7, atol=1e-9)
    for row in quick_run["exact"]:
        if row["dataset"] == "bradley-terry/soft":
            assert float(row["max_tv_exact_vs_predicted"]) < 1e-7 and float(row["bt_misfit"]) < 1e-6


def test_summaries_recomputed_from_the_option_rows(quick_run):
    for row in quick_run["exact"] + quick_run["trained"]:
        alpha = float(row["alpha"])
        questions = [rows for (d, a, _), rows in quick_run["rows"].items() if d == row["dataset"] and a == alpha]
        assert len(questions) == 30
        majority = [int(np.argmax(column(rows, "p_best"))) for rows in questions]
        tv = lambda rows, x, y: 0.5 * np.abs(column(rows, x) - column(rows, y)).sum()  # noqa: E731
        if "tv_exact_vs_predicted" in row:
            assert float(row["tv_exact_vs_predicted"]) == pytest.approx(
                np.mean([tv(rows, "exact", "predicted") for rows in questions]), rel=1e-9, abs=1e-12)
            assert float(row["majority_exact"]) == pytest.approx(
                np.mean([column(rows, "exact")[m] for rows, m in zip(questions, majority)]), rel=1e-9)
            assert int(row["minority_top_exact"]) == sum(int(np.argmax(column(rows, "exact"))) != m
                                                         for rows, m in zip(questions, majority))
        else:
            assert float(row["tv_learned_vs_exact"]) == pytest.approx(
                np.mean([tv(rows, "learned", "exact") for rows in questions]), rel=1e-9, abs=1e-12)
            assert float(row["tv_learned_vs_top_choice"]) == pytest.approx(
                np.mean([tv(rows, "learned", "p_best") for rows in questions]), rel=1e-9, abs=1e-12)
            for rows in questions:
                learned = column(rows, "learned")
                assert (learned > 0).all() and learned.sum() == pytest.approx(1.0, abs=1e-9)


def test_polarised_first_question_hands_dpo_to_the_compromise(quick_run):
    rows = quick_run["rows"]["polarised/soft", 0.1, "opinion-00"]
    exact, predicted = column(rows, "exact"), column(rows, "predicted")
    assert int(np.argmax(predicted)) == 0 and int(np.argmax(exact)) == 1  # the majority's vs the 0.20 group's
    top = [float(r["p_best"]) for r in rows]
    assert top == pytest.approx([0.55, 0.20, 0.15, 0.10])
    assert math.isclose(sum(top), 1.0)


def test_bad_arguments_fail_at_start(capsys):
    for argv, message in ((["--ratios", "0.5"], "alpha/beta must be >= 1"),
                          (["--trained", "cyclic/soft"], "each must be one of"),
                          (["--datasets", "polarised/soft", "--trained", "consensus/soft"], "must be in --datasets"),
                          (["--steps", "0"], "--steps must be > 0")):
        with pytest.raises(SystemExit) as error:
            exp.main(argv)
        assert error.value.code == 2
        assert message in capsys.readouterr().err
