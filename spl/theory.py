"""Closed-form optima of SPL, RLHF and DPO over a finite set of outcomes, and global vs token temperature.

For one prompt with K candidate responses, SPL's RLHF objective (Eq. 4)

    max_pi  E_pi[r] + alpha H(pi) - beta H(pi, pi_ref)

is strictly concave on the simplex (alpha > 0) and has the Gibbs maximiser (Eq. 27-35)

    pi*(y) = pi_ref(y)^(beta/alpha) exp(r(y)/alpha) / Z,       max value = alpha log Z.

With Bradley-Terry / Plackett-Luce raters, r = log p_best + const, where p_best(y) is the fraction of the
population for whom y is the best response; the constant cancels in Z (Prop. A.1):

    pi*(y) ∝ pi_ref(y)^(beta/alpha) p_best(y)^(1/alpha).

alpha = beta is RLHF/DPO, pi* ∝ pi_ref p^(1/beta) (Prop. 3.1): with beta = 0.1 preferences are raised to the
10th power. alpha = 1 with a uniform reference returns p_best itself (Corollary 3.1). Dividing the exponents by
those of DPO's optimum shows alpha/beta is a temperature on whole sequences (Eq. 7-10): pi_SPL ∝ pi_DPO^(beta/alpha).

Paper errata used here: Eq. 25 writes H(pi_ref, pi) where Eq. 4 and the derivation (Eq. 27, pi^T log pi_ref)
use the cross-entropy H(pi, pi_ref); this module follows Eq. 4.

All functions take torch tensors over the last dim, batched `[..., K]` (float64 recommended; lists and numpy
arrays become float64), and compute in log space: log pi* = log_softmax((beta/alpha) log pi_ref + r/alpha).
"""
import math

import torch


# -------------------------------------------------------------------------------------------- input checks

def _as_tensor(x):
    """A float tensor: tensors keep a floating dtype, everything else becomes float64."""
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.to(torch.float64)
    return torch.as_tensor(x, dtype=torch.float64)


def _check_coefficients(fn, alpha, beta):
    for name, value, allow_zero in (("alpha", alpha, False), ("beta", beta, True)):
        valid = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
        if not valid or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{fn}: {name} must be a finite number {bound}, got {value!r}")
    return float(alpha), float(beta)


def _check_probs(fn, name, probs, normalised):
    """Non-negative, finite, K >= 1 on the last dim, some mass in every row; summing to 1 if `normalised`."""
    probs = _as_tensor(probs)
    if probs.dim() == 0:
        raise ValueError(f"{fn}: {name} must have a last dim of outcomes [..., K], got a scalar")
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
        raise ValueError(f"{fn}: {name} must be finite and non-negative")
    total = probs.sum(-1)  # [...]
    if bool((total <= 0).any()):
        raise ValueError(f"{fn}: {name} has a row with no mass (all zeros)")
    if normalised and not torch.allclose(total, torch.ones_like(total), rtol=0, atol=1e-5):
        worst = total.flatten()[(total.flatten() - 1).abs().argmax()]
        raise ValueError(f"{fn}: {name} must sum to 1 over the last dim, got a row summing to {worst.item():.6g}")
    return probs


def _check_same_outcomes(fn, **tensors):
    """Same number of outcomes K on the last dim, leading dims broadcastable."""
    names = list(tensors)
    shapes = [tuple(tensors[name].shape) for name in names]
    if len({shape[-1] for shape in shapes}) != 1:
        listing = ", ".join(f"{name} {shape}" for name, shape in zip(names, shapes))
        raise ValueError(f"{fn}: inputs must have the same number of outcomes on the last dim, got {listing}")
    try:
        torch.broadcast_shapes(*shapes)
    except RuntimeError:
        listing = ", ".join(f"{name} {shape}" for name, shape in zip(names, shapes))
        raise ValueError(f"{fn}: leading dims do not broadcast: {listing}") from None


# -------------------------------------------------------------------------------------------- optimal policies

