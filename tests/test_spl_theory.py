"""spl/theory.py: the closed-form optima against the paper's numbers, direct optimisation and invariants.

Oracles: the paper's worked numbers (Section 3.1, Corollary 3.1, the introduction's survey) re-derived by hand in
plain Python floats; Prop. A.1 written literally in probability space; LBFGS maximising Eq. 4 over the simplex;
the Gibbs variational identity max = alpha log Z; torch.distributions' KL for the alpha = beta case; and a token
tree whose tempered probabilities are worked out by hand below.
"""
import math

import pytest
import torch

from spl.theory import (global_temperature, optimal_policy, optimal_policy_from_reward, rlhf_optimal_policy,
                        spl_objective, token_temperature)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, thousands of calls


def random_distributions(shape, seed):
    """Dirichlet(1, ..., 1) draws over the last dim, float64 (normalised exponentials)."""
    generator = torch.Generator().manual_seed(seed)
    exponentials = -torch.log(torch.rand(shape, generator=generator, dtype=torch.float64))
    return exponentials / exponentials.sum(-1, keepdim=True)


# -------------------------------------------------------------------------------------------- the paper's numbers

def test_section_3_1_dpo_gives_the_80_percent_majority_99_9999_percent():
    """Prop. 3.1 with a uniform reference, p = (0.8, 0.2), beta = 0.1: pi ∝ p^10, so
    pi(y) = 0.8^10 / (0.8^10 + 0.2^10) = 4^10 / (4^10 + 1) = 1048576 / 1048577 = 99.9999%, pi(y') = 0.0001%."""
    uniform, p = torch.tensor([0.5, 0.5], dtype=torch.float64), torch.tensor([0.8, 0.2], dtype=torch.float64)
    pi = rlhf_optimal_policy(uniform, p, 0.1)
    expected = torch.tensor([1048576 / 1048577, 1 / 1048577], dtype=torch.float64)
    torch.testing.assert_close(pi, expected, rtol=1e-12, atol=0)
    assert f"{100 * pi[0].item():.4f}%" == "99.9999%" and f"{100 * pi[1].item():.4f}%" == "0.0001%"
    spl = optimal_policy(torch.tensor([0.5, 0.5]), torch.tensor([0.8, 0.2]), alpha=1.0, beta=0.1)
    torch.testing.assert_close(spl, torch.tensor([0.8, 0.2]), rtol=0, atol=1e-6)  # SPL alpha = 1: the population


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0, 3.0])
def test_corollary_3_1_alpha_one_with_uniform_reference_reproduces_the_population(beta):
    """alpha = 1: pi ∝ pi_ref^beta p_best = const * p_best when pi_ref is uniform, so pi = p_best exactly."""
    p_best = random_distributions((5, 6), seed=0)  # [5, 6]
    uniform = torch.full((6,), 1 / 6, dtype=torch.float64)
    torch.testing.assert_close(optimal_policy(uniform, p_best, alpha=1.0, beta=beta), p_best, rtol=1e-12, atol=1e-15)


