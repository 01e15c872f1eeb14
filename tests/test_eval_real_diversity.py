"""eval/experiments/real_diversity.py: the sequence-level temperature's estimators and its premise, and --quick.

Oracles: importance resampling against the exact tempered distribution pi^(1/tau) / Z of a small categorical
(Monte Carlo, tolerance from the estimator's standard error); Kish's ESS at its two ends worked by hand; the
weighted pairwise distance against eval.metrics.pairwise_cosine_distance (Eq. 44 includes the i = j terms, so the
mean over distinct pairs is N / (N - 1) times it); the Vendi score against the vendi-score package; the centred
slope on data built with a known slope; the premise of (b), that SPL's soft-label loss with every pair labelled
1/2 is minimised by pi_ref^(beta/alpha), by minimising spl.losses.spl_loss over a free categorical with LBFGS;
and --quick end to end (the world's tiny model) with invariants of its own output.
"""
import csv
import itertools
import json

import numpy as np
import pytest
import torch

from eval import metrics
from eval.experiments import real_diversity as rd
from spl.losses import spl_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_importance_resampling_estimates_the_tempered_distribution():
    """pi over K = 6 outcomes; a pool of M = 200000 draws from pi, weights w ∝ pi(y)^(1/tau - 1). The weighted
    frequency of each outcome estimates q = pi^(1/tau) / Z with a standard error of about sqrt(q (1 - q) / ESS)
    <= 0.5 / sqrt(ESS) (the delta method for a self-normalised estimate); the test allows 5 of them."""
    generator = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03], dtype=torch.float64)
    draws = torch.multinomial(probs, 200_000, replacement=True, generator=generator)
    for tau in (0.5, 0.8, 1.0, 1.5, 2.0):
        weights = rd.tempered_weights(probs.log()[draws], tau)
        estimate = torch.zeros(6, dtype=torch.float64).index_add_(0, draws, weights)
        exact = probs ** (1 / tau) / (probs ** (1 / tau)).sum()
        ess = float(rd.effective_sample_size(weights))
        torch.testing.assert_close(estimate, exact, atol=5 * 0.5 / ess ** 0.5, rtol=0)
        assert weights.sum() == pytest.approx(1.0, abs=1e-12)


def test_effective_sample_size_ends_and_tau_one():
    """Equal weights: ESS = M; one weight: 1; tau = 1 gives equal weights whatever the log-probs."""
    assert float(rd.effective_sample_size(torch.ones(7))) == pytest.approx(7.0)
    assert float(rd.effective_sample_size(torch.tensor([0.0, 3.0, 0.0]))) == pytest.approx(1.0)
    weights = rd.tempered_weights(torch.tensor([-3.0, -50.0, -7.5]), 1.0)
    torch.testing.assert_close(weights, torch.full((3,), 1 / 3, dtype=torch.float64))


def test_weighted_pairwise_distance_equal_weights_is_eq44_over_distinct_pairs():
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = float(metrics.pairwise_cosine_distance(x)) * 9 / 8
    assert rd.weighted_pairwise_distance(x, torch.full((9,), 1 / 9)) == pytest.approx(expected, rel=1e-12)
    # weights on two responses only: the distance between those two
    w = torch.tensor([0.0, 0.3, 0.0, 0.7, 0, 0, 0, 0, 0], dtype=torch.float64)
    cosine = torch.nn.functional.cosine_similarity(x[1], x[3], dim=0)
    assert rd.weighted_pairwise_distance(x, w) == pytest.approx(float(1 - cosine), rel=1e-12)


def test_vendi_score_equals_the_vendi_package():
    from vendi_score import vendi
    x = np.random.default_rng(2).normal(size=(12, 8))
    x[3] = x[5]  # a duplicate, as resampling makes
    assert metrics.vendi_score(x) == pytest.approx(vendi.score_dual(x, normalize=True), rel=1e-9)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert metrics.vendi_score(x) == pytest.approx(vendi.score_K(unit @ unit.T), rel=1e-9)