def optimal_policy_from_reward(ref_probs, reward, alpha, beta):
    """SPL's optimum for a known reward (Eq. 35):  pi*(y) = pi_ref(y)^(beta/alpha) exp(r(y)/alpha) / Z.

    ref_probs `[..., K]`: the reference's probabilities of the K outcomes, or any positive multiple of them
    (a reference model's sequence probabilities over a candidate set need not sum to 1; the scale cancels in Z).
    reward `[..., K]`: finite. Returns pi* `[..., K]`, summing to 1. With beta = 0 the reference drops out,
    even where it is 0 (pi_ref^0 = 1); with beta > 0 an outcome the reference rules out gets pi* = 0.
    """
    fn = "optimal_policy_from_reward"
    alpha, beta = _check_coefficients(fn, alpha, beta)
    ref_probs = _check_probs(fn, "ref_probs", ref_probs, normalised=False)
    reward = _as_tensor(reward)
    if not bool(torch.isfinite(reward).all()):
        raise ValueError(f"{fn}: reward must be finite")
    _check_same_outcomes(fn, ref_probs=ref_probs, reward=reward)
    log_weights = torch.xlogy(beta / alpha, ref_probs) + reward / alpha  # [..., K] Eq. 35, 0 log 0 = 0 at beta = 0
    return torch.softmax(log_weights, dim=-1)  # [..., K]


def optimal_policy(ref_probs, p_best, alpha, beta):
    """SPL's optimum under population preferences (Prop. A.1):  pi*(y) ∝ pi_ref(y)^(beta/alpha) p_best(y)^(1/alpha).

    p_best `[..., K]`: the fraction of the population for whom each outcome is the best, a distribution
    (Bradley-Terry / Plackett-Luce rewards are r = log p_best). An outcome nobody ranks first gets pi* = 0.
    ref_probs `[..., K]` as in `optimal_policy_from_reward`. Returns pi* `[..., K]`.
    alpha = beta is DPO's optimum (Prop. 3.1); alpha = 1 with a uniform reference returns p_best (Cor. 3.1).
    """
    fn = "optimal_policy"
    alpha, beta = _check_coefficients(fn, alpha, beta)
    ref_probs = _check_probs(fn, "ref_probs", ref_probs, normalised=False)
    p_best = _check_probs(fn, "p_best", p_best, normalised=True)
    _check_same_outcomes(fn, ref_probs=ref_probs, p_best=p_best)
    log_weights = torch.xlogy(beta / alpha, ref_probs) + torch.log(p_best) / alpha  # [..., K] Prop. A.1
    if bool(torch.isneginf(log_weights).all(-1).any()):
        raise ValueError(f"{fn}: every outcome has zero weight in some row (ref_probs and p_best have no "
                         f"common support)")
    return torch.softmax(log_weights, dim=-1)  # [..., K]


def anchored_optimum(ref_logps, p_best, alpha, beta):
    """The log-probs the policy reaches over a prompt's K responses under SPL + the option-mass anchor
    (`spl.losses.anchored_spl_loss`): Prop. A.1's distribution, scaled to the reference's mass on them,

        log pi*(y_i) = log [ pi_ref(y_i)^(beta/alpha) p_best(y_i)^(1/alpha) / Z ] + log sum_j pi_ref(y_j).

    ref_logps `[..., K]`: the reference's (unnormalised) log-probs of the responses, finite; p_best `[..., K]` as
    in `optimal_policy`. Returns `[..., K]`; exp of it sums to the reference's mass, exp(logsumexp(ref_logps)).
    """
    fn = "anchored_optimum"
    ref_logps = _as_tensor(ref_logps)
    if ref_logps.dim() == 0 or not bool(torch.isfinite(ref_logps).all()):
        raise ValueError(f"{fn}: ref_logps must be finite log-probs [..., K]")
    mass = torch.logsumexp(ref_logps, dim=-1, keepdim=True)  # [..., 1]
    ratios = optimal_policy(torch.exp(ref_logps - mass), p_best, alpha, beta)  # [..., K] Prop. A.1
    return torch.log(ratios) + mass  # [..., K]