def test_introduction_survey_dpo_collapses_spl_represents():
    """Survey A 55%, B 20%, C 15%, D 10%; uniform reference.
    DPO, beta = 0.1: pi ∝ p^10; 0.55^10 = 2.53e-3 against 0.2^10 = 1.02e-7, so A gets 99.996% (> the 99% the
    introduction warns of). SPL alpha = 1: exactly the survey. SPL at global temperature alpha/beta = 2: pi ∝ p^5."""
    survey = [0.55, 0.20, 0.15, 0.10]
    uniform = torch.full((4,), 0.25, dtype=torch.float64)
    p_best = torch.tensor(survey, dtype=torch.float64)

    def powered(k):
        weights = [p ** k for p in survey]
        return torch.tensor([w / sum(weights) for w in weights], dtype=torch.float64)

    dpo = rlhf_optimal_policy(uniform, p_best, beta=0.1)
    torch.testing.assert_close(dpo, powered(10), rtol=1e-10, atol=1e-15)
    assert dpo[0] > 0.9999 and dpo[1:].sum() < 1e-4
    torch.testing.assert_close(optimal_policy(uniform, p_best, alpha=1.0, beta=0.1), p_best, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(optimal_policy(uniform, p_best, alpha=0.2, beta=0.1), powered(5), rtol=1e-10, atol=1e-15)


# -------------------------------------------------------------------------------------------- the closed forms

def test_optimal_policy_is_prop_a1_written_in_probability_space():
    """pi = pi_ref^(beta/alpha) p^(1/alpha) / sum(...), batched [..., K], with a shared reference broadcast."""
    ref_probs = random_distributions((3, 4, 5), seed=1)  # [3, 4, 5]
    p_best = random_distributions((3, 4, 5), seed=2)
    for alpha, beta in [(0.1, 0.1), (0.3, 0.1), (1.0, 0.0), (2.0, 0.5), (0.5, 1.5)]:
        weights = ref_probs ** (beta / alpha) * p_best ** (1 / alpha)
        expected = weights / weights.sum(-1, keepdim=True)
        torch.testing.assert_close(optimal_policy(ref_probs, p_best, alpha, beta), expected, rtol=1e-10, atol=1e-15)
        shared = optimal_policy(ref_probs[0, 0], p_best, alpha, beta)  # [5] against [3, 4, 5]
        weights = ref_probs[0, 0] ** (beta / alpha) * p_best ** (1 / alpha)
        torch.testing.assert_close(shared, weights / weights.sum(-1, keepdim=True), rtol=1e-10, atol=1e-15)


def test_reward_form_agrees_and_ignores_reward_shift_and_reference_scale():
    """Eq. 35 with r = log p_best + c is Prop. A.1 for any c (c cancels in Z); scaling pi_ref cancels too;
    alpha = beta is Prop. 3.1; beta = 0 ignores the reference even where it is 0 (pi_ref^0 = 1)."""
    ref_probs, p_best = random_distributions((4, 6), seed=3), random_distributions((4, 6), seed=4)
    closed = optimal_policy(ref_probs, p_best, 0.4, 0.1)
    shifted = optimal_policy_from_reward(3.0 * ref_probs, torch.log(p_best) + 7.0, 0.4, 0.1)
    torch.testing.assert_close(shifted, closed, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(rlhf_optimal_policy(ref_probs, p_best, 0.1), optimal_policy(ref_probs, p_best, 0.1, 0.1),
                               rtol=0, atol=0)
    ref_with_zero = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    p3 = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    torch.testing.assert_close(optimal_policy(ref_with_zero, p3, 1.0, 0.0), p3, rtol=0, atol=1e-15)
    assert optimal_policy(ref_with_zero, p3, 1.0, 0.1)[0] == 0  # ruled out by the reference when beta > 0


def test_spl_objective_hand_worked():
    """K = 2, pi = pi_ref = (1/2, 1/2), r = (1, 0): E[r] = 1/2, H(pi) = H(pi, pi_ref) = ln 2,
    so Eq. 4 = 1/2 + (alpha - beta) ln 2. pi = (1, 0): E[r] = 1, H(pi) = 0, H(pi, pi_ref) = ln 2 -> 1 - beta ln 2."""
    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    reward = torch.tensor([1.0, 0.0], dtype=torch.float64)
    value = spl_objective(half, reward, half, alpha=0.3, beta=0.1)
    torch.testing.assert_close(value, torch.tensor(0.5 + 0.2 * math.log(2), dtype=torch.float64), rtol=0, atol=1e-15)
    point = spl_objective(torch.tensor([1.0, 0.0], dtype=torch.float64), reward, half, alpha=0.3, beta=0.1)
    torch.testing.assert_close(point, torch.tensor(1 - 0.1 * math.log(2), dtype=torch.float64), rtol=0, atol=1e-15)


def test_spl_objective_with_alpha_equal_beta_is_kl_regularised_rl():
    """alpha H(pi) - beta H(pi, pi_ref) = -beta KL(pi || pi_ref) when alpha = beta: Eq. 4 becomes Eq. 3."""
    pi, ref_probs = random_distributions((8, 5), seed=5), random_distributions((8, 5), seed=6)
    reward = torch.randn(8, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    kl = torch.distributions.kl_divergence(torch.distributions.Categorical(probs=pi),
                                           torch.distributions.Categorical(probs=ref_probs))  # [8]
    expected = (pi * reward).sum(-1) - 0.1 * kl
    torch.testing.assert_close(spl_objective(pi, reward, ref_probs, 0.1, 0.1), expected, rtol=1e-12, atol=1e-14)


def test_spl_objective_maximum_is_alpha_log_z_at_the_closed_form():
    """Gibbs variational principle: pi^T (r + beta log pi_ref) + alpha H(pi) <= alpha log sum exp((r + beta log
    pi_ref)/alpha), with equality exactly at pi ∝ exp((r + beta log pi_ref)/alpha) (Eq. 35). Random policies
    (and the DPO optimum when alpha != beta) score strictly less."""
    ref_probs = random_distributions((6,), seed=8)
    reward = torch.randn(6, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    alpha, beta = 0.4, 0.1
    best = optimal_policy_from_reward(ref_probs, reward, alpha, beta)
    log_z = torch.logsumexp((reward + beta * torch.log(ref_probs)) / alpha, dim=-1)
    top = spl_objective(best, reward, ref_probs, alpha, beta)
    torch.testing.assert_close(top, alpha * log_z, rtol=1e-12, atol=1e-14)
    others = random_distributions((100, 6), seed=10)
    assert (spl_objective(others, reward, ref_probs, alpha, beta) < top).all()
    dpo = optimal_policy_from_reward(ref_probs, reward, beta, beta)
    assert spl_objective(dpo, reward, ref_probs, alpha, beta) < top - 1e-6


GRID = [(alpha, beta) for alpha in (0.1, 0.5, 1.0, 2.0) for beta in (0.0, 0.1, 1.0)]


@pytest.mark.parametrize("alpha, beta", GRID)
def test_maximising_spl_objective_lands_on_optimal_policy(alpha, beta):
    """LBFGS on a free softmax policy maximising Eq. 4 with r = log p_best reaches Prop. A.1's policy within
    1e-6 total variation, for 2 to 6 outcomes (the objective is strictly concave in pi, so the optimum is unique)."""
    for num_outcomes in range(2, 7):
        p_best = random_distributions((num_outcomes,), seed=100 * num_outcomes + int(10 * alpha + beta))
        ref_probs = random_distributions((num_outcomes,), seed=200 * num_outcomes + int(10 * alpha + beta))
        reward = torch.log(p_best)
        policy_logits = torch.zeros(num_outcomes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([policy_logits], lr=1.0, max_iter=300, tolerance_grad=1e-12,
                                      tolerance_change=1e-16, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = -spl_objective(torch.softmax(policy_logits, dim=-1), reward, ref_probs, alpha, beta)
            loss.backward()
            return loss

        optimizer.step(closure)
        learned = torch.softmax(policy_logits.detach(), dim=-1)
        total_variation = 0.5 * (learned - optimal_policy(ref_probs, p_best, alpha, beta)).abs().sum().item()
        assert total_variation < 1e-6, (num_outcomes, total_variation)


# -------------------------------------------------------------------------------------------- temperature

def test_global_temperature_hand_worked_and_keeps_order():
    """(0.5, 0.3, 0.2) at t = 2: (sqrt .5, sqrt .3, sqrt .2) / (sqrt .5 + sqrt .3 + sqrt .2). A power map is
    monotone, so random distributions keep their order at every t; t = 1 is the identity."""
    probs = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    roots = [math.sqrt(p) for p in (0.5, 0.3, 0.2)]
    expected = torch.tensor([r / sum(roots) for r in roots], dtype=torch.float64)
    torch.testing.assert_close(global_temperature(probs, 2.0), expected, rtol=1e-12, atol=0)
    many = random_distributions((50, 7), seed=11)
    torch.testing.assert_close(global_temperature(many, 1.0), many, rtol=1e-12, atol=1e-15)
    for t in (0.5, 1.4, 2.0, 11.0):
        assert torch.equal(global_temperature(many, t).argsort(-1), many.argsort(-1))


def test_spl_optimum_is_dpo_optimum_at_global_temperature_alpha_over_beta():
    """Eq. 7-10: pi_SPL ∝ pi_ref^(beta/alpha) p^(1/alpha) = (pi_ref p^(1/beta))^(beta/alpha)
    ∝ pi_DPO^(1/(alpha/beta))."""
    ref_probs, p_best = random_distributions((4, 6), seed=12), random_distributions((4, 6), seed=13)
    for alpha in (0.1, 0.15, 0.2, 0.4, 1.1):
        spl = optimal_policy(ref_probs, p_best, alpha, 0.1)
        tempered_dpo = global_temperature(rlhf_optimal_policy(ref_probs, p_best, 0.1), alpha / 0.1)
        torch.testing.assert_close(spl, tempered_dpo, rtol=1e-9, atol=1e-15)


# A tree: first token A (0.6) or B (0.4); after A: X 0.9, Y 0.05, Z 0.05; after B: X only.
TREE = [("A", "X"), ("A", "Y"), ("A", "Z"), ("B", "X")]
TREE_PROBS = [0.54, 0.03, 0.03, 0.40]


def test_token_temperature_hand_worked_tree_reorders_sequences():
    """At t = 2, Eq. 6 tempers each next-token distribution:
        first token:  A ∝ sqrt(.6), B ∝ sqrt(.4)                -> A = .5505, B = .4495
        after A:      X ∝ sqrt(.9), Y, Z ∝ sqrt(.05)             -> X|A = sqrt(.9)/(sqrt(.9) + 2 sqrt(.05)) = .6796
        after B:      X with certainty                            -> X|B = 1
    so AX = .3741 < BX = .4495: the most likely sequence (AX, .54) is no longer the most likely, because its
    continuation shares a node with unlikely tokens that temperature inflates. Global temperature keeps AX first."""
    probs = torch.tensor(TREE_PROBS, dtype=torch.float64)
    first_a = math.sqrt(0.6) / (math.sqrt(0.6) + math.sqrt(0.4))
    under_a = math.sqrt(0.9) + 2 * math.sqrt(0.05)
    expected = torch.tensor([first_a * math.sqrt(0.9) / under_a, first_a * math.sqrt(0.05) / under_a,
                             first_a * math.sqrt(0.05) / under_a, 1 - first_a], dtype=torch.float64)
    tempered = token_temperature(probs, TREE, 2.0)
    torch.testing.assert_close(tempered, expected, rtol=1e-12, atol=1e-15)
    assert probs.argmax() == 0 and tempered.argmax() == 3  # token temperature reorders
    assert global_temperature(probs, 2.0).argmax() == 0  # global temperature does not
    torch.testing.assert_close(token_temperature(probs, TREE, 1.0), probs, rtol=1e-12, atol=1e-15)


def test_token_temperature_equals_global_on_depth_one_and_independent_trees():
    """Depth 1: one next-token distribution, so Eq. 6 is Eq. 10. Independent tokens on a full tree,
    pi(y) = q1(y1) q2(y2): prod_i q_i^(1/t) / Z_i = pi(y)^(1/t) / prod_i Z_i, global temperature again.
    Batched seq_probs [B, N] share the tree."""
    q1, q2 = random_distributions((3,), seed=14), random_distributions((4,), seed=15)
    tree = [(a, b) for a in range(3) for b in range(4)]
    probs = torch.stack([q1[a] * q2[b] for a, b in tree])  # [12]
    torch.testing.assert_close(token_temperature(probs, tree, 1.7), global_temperature(probs, 1.7),
                               rtol=1e-12, atol=1e-15)
    batch = random_distributions((5, 4), seed=16)  # [5, 4]
    torch.testing.assert_close(token_temperature(batch, [(0,), (1,), (2,), (3,)], 0.6), global_temperature(batch, 0.6),
                               rtol=1e-12, atol=1e-15)
    trees = token_temperature(torch.tensor([TREE_PROBS, [0.1, 0.1, 0.1, 0.7]], dtype=torch.float64), TREE, 3.0)
    torch.testing.assert_close(trees.sum(-1), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(trees[0], token_temperature(torch.tensor(TREE_PROBS, dtype=torch.float64), TREE, 3.0),
                               rtol=0, atol=0)


# -------------------------------------------------------------------------------------------- bad input

def test_bad_input_raises_clear_errors():
    ref, p = torch.tensor([0.5, 0.5]), torch.tensor([0.8, 0.2])
    with pytest.raises(ValueError, match="optimal_policy: alpha must be a finite number > 0, got 0"):
        optimal_policy(ref, p, 0, 0.1)
    with pytest.raises(ValueError, match="optimal_policy: beta must be a finite number >= 0, got -0.1"):
        optimal_policy(ref, p, 0.1, -0.1)
    with pytest.raises(ValueError, match="p_best must sum to 1 over the last dim, got a row summing to 1.2"):
        optimal_policy(ref, torch.tensor([0.8, 0.4]), 0.1, 0.1)
    with pytest.raises(ValueError, match="ref_probs must be finite and non-negative"):
        optimal_policy(torch.tensor([-0.5, 1.5]), p, 0.1, 0.1)
    with pytest.raises(ValueError, match="same number of outcomes"):
        optimal_policy(torch.tensor([0.2, 0.3, 0.5]), p, 0.1, 0.1)
    with pytest.raises(ValueError, match="no common support"):
        optimal_policy(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.1, 0.1)
    with pytest.raises(ValueError, match="rlhf_optimal_policy: beta must be a finite number > 0, got 0"):
        rlhf_optimal_policy(ref, p, 0)
    with pytest.raises(ValueError, match="optimal_policy_from_reward: reward must be finite"):
        optimal_policy_from_reward(ref, torch.tensor([0.0, float("inf")]), 0.1, 0.1)
    with pytest.raises(ValueError, match="spl_objective: pi must sum to 1"):
        spl_objective(torch.tensor([0.5, 0.6]), torch.zeros(2), ref, 0.1, 0.1)
    with pytest.raises(ValueError, match="global_temperature: t must be a finite number > 0, got 0"):
        global_temperature(p, 0)
    with pytest.raises(ValueError, match=r"\('A',\) is both a sequence and a prefix of \('A', 'X'\)"):
        token_temperature(torch.tensor([0.5, 0.5]), [("A",), ("A", "X")], 2.0)
    with pytest.raises(ValueError, match="got 3 sequences but seq_probs has 2"):
        token_temperature(p, [("A",), ("B",), ("C",)], 2.0)
    with pytest.raises(ValueError, match="duplicate"):
        token_temperature(p, [("A",), ("A",)], 2.0)