def test_centred_slope_recovers_a_known_slope():
    """y = c_prompt + s x exactly, with a different constant per prompt: the within-prompt slope is s."""
    x = torch.randn(30, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 10
    prompt = torch.arange(30) % 3
    y = 0.5 * x + torch.tensor([1.0, -20.0, 7.0], dtype=torch.float64)[prompt]
    assert rd.centred_slope(y, x, prompt) == pytest.approx(0.5, rel=1e-12)


def test_uniform_labels_make_spl_optimum_the_sequence_tempered_reference():
    """(b)'s premise. Every ordered pair (i, j), i != j, of K outcomes with chosen_prob 1/2 and the SPL loss
    -(1/2) log sig(z_ij) - (1/2) log sig(-z_ij), z_ij = alpha log pi_i/pi_j - beta log ref_i/ref_j: each term is
    minimal at z_ij = 0, i.e. alpha log pi_i - beta log ref_i is the same for all i, so pi ∝ ref^(beta/alpha)."""
    ref = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05], dtype=torch.float64)
    pairs = torch.tensor(list(itertools.permutations(range(5), 2)))
    for alpha, beta in ((0.2, 0.1), (0.1, 0.2), (1.0, 0.1)):
        logits = torch.zeros(5, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([logits], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            logp = logits.log_softmax(0)
            losses, _, _ = spl_loss(logp[pairs[:, 0]], logp[pairs[:, 1]], ref.log()[pairs[:, 0]],
                                    ref.log()[pairs[:, 1]], alpha, beta, chosen_prob=torch.full((20,), 0.5,
                                                                                                dtype=torch.float64))
            loss = losses.sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        expected = ref ** (beta / alpha) / (ref ** (beta / alpha)).sum()
        torch.testing.assert_close(logits.detach().softmax(0), expected, atol=1e-6, rtol=0)


def test_uniform_pairs_use_ended_responses_with_half_labels():
    group = [{"text": t, "eos": e} for t, e in [("a", True), ("b", False), ("c", True), ("d", True), (" ", True),
                                                  ("e", True)]]
    pairs = rd.uniform_pairs(["p"], [group], pairs_per_prompt=5)
    assert pairs == [{"prompt": "p", "chosen": "a", "rejected": "c", "chosen_prob": 0.5},
                     {"prompt": "p", "chosen": "d", "rejected": "e", "chosen_prob": 0.5}]


def test_quick_run_writes_every_method(tmp_path):
    """--quick end to end on the world's tiny model (2 prompts), one training step included. Invariants: every
    method has a row; the resampled tau = 1 row weighs the whole pool equally (ESS = M) and its loss is the pool's
    mean per-token loss; ESS falls as tau leaves 1; a mean pairwise distance lies in [0, 2] and Vendi in [1, N];
    with every prompt trained on, the slope over all held-out responses is the slope on trained prompts."""
    assert rd.main(["--quick", "--out", str(tmp_path), "--taus", "0.5,1,2", "--train-tau", "2", "--train-steps", "1",
                    "--pairs-per-prompt", "1", "--held-out", "2"]) == 0
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"T=1", *rd.DEFAULT_METHODS, "SPL-IS tau=0.5", "SPL-IS tau=1", "SPL-IS tau=2",
                         "SPL-LoRA tau=2"}
    trained = rows["SPL-LoRA tau=2"]
    assert float(trained["slope_target"]) == 0.5 and np.isfinite(float(trained["slope_vs_ref"]))
    assert float(trained["slope_trained_prompts"]) == float(trained["slope_vs_ref"])
    assert float(rows["SPL-IS tau=1"]["ess"]) == pytest.approx(6.0)
    assert float(rows["SPL-IS tau=0.5"]["ess"]) < 6.0 and float(rows["SPL-IS tau=2"]["ess"]) < 6.0
    pool = json.loads((tmp_path / "samples" / "pool.json").read_text())["records"]
    per_prompt = [np.mean([-r["logprob"] / len(r["token_ids"]) for r in pool if r["prompt_index"] == i])
                  for i in range(2)]
    assert float(rows["SPL-IS tau=1"]["per_token_loss"]) == pytest.approx(np.mean(per_prompt), rel=1e-9)
    for row in rows.values():
        assert 0.0 <= float(row["pairwise_distance"]) <= 2.0 and 1.0 - 1e-9 <= float(row["vendi"]) <= 3.0 + 1e-9
    assert (tmp_path / "pareto.png").is_file()