def rlhf_optimal_policy(ref_probs, p_best, beta):
    """The KL-regularised RLHF / DPO optimum (Prop. 3.1; A.1 with alpha = beta):

        pi*(y) ∝ pi_ref(y) p_best(y)^(1/beta).

    Takes p_best like `optimal_policy` (for a reward r, use `optimal_policy_from_reward(ref, r, beta, beta)`).
    With 80% / 20% preferences and beta = 0.1 the majority gets 4^10 / (4^10 + 1) = 99.9999% (Section 3.1).
    """
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"rlhf_optimal_policy: beta must be a finite number > 0, got {beta!r}")
    return optimal_policy(ref_probs, p_best, alpha=beta, beta=beta)


def spl_objective(pi, reward, ref_probs, alpha, beta):
    """SPL's RLHF objective (Eq. 4) as written:  E_pi[r] + alpha H(pi) - beta H(pi, pi_ref),

        H(pi) = -sum pi log pi,   H(pi, pi_ref) = -sum pi log pi_ref   (the cross-entropy of pi against pi_ref).

    pi, ref_probs `[..., K]` distributions; reward `[..., K]` finite. Returns `[...]`, differentiable in pi.
    Its maximum over the simplex is alpha log sum_y pi_ref^(beta/alpha) exp(r/alpha), at
    `optimal_policy_from_reward`. With alpha = beta it is E_pi[r] - beta KL(pi || pi_ref) (Eq. 3).
    """
    fn = "spl_objective"
    alpha, beta = _check_coefficients(fn, alpha, beta)
    pi = _check_probs(fn, "pi", pi, normalised=True)
    ref_probs = _check_probs(fn, "ref_probs", ref_probs, normalised=True)
    reward = _as_tensor(reward)
    if not bool(torch.isfinite(reward).all()):
        raise ValueError(f"{fn}: reward must be finite")
    _check_same_outcomes(fn, pi=pi, reward=reward, ref_probs=ref_probs)
    expected_reward = (pi * reward).sum(-1)  # [...] E_pi[r]
    entropy = -torch.xlogy(pi, pi).sum(-1)  # [...] H(pi), 0 log 0 = 0
    cross_entropy = -torch.xlogy(pi, ref_probs).sum(-1)  # [...] H(pi, pi_ref)
    return expected_reward + alpha * entropy - beta * cross_entropy  # [...] Eq. 4


# -------------------------------------------------------------------------------------------- temperature

def global_temperature(seq_probs, t):
    """Temperature on whole sequences (Eq. 7-10):  pi'(y) = pi(y)^(1/t) / Z.

    seq_probs `[..., N]`: probabilities of N complete sequences (any positive multiple). Returns `[..., N]`.
    A monotone map of each probability, so the order of sequences is kept: the most likely stays most likely.
    SPL's optimum is DPO's optimum at global temperature t = alpha/beta.
    """
    fn = "global_temperature"
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"{fn}: t must be a finite number > 0, got {t!r}")
    seq_probs = _check_probs(fn, "seq_probs", seq_probs, normalised=False)
    return torch.softmax(torch.log(seq_probs) / t, dim=-1)  # [..., N] Eq. 10


