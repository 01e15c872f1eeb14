"""spl/losses.py: the SPL loss family against hand-worked values, closed forms, finite differences and its optimum.

Oracles: values derived by hand in docstrings and evaluated with `math` (not torch's logsigmoid); the closed-form
gradient d loss / d z = sigmoid(z) - q; `torch.autograd.gradcheck` (finite differences) in float64; the formulas
of eric-mitchell's DPO trainer, Azar et al. and Wang et al. written out independently in u = pi/pi_ref space;
and Prop. A.1: minimising the exact expected loss over every ordered pair of a finite outcome set must land on
`spl.theory.optimal_policy`, itself checked against the paper's numbers in test_spl_theory.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from spl.losses import (bradley_terry_loss, cdpo_loss, dpo_loss, fdpo_loss, ipo_loss, spl_logits, spl_loss)
from spl.theory import optimal_policy


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, thousands of calls


def softplus(x):
    """log(1 + e^x) = -log sigmoid(-x), in plain floats."""
    return math.log1p(math.exp(x))


def random_logps(batch, seed, dtype=torch.float64):
    """Four [B] tensors of summed log-probs, spread like real sequence log-probs (tens of nats)."""
    generator = torch.Generator().manual_seed(seed)
    return [-30 * torch.rand(batch, generator=generator, dtype=dtype) for _ in range(4)]


# -------------------------------------------------------------------------------------------- hand-worked values

def test_spl_loss_hand_worked_values():
    """alpha = 0.2, beta = 0.1; z = 0.2 (pc - pr) - 0.1 (rc - rr), reward = 0.2 logp - 0.1 ref_logp.

    row  pc  pr  rc  rr | pol lr  ref lr |  z                  | chosen r         rejected r       | loss
     0   -1  -3  -2  -2 |    2      0    |  0.4                | -0.2+0.2 = 0.0   -0.6+0.2 = -0.4  | softplus(-0.4)
     1   -5  -4  -6  -2 |   -1     -4    | -0.2+0.4 = 0.2      | -1.0+0.6 = -0.4  -0.8+0.2 = -0.6  | softplus(-0.2)
     2   -2  -3  -1  -3 |    1      2    |  0.2-0.2 = 0        | -0.4+0.1 = -0.3  -0.6+0.3 = -0.3  | ln 2
     3   -4  -1  -4  -1 |   -3     -3    | (0.2-0.1)(-3) = -0.3| -0.8+0.4 = -0.4  -0.2+0.1 = -0.1  | softplus(0.3)
    Row 3 is pi = pi_ref: the loss is softplus(0.3) = 0.8544, not ln 2 = 0.6931.
    Soft label q = 0.75 on row 0: 0.75 softplus(-0.4) + 0.25 softplus(0.4).
    """
    pc = torch.tensor([-1.0, -5.0, -2.0, -4.0])
    pr = torch.tensor([-3.0, -4.0, -3.0, -1.0])
    rc = torch.tensor([-2.0, -6.0, -1.0, -4.0])
    rr = torch.tensor([-2.0, -2.0, -3.0, -1.0])
    losses, chosen_rewards, rejected_rewards = spl_loss(pc, pr, rc, rr, alpha=0.2, beta=0.1)
    expected = torch.tensor([softplus(-0.4), softplus(-0.2), math.log(2.0), softplus(0.3)])
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.0, -0.4, -0.3, -0.4]), rtol=0, atol=1e-6)
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.4, -0.6, -0.3, -0.1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(spl_logits(pc, pr, rc, rr, 0.2, 0.1), torch.tensor([0.4, 0.2, 0.0, -0.3]),
                               rtol=0, atol=1e-6)

    q = torch.tensor([0.75, 1.0, 1.0, 1.0])
    soft, _, _ = spl_loss(pc, pr, rc, rr, alpha=0.2, beta=0.1, chosen_prob=q)
    expected[0] = 0.75 * softplus(-0.4) + 0.25 * softplus(0.4)
    torch.testing.assert_close(soft, expected, rtol=0, atol=1e-6)


def test_spl_loss_at_reference_is_not_ln2():
    """With pi = pi_ref, z = alpha lr - beta lr = (alpha - beta) lr for lr = log pi_ref(y)/pi_ref(y'):
    loss = log(1 + exp(-(alpha - beta) lr)), which is ln 2 only when alpha = beta or lr = 0."""
    _, _, ref_chosen, ref_rejected = random_logps(16, seed=0)
    alpha, beta = 0.3, 0.1
    losses, _, _ = spl_loss(ref_chosen, ref_rejected, ref_chosen, ref_rejected, alpha, beta)
    ref_lr = (ref_chosen - ref_rejected).tolist()
    expected = torch.tensor([softplus(-(alpha - beta) * lr) for lr in ref_lr], dtype=torch.float64)
    torch.testing.assert_close(losses, expected, rtol=0, atol=1e-12)
    far = torch.tensor([abs(lr) > 5 for lr in ref_lr])
    assert far.any()
    assert ((losses[far] - math.log(2.0)).abs() > 0.2).all()
    dpo, _, _ = dpo_loss(ref_chosen, ref_rejected, ref_chosen, ref_rejected, beta)
    torch.testing.assert_close(dpo, torch.full_like(dpo, math.log(2.0)), rtol=0, atol=1e-12)


# -------------------------------------------------------------------------------------------- DPO and SPL identities

def test_dpo_is_spl_with_alpha_equal_beta_and_matches_dpo_formula():
    """dpo_loss == spl_loss(alpha = beta) bit for bit, and equals eric-mitchell's preference_loss:
    -logsigmoid(beta ((pc - pr) - (rc - rr))), rewards beta (logp - ref_logp)."""
    pc, pr, rc, rr = random_logps(32, seed=1)
    q = torch.rand(32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for chosen_prob in (None, q):
        dpo = dpo_loss(pc, pr, rc, rr, beta=0.1, chosen_prob=chosen_prob)
        spl = spl_loss(pc, pr, rc, rr, alpha=0.1, beta=0.1, chosen_prob=chosen_prob)
        for a, b in zip(dpo, spl):
            assert torch.equal(a, b)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta=0.1)
    logits = (pc - pr) - (rc - rr)
    torch.testing.assert_close(losses, -F.logsigmoid(0.1 * logits), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, 0.1 * (pc - rc), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rejected_rewards, 0.1 * (pr - rr), rtol=1e-12, atol=1e-12)


def test_spl_is_dpo_with_beta_alpha_and_scaled_reference():
    """alpha pl - beta rl = alpha (pl - (beta/alpha) rl): SPL(alpha, beta) is DPO with beta := alpha on a
    reference whose log-probs are scaled by beta/alpha, so precomputed reference log-probs serve every pair."""
    pc, pr, rc, rr = random_logps(32, seed=3)
    alpha, beta = 0.25, 0.1
    spl, _, _ = spl_loss(pc, pr, rc, rr, alpha, beta)
    dpo, _, _ = dpo_loss(pc, pr, (beta / alpha) * rc, (beta / alpha) * rr, beta=alpha)
    torch.testing.assert_close(spl, dpo, rtol=1e-12, atol=1e-12)


def test_rewards_are_detached_and_their_difference_is_the_logit():
    pc, pr, rc, rr = (x.requires_grad_() for x in random_logps(8, seed=4))
    losses, chosen_rewards, rejected_rewards = spl_loss(pc, pr, rc, rr, alpha=0.5, beta=0.1)
    logits = spl_logits(pc, pr, rc, rr, alpha=0.5, beta=0.1)
    assert losses.requires_grad and logits.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad
    torch.testing.assert_close(chosen_rewards - rejected_rewards, logits.detach(), rtol=1e-12, atol=1e-12)
    assert losses.shape == chosen_rewards.shape == rejected_rewards.shape == (8,)


def test_soft_label_endpoints():
    """q = 1 is the plain loss exactly; q = 0 is the plain loss with chosen and rejected swapped."""
    pc, pr, rc, rr = random_logps(8, seed=5)
    plain, _, _ = spl_loss(pc, pr, rc, rr, 0.3, 0.1)
    ones, _, _ = spl_loss(pc, pr, rc, rr, 0.3, 0.1, chosen_prob=torch.ones(8, dtype=torch.float64))
    assert torch.equal(plain, ones)
    zeros, _, _ = spl_loss(pc, pr, rc, rr, 0.3, 0.1, chosen_prob=0.0)
    swapped, _, _ = spl_loss(pr, pc, rr, rc, 0.3, 0.1)
    torch.testing.assert_close(zeros, swapped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype, expected", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_computes_in_float32_or_better(dtype, expected):
    """Low-precision log-probs are upcast before any arithmetic: the result equals the float32 computation on
    the same (rounded) values. Oracle: the float64 computation on those values."""
    pc, pr, rc, rr = (x.to(dtype) for x in random_logps(8, seed=6))
    losses, chosen_rewards, _ = spl_loss(pc, pr, rc, rr, 0.2, 0.1)
    assert losses.dtype == chosen_rewards.dtype == expected
    reference, _, _ = spl_loss(pc.double(), pr.double(), rc.double(), rr.double(), 0.2, 0.1)
    torch.testing.assert_close(losses.double(), reference, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------- gradients

def test_spl_gradients_closed_form():
    """d loss / d z = sigmoid(z) - q (derivative of -(q log s(z) + (1-q) log s(-z))), and
    dz/d(pc, pr, rc, rr) = (alpha, -alpha, -beta, beta), so each input's gradient is that times sigmoid(z) - q."""
    alpha, beta = 0.4, 0.15
    pc, pr, rc, rr = (x.requires_grad_() for x in random_logps(16, seed=7))
    q = torch.rand(16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    losses, _, _ = spl_loss(pc, pr, rc, rr, alpha, beta, chosen_prob=q)
    losses.sum().backward()
    with torch.no_grad():
        z = alpha * (pc - pr) - beta * (rc - rr)
        dz = torch.sigmoid(z) - q
    for tensor, coefficient in ((pc, alpha), (pr, -alpha), (rc, -beta), (rr, beta)):
        torch.testing.assert_close(tensor.grad, coefficient * dz, rtol=1e-12, atol=1e-14)


LOSSES = {
    "spl": lambda pc, pr, rc, rr, q: spl_loss(pc, pr, rc, rr, 0.3, 0.1, chosen_prob=q)[0],
    "spl_reference_free": lambda pc, pr, rc, rr, q: spl_loss(pc, pr, rc, rr, 0.3, 0.0, chosen_prob=q)[0],
    "dpo": lambda pc, pr, rc, rr, q: dpo_loss(pc, pr, rc, rr, 0.1, chosen_prob=q)[0],
    "cdpo": lambda pc, pr, rc, rr, q: cdpo_loss(pc, pr, rc, rr, 0.1, label_smoothing=0.2)[0],
    "ipo": lambda pc, pr, rc, rr, q: ipo_loss(pc, pr, rc, rr, 0.5, chosen_prob=q)[0],
    "fdpo_reverse_kl": lambda pc, pr, rc, rr, q: fdpo_loss(pc, pr, rc, rr, 0.1, "reverse_kl", chosen_prob=q)[0],
    "fdpo_forward_kl": lambda pc, pr, rc, rr, q: fdpo_loss(pc, pr, rc, rr, 0.1, "forward_kl", chosen_prob=q)[0],
    "fdpo_js": lambda pc, pr, rc, rr, q: fdpo_loss(pc, pr, rc, rr, 0.1, "js", chosen_prob=q)[0],
    "fdpo_alpha": lambda pc, pr, rc, rr, q: fdpo_loss(pc, pr, rc, rr, 0.1, "alpha", 0.3, chosen_prob=q)[0],
    "bradley_terry": lambda pc, pr, rc, rr, q: bradley_terry_loss(pc - rc, pr - rr, chosen_prob=q)[0],
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradcheck(name):
    """Analytic gradients of every loss against finite differences (float64), through all four log-probs."""
    generator = torch.Generator().manual_seed(9)
    inputs = [(-3 * torch.rand(5, generator=generator, dtype=torch.float64)).requires_grad_() for _ in range(4)]
    q = torch.rand(5, generator=generator, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *x: LOSSES[name](*x, q), inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


# -------------------------------------------------------------------------------------------- the optimum (Prop. A.1)

def expected_pairwise_spl_loss(policy_logits, ref_probs, p_best, alpha, beta):
    """Sum over all ordered pairs (i, j), i != j, of the soft-label SPL loss with the Bradley-Terry label of
    r = log p_best: q_ij = sigmoid(r_i - r_j) = p_i / (p_i + p_j). This is the exact expected loss of
    preference data drawn from that population on every pair."""
    num_outcomes = policy_logits.shape[-1]
    i, j = torch.tensor([(a, b) for a in range(num_outcomes) for b in range(num_outcomes) if a != b]).T
    policy_logps = torch.log_softmax(policy_logits, dim=-1)  # [K]
    ref_logps, reward = torch.log(ref_probs), torch.log(p_best)  # [K]
    chosen_prob = torch.sigmoid(reward[i] - reward[j])  # [K(K-1)] Bradley-Terry
    losses, _, _ = spl_loss(policy_logps[i], policy_logps[j], ref_logps[i], ref_logps[j], alpha, beta,
                            chosen_prob=chosen_prob)
    return losses.sum()


GRID = [(alpha, beta) for alpha in (0.1, 0.5, 1.0, 2.0) for beta in (0.0, 0.1, 0.5, 1.0)]


@pytest.mark.parametrize("alpha, beta", GRID)
def test_expected_loss_minimiser_is_optimal_policy(alpha, beta):
    """LBFGS on a free softmax policy minimising the exact expected SPL loss lands on
    pi ∝ pi_ref^(beta/alpha) p_best^(1/alpha) (Prop. A.1) within 1e-6 total variation, for 2 to 6 outcomes and
    random p_best and pi_ref. The grid holds alpha = beta (DPO), alpha = 1 and beta = 0 (no reference)."""
    generator = torch.Generator().manual_seed(int(1000 * alpha + 10 * beta))
    for num_outcomes in range(2, 7):
        exponentials = -torch.log(torch.rand(2, num_outcomes, generator=generator, dtype=torch.float64))
        p_best, ref_probs = exponentials / exponentials.sum(-1, keepdim=True)  # [K], [K] Dirichlet(1, ..., 1)
        policy_logits = torch.zeros(num_outcomes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([policy_logits], lr=1.0, max_iter=2000, tolerance_grad=1e-13,
                                      tolerance_change=1e-16, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = expected_pairwise_spl_loss(policy_logits, ref_probs, p_best, alpha, beta)
            loss.backward()
            return loss

        optimizer.step(closure)
        learned = torch.softmax(policy_logits.detach(), dim=-1)
        target = optimal_policy(ref_probs, p_best, alpha, beta)
        total_variation = 0.5 * (learned - target).abs().sum().item()
        assert total_variation < 1e-6, (num_outcomes, total_variation, learned, target)


def test_bradley_terry_optimum_is_log_p_best():
    """The expected Bradley-Terry loss over all ordered pairs with labels q_ij = p_i/(p_i + p_j) is stationary
    at s = log p_best: its gradient there is sum_j (sigmoid(s_i - s_j) - q_ij) - (sigmoid(s_j - s_i) - q_ji) = 0."""
    p_best = torch.tensor([0.55, 0.2, 0.15, 0.1], dtype=torch.float64)
    scores = torch.log(p_best).requires_grad_()
    i, j = torch.tensor([(a, b) for a in range(4) for b in range(4) if a != b]).T
    losses, chosen, rejected = bradley_terry_loss(scores[i], scores[j], chosen_prob=p_best[i] / (p_best[i] + p_best[j]))
    losses.sum().backward()
    torch.testing.assert_close(scores.grad, torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(chosen, torch.log(p_best)[i], rtol=0, atol=0)
    assert not chosen.requires_grad and not rejected.requires_grad
    hard, _, _ = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([1.5]))  # Eq. 2 by hand: softplus(-0.5)
    torch.testing.assert_close(hard, torch.tensor([softplus(-0.5)]), rtol=0, atol=1e-6)


# -------------------------------------------------------------------------------------------- baselines

def test_cdpo_matches_label_smoothing_formula():
    """eric-mitchell's preference_loss: -logsigmoid(beta h) (1 - eps) - logsigmoid(-beta h) eps."""
    pc, pr, rc, rr = random_logps(16, seed=10)
    h = (pc - pr) - (rc - rr)
    losses, _, _ = cdpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.2)
    expected = -F.logsigmoid(0.1 * h) * 0.8 - F.logsigmoid(-0.1 * h) * 0.2
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(cdpo_loss(pc, pr, rc, rr, 0.1, 0.0)[0], dpo_loss(pc, pr, rc, rr, 0.1)[0])


def test_ipo_matches_azar_eq17_from_probabilities():
    """Azar et al. Eq. 17 written with probabilities: h = log(pi(y) pi_ref(y') / (pi(y') pi_ref(y))),
    loss = (h - 1/(2 tau))^2. At pi = pi_ref, h = 0 and the loss is 1/(4 tau^2). With soft labels the
    expected loss is minimised at h = (q - 1/2)/tau, where its h-derivative
    2q(h - 1/(2tau)) + 2(1-q)(h + 1/(2tau)) = 2h - (2q - 1)/tau vanishes."""
    pc, pr, rc, rr = (x / 10 for x in random_logps(16, seed=11))  # probabilities e^-3 .. 1, safe to exponentiate
    tau = 0.5
    h = torch.log(pc.exp() * rr.exp() / (pr.exp() * rc.exp()))
    losses, chosen_rewards, _ = ipo_loss(pc, pr, rc, rr, tau)
    torch.testing.assert_close(losses, (h - 1 / (2 * tau)) ** 2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chosen_rewards, tau * (pc - rc), rtol=1e-12, atol=1e-12)
    at_ref, _, _ = ipo_loss(rc, rr, rc, rr, tau)
    torch.testing.assert_close(at_ref, torch.full_like(at_ref, 1 / (4 * tau ** 2)), rtol=0, atol=1e-12)

    q = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0], dtype=torch.float64)
    policy_chosen = ((q - 0.5) / tau).requires_grad_()  # h = policy log-ratio when ref and rejected are 0
    zeros = torch.zeros(5, dtype=torch.float64)
    soft, _, _ = ipo_loss(policy_chosen, zeros, zeros, zeros, tau, chosen_prob=q)
    soft.sum().backward()
    torch.testing.assert_close(policy_chosen.grad, zeros, rtol=0, atol=1e-12)


def fdpo_naive(pc, pr, rc, rr, beta, divergence, a=0.5):
    """Wang et al.'s loss written literally in u = pi/pi_ref (overflows for large |log u|; float64 oracle)."""
    derivative = {"reverse_kl": lambda u: torch.log(u) + 1, "forward_kl": lambda u: -1 / u,
                  "js": lambda u: torch.log(2 * u / (1 + u)), "alpha": lambda u: (1 - u ** (-a)) / a}[divergence]
    u_chosen, u_rejected = torch.exp(pc - rc), torch.exp(pr - rr)
    return -F.logsigmoid(beta * derivative(u_chosen) - beta * derivative(u_rejected))


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl", "js", "alpha"])
def test_fdpo_matches_wang_et_al_formula(divergence):
    pc, pr, rc, rr = random_logps(32, seed=12)
    rc, rr = pc + torch.randn(32, dtype=torch.float64), pr + torch.randn(32, dtype=torch.float64)  # |log u| ~ 1-3
    losses, chosen_rewards, rejected_rewards = fdpo_loss(pc, pr, rc, rr, 0.1, divergence, alpha_divergence=0.3)
    torch.testing.assert_close(losses, fdpo_naive(pc, pr, rc, rr, 0.1, divergence, a=0.3), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(-F.logsigmoid(chosen_rewards - rejected_rewards), losses, rtol=1e-12, atol=1e-12)
    at_ref = fdpo_loss(rc, rr, rc, rr, 0.1, divergence, alpha_divergence=0.3)
    torch.testing.assert_close(at_ref[1], torch.zeros(32, dtype=torch.float64), rtol=0, atol=0)  # reward 0 at pi_ref


def test_fdpo_reverse_kl_is_dpo_and_alpha_interpolates_the_kls():
    """f'(u) = log u + 1 gives beta (log u_w - log u_l) = DPO's logit (losses and rewards equal);
    (1 - u^-a)/a -> log u as a -> 0 and -> 1 - 1/u as a -> 1, with error O(a (log u)^2) and O((1-a) ...)."""
    pc, pr, rc, rr = random_logps(32, seed=13)
    rc, rr = pc + torch.randn(32, dtype=torch.float64), pr + torch.randn(32, dtype=torch.float64)
    for a, b in zip(fdpo_loss(pc, pr, rc, rr, 0.1, "reverse_kl"), dpo_loss(pc, pr, rc, rr, 0.1)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    near_reverse = fdpo_loss(pc, pr, rc, rr, 0.1, "alpha", alpha_divergence=1e-7)[0]
    near_forward = fdpo_loss(pc, pr, rc, rr, 0.1, "alpha", alpha_divergence=1 - 1e-7)[0]
    torch.testing.assert_close(near_reverse, fdpo_loss(pc, pr, rc, rr, 0.1, "reverse_kl")[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(near_forward, fdpo_loss(pc, pr, rc, rr, 0.1, "forward_kl")[0], rtol=0, atol=1e-6)


def test_fdpo_log_space_survives_extreme_ratios_in_float32():
    """Sequence log-ratios of +-200 nats: u = e^200 overflows float32, so a literal log(2u/(1+u)) is NaN.
    Computed from log u, every member stays finite in float32 and matches the float64 literal formula
    (float64 holds e^200). Forward KL and alpha use exp(-a log u), finite for log u >= -88 in float32."""
    log_u_chosen = torch.tensor([200.0, -50.0, 80.0, 3.0])
    log_u_rejected = torch.tensor([-5.0, 200.0, -60.0, -80.0])
    zeros = torch.zeros(4)
    naive32 = fdpo_naive(log_u_chosen, log_u_rejected, zeros, zeros, 0.1, "js")
    assert torch.isnan(naive32).any()  # the failure the log-space form avoids
    for divergence in ("reverse_kl", "forward_kl", "js", "alpha"):
        losses, _, _ = fdpo_loss(log_u_chosen, log_u_rejected, zeros, zeros, 0.1, divergence, alpha_divergence=0.5)
        assert losses.dtype == torch.float32 and torch.isfinite(losses).all(), divergence
        expected = fdpo_naive(log_u_chosen.double(), log_u_rejected.double(), zeros.double(), zeros.double(), 0.1,
                              divergence, a=0.5)
        torch.testing.assert_close(losses.double(), expected, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------------------- bad input

def test_bad_input_raises_clear_errors():
    pc, pr, rc, rr = random_logps(4, seed=14)
    with pytest.raises(ValueError, match="spl_loss: alpha must be finite and > 0, got 0.0"):
        spl_loss(pc, pr, rc, rr, alpha=0.0, beta=0.1)
    with pytest.raises(ValueError, match="alpha must be finite and > 0, got -0.5"):
        spl_loss(pc, pr, rc, rr, alpha=-0.5, beta=0.1)
    with pytest.raises(ValueError, match="alpha must be finite"):
        spl_loss(pc, pr, rc, rr, alpha=float("nan"), beta=0.1)
    with pytest.raises(ValueError, match="beta must be finite and >= 0, got -0.1"):
        spl_loss(pc, pr, rc, rr, alpha=0.2, beta=-0.1)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        spl_loss(pc, pr, rc, rr, alpha="0.2", beta=0.1)
    with pytest.raises(ValueError,
                       match=r"policy_rejected_logps has shape \(3,\), expected \(4,\) like policy_chosen_logps"):
        spl_loss(pc, pr[:3], rc, rr, 0.2, 0.1)
    with pytest.raises(ValueError, match=r"ref_rejected_logps has shape \(4, 1\)"):
        spl_loss(pc, pr, rc, rr[:, None], 0.2, 0.1)
    with pytest.raises(TypeError, match="ref_chosen_logps must be a torch.Tensor, got list"):
        spl_loss(pc, pr, [0.0] * 4, rr, 0.2, 0.1)
    with pytest.raises(ValueError, match="chosen_prob must be in \\[0, 1\\], got 1.5"):
        spl_loss(pc, pr, rc, rr, 0.2, 0.1, chosen_prob=torch.tensor([0.5, 1.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="chosen_prob must be in \\[0, 1\\], got nan"):
        spl_loss(pc, pr, rc, rr, 0.2, 0.1, chosen_prob=torch.tensor([0.5, float("nan"), 0.5, 0.5]))
    with pytest.raises(ValueError, match="chosen_prob must be finite and >= 0, got -0.1"):
        spl_loss(pc, pr, rc, rr, 0.2, 0.1, chosen_prob=-0.1)
    with pytest.raises(ValueError, match="dpo_loss: chosen_prob must be in \\[0, 1\\], got 2.0"):
        dpo_loss(pc, pr, rc, rr, 0.1, chosen_prob=2.0)
    with pytest.raises(ValueError, match="cdpo_loss: ref_chosen_logps has shape"):
        cdpo_loss(pc, pr, rc[:1], rr, 0.1, 0.1)
    with pytest.raises(ValueError, match=r"chosen_prob has shape \(2,\), expected \(4,\)"):
        spl_loss(pc, pr, rc, rr, 0.2, 0.1, chosen_prob=torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="dpo_loss: beta must be finite and > 0, got 0.0"):
        dpo_loss(pc, pr, rc, rr, beta=0.0)
    for eps in (0.7, 0.5):  # 0.5: coin-flip labels, nothing learned; the same rule as train.py's --label-smoothing
        with pytest.raises(ValueError, match=f"cdpo_loss: label_smoothing must be in \\[0, 0.5\\), got {eps}"):
            cdpo_loss(pc, pr, rc, rr, 0.1, label_smoothing=eps)
    with pytest.raises(ValueError, match="ipo_loss: tau must be finite and > 0, got 0.0"):
        ipo_loss(pc, pr, rc, rr, tau=0.0)
    with pytest.raises(ValueError, match="fdpo_loss: divergence must be one of"):
        fdpo_loss(pc, pr, rc, rr, 0.1, divergence="kl")
    with pytest.raises(ValueError, match="fdpo_loss: alpha_divergence must be in \\(0, 1\\)"):
        fdpo_loss(pc, pr, rc, rr, 0.1, divergence="alpha", alpha_divergence=1.0)
    with pytest.raises(ValueError, match="fdpo_loss: alpha_divergence must be finite and > 0, got 0.0"):
        fdpo_loss(pc, pr, rc, rr, 0.1, divergence="alpha", alpha_divergence=0.0)
    with pytest.raises(ValueError, match="bradley_terry_loss: rejected_scores has shape"):
        bradley_terry_loss(pc, pr[:2])


# -------------------------------------------------------------------------------------------- likelihood displacement

from spl.losses import anchored_spl_loss, dpop_loss, option_mass_anchor, prompt_logsumexp, rpo_loss  # noqa: E402
from spl.theory import anchored_optimum  # noqa: E402


def test_prompt_logsumexp_and_anchor_against_a_loop():
    """Oracle: torch.logsumexp over each prompt's rows, picked out by a Python loop; the anchor is the square of
    the difference of two of them, and its one-sided form keeps only the part where the policy holds less."""
    generator = torch.Generator().manual_seed(5)
    response_prompt = torch.tensor([2, 0, 0, 1, 2, 2, 0])
    policy, ref = (-20 * torch.rand(7, generator=generator, dtype=torch.float64) for _ in range(2))
    loop = lambda logps: torch.stack([torch.logsumexp(logps[response_prompt == q], 0) for q in range(3)])
    torch.testing.assert_close(prompt_logsumexp(policy, response_prompt), loop(policy), rtol=0, atol=1e-12)
    torch.testing.assert_close(option_mass_anchor(policy, ref, response_prompt), (loop(policy) - loop(ref)) ** 2,
                               rtol=0, atol=1e-12)
    one_sided = option_mass_anchor(policy, ref, response_prompt, one_sided=True)
    torch.testing.assert_close(one_sided, torch.clamp(loop(ref) - loop(policy), min=0) ** 2, rtol=0, atol=1e-12)
    extreme = torch.tensor([-1000.0, -1001.0], dtype=torch.float32)  # exp underflows: the shift keeps it finite
    torch.testing.assert_close(prompt_logsumexp(extreme, torch.tensor([0, 0])),
                               torch.tensor([-1000.0 + math.log1p(math.exp(-1.0))]), rtol=0, atol=1e-4)


def test_anchored_loss_at_zero_is_spl_on_the_gathered_rows_and_gradients_agree():
    """anchor = 0: exactly spl_loss on (rows[pair_chosen], rows[pair_rejected]). anchor > 0: each pair's loss
    gains anchor * (lse_pi - lse_ref)^2 of its prompt, and autograd's gradient of the sum equals the closed form
    2 anchor n_q (lse_pi - lse_ref) softmax_q(s) added to SPL's (n_q: the prompt's pairs)."""
    generator = torch.Generator().manual_seed(6)
    response_prompt = torch.tensor([0, 0, 0, 1, 1])
    pair_chosen, pair_rejected = torch.tensor([0, 0, 1, 3]), torch.tensor([1, 2, 2, 4])
    policy = (-10 * torch.rand(5, generator=generator, dtype=torch.float64)).requires_grad_()
    ref = -10 * torch.rand(5, generator=generator, dtype=torch.float64)
    q = torch.tensor([0.7, 0.6, 0.2, 0.9], dtype=torch.float64)
    got = anchored_spl_loss(policy, ref, pair_chosen, pair_rejected, response_prompt, 0.3, 0.1, 0.0, q)
    want = spl_loss(policy[pair_chosen], policy[pair_rejected], ref[pair_chosen], ref[pair_rejected], 0.3, 0.1, q)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    anchor = 2.5
    losses, _, _ = anchored_spl_loss(policy, ref, pair_chosen, pair_rejected, response_prompt, 0.3, 0.1, anchor, q)
    (grad,) = torch.autograd.grad(losses.sum(), policy)
    (spl_grad,) = torch.autograd.grad(want[0].sum(), policy)
    expected = spl_grad.clone()
    for prompt, pairs in ((0, 3), (1, 1)):
        rows = response_prompt == prompt
        gap = torch.logsumexp(policy[rows], 0) - torch.logsumexp(ref[rows], 0)
        expected[rows] += 2 * anchor * pairs * gap * torch.softmax(policy[rows], 0)
    torch.testing.assert_close(grad, expected.detach(), rtol=1e-12, atol=1e-12)


def test_rpo_and_dpop_hand_worked_values():
    """RPO: SPL plus w times the NLL of the label's response; DPOP: the chosen's drop below its reference enters
    the logit. Pair: policy (-2, -5), reference (-3, -4), alpha 0.5, beta 0.1:
    z = 0.5 (3) - 0.1 (1) = 1.4. RPO, w = 0.2, hard label: softplus(-1.4) + 0.2 * 2. Soft q = 0.7:
    0.7 softplus(-1.4) + 0.3 softplus(1.4) + 0.2 (0.7 * 2 + 0.3 * 5).
    DPOP, lambda 3: the chosen gained (-2 > -3), no penalty: softplus(-1.4); the rejected fell by 1, so the
    flipped label's logit is -1.4 - 0.5 * 3 * 1 = -2.9: with q = 0.7, 0.7 softplus(-1.4) + 0.3 softplus(2.9)."""
    pc, pr, rc, rr = (torch.tensor([v], dtype=torch.float64) for v in (-2.0, -5.0, -3.0, -4.0))
    hard = rpo_loss(pc, pr, rc, rr, 0.5, 0.1, 0.2)[0].item()
    assert hard == pytest.approx(softplus(-1.4) + 0.4, abs=1e-12)
    soft = rpo_loss(pc, pr, rc, rr, 0.5, 0.1, 0.2, chosen_prob=0.7)[0].item()
    assert soft == pytest.approx(0.7 * softplus(-1.4) + 0.3 * softplus(1.4) + 0.2 * (1.4 + 1.5), abs=1e-12)
    assert dpop_loss(pc, pr, rc, rr, 0.5, 0.1, 3.0)[0].item() == pytest.approx(softplus(-1.4), abs=1e-12)
    soft = dpop_loss(pc, pr, rc, rr, 0.5, 0.1, 3.0, chosen_prob=0.7)[0].item()
    assert soft == pytest.approx(0.7 * softplus(-1.4) + 0.3 * softplus(2.9), abs=1e-12)
    # DPO's form (alpha = beta): -log sigmoid(beta (h - lambda max(0, log pi_ref(y)/pi(y)))), chosen fell by 0.5
    pc2 = torch.tensor([-3.5], dtype=torch.float64)
    h = (-3.5 + 5.0) - (-3.0 + 4.0)
    assert dpop_loss(pc2, pr, rc, rr, 0.1, 0.1, 50.0)[0].item() == pytest.approx(softplus(-0.1 * (h - 50 * 0.5)),
                                                                                    abs=1e-12)


def outcome_set(num_data, num_unmentioned, seed):
    """A prompt's finite outcome set: num_data responses that the data compares plus num_unmentioned that it
    never mentions. Returns (ref_logits [N], p_best [K]); the reference is a softmax over all N outcomes, so its
    mass on the data's responses is below 1."""
    generator = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(num_data + num_unmentioned, generator=generator, dtype=torch.float64)
    exponentials = -torch.log(torch.rand(num_data, generator=generator, dtype=torch.float64))
    return ref_logits, exponentials / exponentials.sum()


def all_pairs(p_best_per_prompt):
    """Every unordered pair of every prompt's responses, rows numbered prompt after prompt, with the
    Bradley-Terry soft labels q_ij = p_i / (p_i + p_j). Returns (pair_chosen, pair_rejected, chosen_prob,
    response_prompt)."""
    chosen, rejected, q, response_prompt, start = [], [], [], [], 0
    for prompt, p_best in enumerate(p_best_per_prompt):
        k = len(p_best)
        for i in range(k):
            for j in range(i + 1, k):
                chosen.append(start + i), rejected.append(start + j)
                q.append(float(p_best[i] / (p_best[i] + p_best[j])))
        response_prompt += [prompt] * k
        start += k
    return (torch.tensor(chosen), torch.tensor(rejected), torch.tensor(q, dtype=torch.float64),
            torch.tensor(response_prompt))


def minimise(objective, theta, max_iter=3000):
    theta = theta.clone().requires_grad_()
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, tolerance_grad=1e-14, tolerance_change=1e-18,
                                  history_size=30, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = objective(theta)
        value.backward()
        return value

    optimizer.step(closure)
    return theta.detach()


ANCHOR_GRID = [(0.2, 0.1), (0.1, 0.1), (1.0, 0.1), (0.5, 0.0)]


@pytest.mark.parametrize("alpha, beta", ANCHOR_GRID)
@pytest.mark.parametrize("one_sided", [False, True])
def test_anchored_spl_optimum_is_prop_a1_with_the_reference_mass(alpha, beta, one_sided):
    """Two prompts, each with a finite outcome set of 7: K = 4 (then 3) responses that the data compares, plus 3
    (then 4) that it never mentions. The policy is a free softmax over all 7 outcomes per prompt (initialised at the
    reference, as training starts), trained on SPL over every pair with Bradley-Terry soft labels plus the
    anchor. The docstring of `anchored_spl_loss` derives the minimiser: over the data's responses, Prop. A.1's
    distribution pi_ref^(beta/alpha) p^(1/alpha) / Z (`optimal_policy`) with their total mass equal to the
    reference's (two-sided anchor), or at least the reference's (one-sided). LBFGS must land there within 1e-6 TV
    and 1e-6 in log-mass, and the log-probs themselves on `anchored_optimum` (two-sided)."""
    sizes = (4, 3)
    sets = [outcome_set(k, 7 - k, seed=10 * k + int(10 * alpha)) for k in sizes]
    pair_chosen, pair_rejected, chosen_prob, response_prompt = all_pairs([p for _, p in sets])
    ref_rows = torch.cat([torch.log_softmax(logits, 0)[:k] for (logits, _), k in zip(sets, sizes)])  # [R]

    def rows(theta):  # theta [2, 7]: each prompt's policy logits; the data's responses are its first k outcomes
        return torch.cat([torch.log_softmax(theta[q], 0)[:k] for q, k in enumerate(sizes)])

    def objective(theta):
        losses, _, _ = anchored_spl_loss(rows(theta), ref_rows, pair_chosen, pair_rejected, response_prompt,
                                         alpha, beta, 1.0, chosen_prob, one_sided=one_sided)
        return losses.sum()

    theta = minimise(objective, torch.stack([logits for logits, _ in sets]))
    learned = rows(theta)
    for q, ((ref_logits, p_best), k) in enumerate(zip(sets, sizes)):
        mine, ref = learned[response_prompt == q], ref_rows[response_prompt == q]
        target = optimal_policy(ref.exp(), p_best, alpha, beta)  # Prop. A.1 over the data's responses
        assert 0.5 * (mine.softmax(0) - target).abs().sum().item() < 1e-6, (q, mine.softmax(0), target)
        mass_gap = (torch.logsumexp(mine, 0) - torch.logsumexp(ref, 0)).item()
        if one_sided:
            assert mass_gap > -1e-6
        else:
            assert abs(mass_gap) < 1e-6
            torch.testing.assert_close(mine, anchored_optimum(ref, p_best, alpha, beta), rtol=0, atol=1e-5)
        assert torch.logsumexp(ref, 0).item() < -0.05  # the unmentioned outcomes hold real mass: the test has teeth


def test_without_the_anchor_the_mass_is_a_flat_direction():
    """On the policies with Prop. A.1's ratios and any mass m on the data's responses (log-probs u* + m), SPL's
    loss is the same for every m (to rounding): SPL cannot say how much probability the responses keep. The
    anchored loss on the same line is SPL's plus n (m - lse(r))^2 exactly, so it singles out m = lse(r)."""
    logits, p_best = outcome_set(4, 3, seed=3)
    pair_chosen, pair_rejected, chosen_prob, response_prompt = all_pairs([p_best])
    ref_rows = torch.log_softmax(logits, 0)[:4]
    family = torch.log(optimal_policy(ref_rows.exp(), p_best, 0.2, 0.1))  # [4], lse = 0
    ref_mass = torch.logsumexp(ref_rows, 0)

    def total(rows, anchor):
        return anchored_spl_loss(rows, ref_rows, pair_chosen, pair_rejected, response_prompt, 0.2, 0.1, anchor,
                                 chosen_prob)[0].sum()

    masses = torch.linspace(-6, 0, 13, dtype=torch.float64)
    plain = torch.stack([total(family + m, 0.0) for m in masses])
    torch.testing.assert_close(plain, plain[:1].expand(13), rtol=0, atol=1e-12)
    anchored = torch.stack([total(family + m, 0.7) for m in masses])
    torch.testing.assert_close(anchored, plain + 0.7 * 6 * (masses - ref_mass) ** 2, rtol=0, atol=1e-12)


@pytest.mark.parametrize("remedy", ["rpo", "dpop"])
def test_rpo_and_dpop_optima_differ_from_prop_a1(remedy):
    """The same outcome set as above (K = 4 responses + 3 unmentioned), alpha = beta = 0.1 (DPO, a peaked Prop.
    A.1 that lowers three of the four responses far below the reference). On the family of policies whose
    distribution over the responses is Prop. A.1's, with any mass m on them, the loss depends on m alone, so its
    best value there is a 1-D minimum (a fine grid of m, refined). Minimising the loss freely over the 7 logits
    must reach a value lower by a clear margin: the optimum is not in the family, i.e. not Prop. A.1's ratios,
    and the distribution it lands on is > 0.05 in TV from Prop. A.1's. (SPL + the anchor, in the test above,
    reaches its family's value exactly.)"""
    alpha = beta = 0.1
    logits, p_best = outcome_set(4, 3, seed=4)
    pair_chosen, pair_rejected, chosen_prob, _ = all_pairs([p_best])
    ref_rows = torch.log_softmax(logits, 0)[:4]

    def loss_of_rows(rows):  # rows [..., 4] -> [...]
        shape = rows.shape[:-1] + pair_chosen.shape
        args = (rows[..., pair_chosen], rows[..., pair_rejected], ref_rows[pair_chosen].expand(shape),
                ref_rows[pair_rejected].expand(shape), alpha, beta)
        if remedy == "rpo":
            return rpo_loss(*args, 0.5, chosen_prob=chosen_prob.expand(shape))[0].sum(-1)
        return dpop_loss(*args, 5.0, chosen_prob=chosen_prob.expand(shape))[0].sum(-1)

    family = torch.log(optimal_policy(ref_rows.exp(), p_best, alpha, beta))  # [4] lse = 0
    grid = torch.linspace(-12, 0, 12001, dtype=torch.float64)  # m, 1e-3 nats apart: far finer than the margin
    best_on_family = loss_of_rows(family + grid[:, None]).min().item()

    # (RPO has no finite minimiser: it drives the unmentioned outcomes to 0; 50 iterations get far enough)
    theta = minimise(lambda theta: loss_of_rows(torch.log_softmax(theta, 0)[:4]), logits, max_iter=50)
    rows = torch.log_softmax(theta, 0)[:4]
    assert loss_of_rows(rows).item() < best_on_family - 0.1
    target = optimal_policy(ref_rows.exp(), p_best, alpha, beta)
    assert 0.5 * (rows.softmax(0) - target).abs().sum().item() > 0.05
