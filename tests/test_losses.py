"""spl/losses.py: the SPL loss family against hand-worked values, closed forms, finite differences and its optimum.

Oracles: values derived by hand in docstrings and evaluated with `math` (not torch's logsigmoid); the closed-form
gradient d loss / d z = sigmoid(z) - q; `torch.autograd.gradcheck` (finite differences) in float64; the formulas
of eric-mitchell's DPO trainer, Azar et al. and Wang et al. written out independently in u = pi/pi_ref space;
and Prop. A.1: minimising the exact expected loss over every ordered pair of a finite outcome set must land on
`spl.theory.optimal_policy`, itself checked against the paper's numbers in test_theory.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from spl.losses import (bradley_terry_loss, cdpo_loss, dpo_loss, fdpo_loss, ipo_loss, spl_logits, spl_loss)
from spl.theory import optimal_policy


@pytest.fixture(autouse=True)
def one_thread():
    """ATen's CPU log_sigmoid kernel parallelises even a 30-element tensor; on a busy 2-core machine every call
    then waits for a worker thread (~10 ms, against ~2 us on one thread), and the LBFGS tests make thousands."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    with pytest.raises(ValueError, match="cdpo_loss: label_smoothing must be in \\[0, 0.5\\], got 0.7"):
        cdpo_loss(pc, pr, rc, rr, 0.1, label_smoothing=0.7)
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