def token_temperature(seq_probs, sequences, t):
    """Temperature applied token by token (Eq. 6) to the distribution over an explicit tree of sequences:

        pi'(y) = prod_i pi(y_i | y_<i)^(1/t) / Z(y_<i),    Z(y_<i) = sum_v pi(v | y_<i)^(1/t),

    where pi(v | prefix) = mass(prefix + v) / mass(prefix) and v runs over the tokens that continue the prefix
    in the tree. seq_probs `[..., N]` are the probabilities of the N complete sequences (the leaves);
    `sequences` is a list of N token tuples, none a prefix of another (end each with an EOS token if needed).
    Returns `[..., N]`. Unlike `global_temperature` it can reorder sequences: at t > 1 a sequence whose
    continuation is shared with unlikely alternatives loses to one whose continuation is certain. With
    independent tokens on a full tree the two coincide.
    """
    fn = "token_temperature"
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ValueError(f"{fn}: t must be a finite number > 0, got {t!r}")
    seq_probs = _check_probs(fn, "seq_probs", seq_probs, normalised=False)
    sequences = [tuple(sequence) for sequence in sequences]
    if len(sequences) != seq_probs.shape[-1]:
        raise ValueError(f"{fn}: got {len(sequences)} sequences but seq_probs has {seq_probs.shape[-1]} "
                         f"on its last dim")
    for sequence in sequences:
        if len(sequence) == 0:
            raise ValueError(f"{fn}: sequences must be non-empty token tuples")
    leaves = set(sequences)
    if len(leaves) != len(sequences):
        raise ValueError(f"{fn}: sequences contain a duplicate")
    for sequence in sequences:
        for i in range(1, len(sequence)):
            if sequence[:i] in leaves:
                raise ValueError(f"{fn}: {sequence[:i]} is both a sequence and a prefix of {sequence}; "
                                 f"end sequences with an EOS token")

    seq_probs = seq_probs / seq_probs.sum(-1, keepdim=True)  # [..., N]
    mass = {}  # prefix -> [...] total probability of the sequences that start with it
    children = {}  # prefix -> the prefixes one token longer, in first-seen order
    for n, sequence in enumerate(sequences):
        for i in range(len(sequence) + 1):
            prefix = sequence[:i]
            if prefix not in mass:
                mass[prefix] = torch.zeros_like(seq_probs[..., 0])
                if i > 0:
                    children.setdefault(sequence[:i - 1], []).append(prefix)
            mass[prefix] = mass[prefix] + seq_probs[..., n]

    def tempered(node):  # pi(v | prefix)^(1/t) for node = prefix + v; 0 below a prefix of mass 0
        parent = mass[node[:-1]]  # [...]
        safe_parent = torch.where(parent > 0, parent, torch.ones_like(parent))
        return torch.where(parent > 0, mass[node] / safe_parent, torch.zeros_like(parent)) ** (1 / t)

    normaliser = {prefix: sum(tempered(child) for child in kids) for prefix, kids in children.items()}  # Z(y_<i)
    result = []
    for sequence in sequences:
        prob = torch.ones_like(seq_probs[..., 0])  # [...]
        for i in range(1, len(sequence) + 1):
            z = normaliser[sequence[:i - 1]]
            safe_z = torch.where(z > 0, z, torch.ones_like(z))
            prob = prob * tempered(sequence[:i]) / safe_z  # Eq. 6
        result.append(prob)
    return torch.stack(result, dim=-1)  # [..., N]


# -------------------------------------------------------------------------------------------- online SPL: the full space
# (issue 18: the optimum of Eq. 4 trained on-policy, where the policy may write any text, not only the options)

def full_space_option_mass(ref_option_probs, reward, floor, alpha, beta, off_option_weight=None):
    """The probability Eq. 4's optimum keeps on K options when every other text gets the reward `floor`.

    Prop. A.2 over the whole space of completions: pi*(y) = pi_ref(y)^(beta/alpha) exp(r(y)/alpha) / Z. Split Z
    into the options o_1..o_K and the rest:

        Z_on  = sum_i pi_ref(o_i)^(beta/alpha) exp(r_i/alpha)
        Z_off = exp(floor/alpha) W,      W = sum_{y not an option} pi_ref(y)^(beta/alpha)
        mass  = Z_on / (Z_on + Z_off).

    With alpha = beta, W = sum_{y not an option} pi_ref(y) = 1 - sum_i pi_ref(o_i) exactly: the mass off the
    options is the reference's, times exp(floor/alpha) relative to the options' exp(r_i/alpha). For alpha != beta,
    W depends on how the reference spreads the rest over text (alpha > beta rewards spreading: by Hoelder W can be
    as large as (1 - M)^(beta/alpha) N^(1 - beta/alpha) over N texts), so it must be given as `off_option_weight`.

    ref_option_probs `[..., K]`: the reference's sequence probabilities of the options (not normalised; their sum
    M <= 1 is the reference's option mass). reward `[..., K]` finite; floor a finite number. Returns `[...]`.
    """
    fn = "full_space_option_mass"
    alpha, beta = _check_coefficients(fn, alpha, beta)
    ref_option_probs = _check_probs(fn, "ref_option_probs", ref_option_probs, normalised=False)
    reward = _as_tensor(reward)
    if not bool(torch.isfinite(reward).all()):
        raise ValueError(f"{fn}: reward must be finite")
    if not (isinstance(floor, (int, float)) and math.isfinite(floor)):
        raise ValueError(f"{fn}: floor must be a finite number, got {floor!r}")
    _check_same_outcomes(fn, ref_option_probs=ref_option_probs, reward=reward)
    mass_ref = ref_option_probs.sum(-1)  # [...]  M
    if off_option_weight is None:
        if alpha != beta:
            raise ValueError(f"{fn}: with alpha != beta ({alpha:g}, {beta:g}) the mass off the options depends on "
                             f"sum pi_ref^(beta/alpha) over all other text: pass it as off_option_weight")
        if bool((mass_ref > 1 + 1e-6).any()):
            raise ValueError(f"{fn}: ref_option_probs sum to more than 1 ({mass_ref.max().item():.6g}): they must be "
                             f"sequence probabilities of distinct texts")
        off_option_weight = (1 - mass_ref).clamp(min=0)  # [...]  W at alpha = beta
    off_option_weight = _as_tensor(off_option_weight)
    if not bool(torch.isfinite(off_option_weight).all()) or bool((off_option_weight < 0).any()):
        raise ValueError(f"{fn}: off_option_weight must be finite and >= 0")
    log_on = torch.logsumexp(torch.xlogy(beta / alpha, ref_option_probs) + reward / alpha, dim=-1)  # [...] log Z_on
    log_off = floor / alpha + torch.log(off_option_weight)  # [...] log Z_off (-inf when W = 0)
    return torch.exp(log_on - torch.logaddexp(log_on, log_off))  # [...]


def full_space_optimum(ref_option_probs, reward, floor, alpha, beta, off_option_weight=None):
    """Eq. 4's optimum's probabilities of the K options themselves `[..., K]` (summing to
    `full_space_option_mass`): the mass times the over-the-options part, which for any (alpha, beta) and any
    floor is `optimal_policy_from_reward(ref_option_probs, reward, alpha, beta)`, i.e. Prop. A.1's
    pi ∝ pi_ref^(beta/alpha) p^(1/alpha) for r = log p: the rest of the space changes only Z."""
    mass = full_space_option_mass(ref_option_probs, reward, floor, alpha, beta, off_option_weight)  # [...]
    return mass.unsqueeze(-1) * optimal_policy_from_reward(ref_option_probs, reward, alpha, beta)  # [..., K]


def log_num_completions(max_new_tokens: int, vocab_size: int) -> float:
    """log N, N the number of completions generation can return within max_new_tokens tokens of a vocabulary of
    V pieces, one of them EOS: t - 1 non-EOS tokens then EOS for t = 1..T, or T non-EOS tokens, so
    N = sum_{t=0}^{T} (V - 1)^t."""
    if max_new_tokens < 1 or vocab_size < 2:
        raise ValueError(f"log_num_completions: need max_new_tokens >= 1 and vocab_size >= 2, got "
                         f"{max_new_tokens} and {vocab_size}")
    return float(torch.logsumexp(torch.arange(max_new_tokens + 1, dtype=torch.float64) * math.log(vocab_size - 1), 0))


def off_option_weight_bounds(ref_option_probs, alpha, beta, log_num_texts: float):
    """Bounds on W = sum_{y not an option} pi_ref(y)^a, a = beta/alpha, over at most N texts holding the
    reference's remaining mass 1 - M (M = sum of ref_option_probs `[..., K]`):

        (1 - M)^a <= W <= (1 - M)^a N^(1 - a)     for a <= 1 (alpha >= beta),  the other way round for a > 1.

    The left: x -> x^a is concave with 0^a = 0, hence subadditive, so sum x_i^a >= (sum x_i)^a. The right:
    Hoelder (the power mean), sum x_i^a <= N^(1 - a) (sum x_i)^a. a = 1 gives W = 1 - M on both sides. Returns
    (low, high) `[...]`, to pass as full_space_option_mass's off_option_weight: the mass decreases with W."""
    fn = "off_option_weight_bounds"
    alpha, beta = _check_coefficients(fn, alpha, beta)
    ref_option_probs = _check_probs(fn, "ref_option_probs", ref_option_probs, normalised=False)
    a = beta / alpha
    rest = (1 - ref_option_probs.sum(-1)).clamp(min=0)  # [...] 1 - M
    low, high = rest ** a, rest ** a * math.exp((1 - a) * log_num_texts)  # [...]
    return (low, high) if a <= 1 else (high, low)
