"""The SPL loss family and the baselines it is compared against, as pure functions of sequence log-probs.

Every loss takes per-example summed log-probabilities `[B]` (of the chosen and rejected responses under the
policy and under the reference) and returns `(losses, chosen_rewards, rejected_rewards)`, each `[B]`, with the
losses not reduced and the rewards detached, as torchtune's and eric-mitchell's DPO losses do.

    SPL (Eq. 5):   z = alpha * log pi(y)/pi(y')  -  beta * log pi_ref(y)/pi_ref(y')      loss = -log sigmoid(z)
    DPO:           SPL with alpha = beta (Rafailov et al. 2023)
    cDPO:          DPO with the label smoothed to 1 - eps (Mitchell 2023, "A note on DPO with noisy preferences")
    IPO:           (h - 1/(2 tau))^2,  h = log pi(y)pi_ref(y') / (pi(y')pi_ref(y))   (Azar et al. 2023, Eq. 17)
    f-DPO:         -log sigmoid(beta f'(u) - beta f'(u')),  u = pi/pi_ref      (Wang et al. 2023, "Beyond Reverse KL")
    Bradley-Terry: -log sigmoid(s(y) - s(y'))        for training a reward model (Eq. 2)

Remedies for likelihood displacement (the probability kept on the data's responses falls while the margins grow):
    anchored SPL:  SPL + anchor * (lse_i log pi(y_i) - lse_i log pi_ref(y_i))^2 per prompt: keeps Prop. A.1
    RPO:           SPL + w * NLL of the chosen response (Pang et al. 2024; TRL's "sft" term): moves the optimum
    DPOP:          -log sigmoid(z - alpha lambda max(0, log pi_ref(y)/pi(y)))  (Pal et al. 2024): moves it too

Soft labels. `chosen_prob` q in [0, 1] is the fraction of raters who preferred the chosen response; a loss on
the logit z then becomes the expected loss over the label, `-(q log sigmoid(z) + (1 - q) log sigmoid(-z))`, and
q = 1 (or None) is the plain loss. Multi-rater data uses it directly; the closed-form tests minimise it.

Numerics: everything is computed in float32, or float64 when an input is float64, whatever the inputs' dtype;
log-ratios are formed before they are scaled (sequence log-probs are large, their differences small);
`F.logsigmoid`, never `log(sigmoid)`; pi/pi_ref is never materialised (see `fdpo_loss`).
"""
import math
import numbers

import torch
import torch.nn.functional as F

FDPO_DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


# -------------------------------------------------------------------------------------------- input checks

def _compute_dtype(*tensors):
    """float32, or float64 if any input is float64: bf16/fp16 log-probs are upcast before any arithmetic."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _check_tensors(fn, **tensors):
    """All inputs are tensors of one shape (no silent broadcasting); returns them upcast to the compute dtype."""
    names = list(tensors)
    for name in names:
        if not isinstance(tensors[name], torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(tensors[name]).__name__}")
    first = names[0]
    for name in names[1:]:
        if tensors[name].shape != tensors[first].shape:
            raise ValueError(f"{fn}: {name} has shape {tuple(tensors[name].shape)}, expected "
                             f"{tuple(tensors[first].shape)} like {first}")
    dtype = _compute_dtype(*tensors.values())
    return [tensors[name].to(dtype) for name in names]


def _check_coefficient(fn, name, value, allow_zero):
    """A finite real number, > 0 (or >= 0 when allow_zero); returned as a float."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{fn}: {name} must be finite and {bound}, got {value}")
    return value


def _check_chosen_prob(fn, chosen_prob, like):
    """None, a number in [0, 1], or a tensor in [0, 1] of the log-probs' shape; returned in like's dtype."""
    if chosen_prob is None:
        return None
    if not isinstance(chosen_prob, torch.Tensor):
        value = _check_coefficient(fn, "chosen_prob", chosen_prob, allow_zero=True)
        if value > 1:
            raise ValueError(f"{fn}: chosen_prob must be in [0, 1], got {value}")
        return torch.full_like(like, value)
    if chosen_prob.shape != like.shape:
        raise ValueError(f"{fn}: chosen_prob has shape {tuple(chosen_prob.shape)}, expected {tuple(like.shape)} "
                         f"like the log-probs")
    chosen_prob = chosen_prob.to(like.dtype)
    if not bool(((chosen_prob >= 0) & (chosen_prob <= 1)).all()):  # also rejects NaN
        bad = chosen_prob[~((chosen_prob >= 0) & (chosen_prob <= 1))][0].item()
        raise ValueError(f"{fn}: chosen_prob must be in [0, 1], got {bad}")
    return chosen_prob


def _preference_loss(logits, chosen_prob):
    """-(q log sigmoid(z) + (1 - q) log sigmoid(-z)), the expected log-loss of a label that is 1 w.p. q.  [B]

    d loss / d z = sigmoid(z) - q, so the minimiser is z = logit(q): log-loss is a proper scoring rule.
    """
    if chosen_prob is None:
        return -F.logsigmoid(logits)
    return -(chosen_prob * F.logsigmoid(logits) + (1 - chosen_prob) * F.logsigmoid(-logits))


# -------------------------------------------------------------------------------------------- SPL and DPO

def spl_logits(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, alpha, beta):
    """The SPL logit (a trainer logs it as the margin), with gradient:

        z = alpha * log pi(y)/pi(y') - beta * log pi_ref(y)/pi_ref(y')        (Eq. 5)

    alpha > 0 is the entropy bonus, beta >= 0 the cross-entropy penalty (beta = 0: no reference at all).
    Inputs are summed log-probs `[B]`; returns `[B]` in float32 (float64 if an input is float64).
    """
    return _spl_logits("spl_logits", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                       ref_rejected_logps, alpha, beta)


def _spl_logits(fn, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, alpha, beta):
    """`spl_logits`, with errors naming the public function `fn` that was called."""
    alpha = _check_coefficient(fn, "alpha", alpha, allow_zero=False)
    beta = _check_coefficient(fn, "beta", beta, allow_zero=True)
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps = _check_tensors(
        fn, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    policy_logratios = policy_chosen_logps - policy_rejected_logps  # [B] log pi(y)/pi(y')
    ref_logratios = ref_chosen_logps - ref_rejected_logps  # [B] log pi_ref(y)/pi_ref(y')
    return alpha * policy_logratios - beta * ref_logratios  # [B] Eq. 5


def spl_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, alpha, beta,
             chosen_prob=None):
    """Soft Preference Learning (Eq. 5), one loss per example:

        loss = -log sigmoid(z),   z = alpha * log pi(y)/pi(y') - beta * log pi_ref(y)/pi_ref(y')
        (soft labels: -(q log sigmoid(z) + (1 - q) log sigmoid(-z)), q = chosen_prob)

    Its optimum is pi ∝ pi_ref^(beta/alpha) p_best^(1/alpha) (Prop. A.1, `spl.theory.optimal_policy`):
    alpha = beta is DPO, alpha/beta a sequence-level temperature on top of DPO's policy, alpha = 1 reproduces the
    population. The implicit reward is r(y) = alpha * log pi(y) - beta * log pi_ref(y) (Eq. 39 less its
    log Z term, which cancels in z), so chosen_rewards - rejected_rewards = z.

    At step 0 (pi = pi_ref) the loss is -log sigmoid((alpha - beta) * ref_logratio), not ln 2.
    Equivalently SPL is DPO with beta := alpha and the reference log-probs scaled by beta/alpha.

    Returns (losses, chosen_rewards, rejected_rewards), each `[B]`; rewards detached.
    """
    return _spl_loss("spl_loss", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                     alpha, beta, chosen_prob)


def _spl_loss(fn, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, alpha, beta,
              chosen_prob):
    """`spl_loss`, with errors naming the public function `fn` that was called."""
    logits = _spl_logits(fn, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                         alpha, beta)  # [B] validates every input
    chosen_prob = _check_chosen_prob(fn, chosen_prob, logits)
    losses = _preference_loss(logits, chosen_prob)  # [B]
    dtype = logits.dtype
    alpha, beta = float(alpha), float(beta)
    chosen_rewards = (alpha * policy_chosen_logps.to(dtype) - beta * ref_chosen_logps.to(dtype)).detach()  # Eq. 39
    rejected_rewards = (alpha * policy_rejected_logps.to(dtype) - beta * ref_rejected_logps.to(dtype)).detach()
    return losses, chosen_rewards, rejected_rewards


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             chosen_prob=None):
    """DPO (Rafailov et al. 2023, Eq. 7): exactly `spl_loss` with alpha = beta,

        loss = -log sigmoid(beta * (log pi(y)/pi(y') - log pi_ref(y)/pi_ref(y'))),

    rewards beta * log pi(y)/pi_ref(y). Optimum pi ∝ pi_ref p_best^(1/beta) (Prop. 3.1).
    """
    beta = _check_coefficient("dpo_loss", "beta", beta, allow_zero=False)
    return _spl_loss("dpo_loss", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                     alpha=beta, beta=beta, chosen_prob=chosen_prob)


# -------------------------------------------------------------------------------------------- baselines

def check_label_smoothing(value, name: str = "label_smoothing") -> float:
    """cDPO's eps as a float in [0, 0.5), the one rule (train.py's --label-smoothing uses it too). At eps = 0.5 the
    labels are coin flips: the loss is minimised by every policy whose chosen and rejected log-ratios are equal,
    so it learns nothing from the data; beyond 0.5 it learns the preferences reversed. ValueError naming `name`."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not 0 <= float(value) < 0.5:  # also refuses NaN
        raise ValueError(f"{name} must be in [0, 0.5), got {value}")
    return float(value)


def cdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
              label_smoothing):
    """Conservative DPO (Mitchell 2023; eric-mitchell's `preference_loss(label_smoothing=eps)`): DPO trained on
    labels that are flipped with probability eps,

        loss = -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h),   h = DPO's log-ratio difference,

    i.e. `dpo_loss` with chosen_prob = 1 - eps. eps in [0, 0.5) (check_label_smoothing); eps = 0 is DPO.
    """
    label_smoothing = check_label_smoothing(label_smoothing, "cdpo_loss: label_smoothing")
    beta = _check_coefficient("cdpo_loss", "beta", beta, allow_zero=False)
    return _spl_loss("cdpo_loss", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                     alpha=beta, beta=beta, chosen_prob=1.0 - label_smoothing)


def ipo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, tau,
             chosen_prob=None):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", Eq. 17):

        loss = (h - 1/(2 tau))^2,   h = log [pi(y) pi_ref(y')] / [pi(y') pi_ref(y)]

    tau is the regulariser's weight, named as Azar et al. do. h is written with sequence probabilities, so this
    takes SUMMED log-probs like every loss here (TRL and eric-mitchell's trainer feed IPO per-token averages
    instead: average before calling if you want theirs). With soft labels the loss is the expectation over the
    label, q (h - 1/(2 tau))^2 + (1 - q)(h + 1/(2 tau))^2, minimised at h = (q - 1/2) / tau.
    Rewards are tau * log pi(y)/pi_ref(y), detached.
    """
    fn = "ipo_loss"
    tau = _check_coefficient(fn, "tau", tau, allow_zero=False)
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps = _check_tensors(
        fn, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)  # [B]
    chosen_prob = _check_chosen_prob(fn, chosen_prob, h)
    target = 1 / (2 * tau)
    if chosen_prob is None:
        losses = (h - target) ** 2  # [B] Azar et al. Eq. 17
    else:
        losses = chosen_prob * (h - target) ** 2 + (1 - chosen_prob) * (h + target) ** 2  # [B]
    chosen_rewards = (tau * (policy_chosen_logps - ref_chosen_logps)).detach()
    rejected_rewards = (tau * (policy_rejected_logps - ref_rejected_logps)).detach()
    return losses, chosen_rewards, rejected_rewards


def _fdpo_derivative(log_u, divergence, alpha_divergence):
    """f'(u) - f'(1) for u = pi/pi_ref, from log u alone (u itself would overflow: log u is a sum over tokens).

        reverse KL  f(u) = u log u             f'(u) = log u + 1           -> log u
        forward KL  f(u) = -log u              f'(u) = -1/u                -> 1 - exp(-log u)
        JS          f(u) = u log u - (u + 1) log((u + 1)/2)
                                               f'(u) = log(2u / (1 + u))   -> log 2 - softplus(-log u)
        alpha       f(u) = (u^(1-a) - (1-a) u - a) / (a (a - 1))
                                               f'(u) = (1 - u^(-a)) / a    -> -expm1(-a log u) / a

    The constant f'(1) cancels in the loss; removing it makes every reward 0 at pi = pi_ref and the reverse-KL
    member's reward equal DPO's. The forward-KL and alpha terms exp(-a log u) are exact and finite until
    a log u < -88 in float32 (-709 in float64): the policy has cut a response's probability e^88-fold below the
    reference's, and that term alone then exceeds the dtype's range.
    """
    if divergence == "reverse_kl":
        return log_u
    if divergence == "forward_kl":
        return -torch.expm1(-log_u)
    if divergence == "js":
        return math.log(2.0) - F.softplus(-log_u)
    return -torch.expm1(-alpha_divergence * log_u) / alpha_divergence


def fdpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, divergence,
              alpha_divergence=0.5, chosen_prob=None):
    """f-DPO (Wang et al. 2023, "Beyond Reverse KL", Theorem 1; the paper's Appendix B baseline):

        loss = -log sigmoid(beta f'(u(y)) - beta f'(u(y'))),   u = pi/pi_ref,

    with divergence one of "reverse_kl" (f'(u) = log u + 1: exactly DPO), "forward_kl" (-1/u), "js"
    (log(2u/(1+u))) or "alpha" ((1 - u^(-a))/a, a = alpha_divergence in (0, 1)). The alpha-divergence
    interpolates the two KLs: a -> 0 is reverse KL (mode-seeking, diversity-destroying), a -> 1 is forward KL
    (mass-covering, diversity-preserving), as in the paper's Appendix B.3 sweep. Computed from log u, never u.

    Rewards are beta (f'(u) - f'(1)), detached: zero at pi = pi_ref, and their difference is the logit.
    """
    fn = "fdpo_loss"
    beta = _check_coefficient(fn, "beta", beta, allow_zero=False)
    if divergence not in FDPO_DIVERGENCES:
        raise ValueError(f"{fn}: divergence must be one of {FDPO_DIVERGENCES}, got {divergence!r}")
    if divergence == "alpha":
        alpha_divergence = _check_coefficient(fn, "alpha_divergence", alpha_divergence, allow_zero=False)
        if alpha_divergence >= 1:
            raise ValueError(f"{fn}: alpha_divergence must be in (0, 1) (its ends are divergence='reverse_kl' "
                             f"and 'forward_kl'), got {alpha_divergence}")
    policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps = _check_tensors(
        fn, policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    chosen_rewards = beta * _fdpo_derivative(policy_chosen_logps - ref_chosen_logps, divergence,
                                             alpha_divergence)  # [B] beta f'(u(y))
    rejected_rewards = beta * _fdpo_derivative(policy_rejected_logps - ref_rejected_logps, divergence,
                                               alpha_divergence)  # [B] beta f'(u(y'))
    logits = chosen_rewards - rejected_rewards  # [B] Wang et al. Theorem 1
    losses = _preference_loss(logits, _check_chosen_prob(fn, chosen_prob, logits))
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def bradley_terry_loss(chosen_scores, rejected_scores, chosen_prob=None):
    """Bradley-Terry reward-model loss (Eq. 2): loss = -log sigmoid(s(y) - s(y')), scores `[B]`.

    With soft labels the minimiser is s(y) - s(y') = logit(q): the reward model matches the raters' preference
    probabilities (the proper-scoring-rule step of Prop. 3.1's proof). The "rewards" returned are the scores,
    detached (upcast to float32 or better).
    """
    fn = "bradley_terry_loss"
    chosen_scores, rejected_scores = _check_tensors(fn, chosen_scores=chosen_scores,
                                                    rejected_scores=rejected_scores)
    logits = chosen_scores - rejected_scores  # [B] Eq. 2
    losses = _preference_loss(logits, _check_chosen_prob(fn, chosen_prob, logits))
    return losses, chosen_scores.detach(), rejected_scores.detach()


# -------------------------------------------------------------------------------------------- likelihood displacement
# SPL's loss, like DPO's, only sees differences of log-probs of two responses to one prompt, so the probability a
# policy keeps on a prompt's responses (their "mass") is a flat direction of the loss, and training drifts down it
# (Razin et al. 2024). `option_mass_anchor` pins exactly that direction and nothing else; `rpo_loss` and
# `dpop_loss` are the remedies users reach for, which also move the optimum.

def prompt_logsumexp(logps, response_prompt, num_prompts=None):
    """log sum_{i of prompt q} exp(logps_i) for every prompt q: the log of the probability a policy keeps on the
    prompt's responses in the batch. logps `[R]` (one per distinct response), response_prompt `[R]` (its prompt,
    0..P-1). Returns `[P]` in the compute dtype; differentiable (the per-prompt max is the usual detached shift).
    """
    fn = "prompt_logsumexp"
    (logps,) = _check_tensors(fn, logps=logps)
    if logps.dim() != 1 or response_prompt.shape != logps.shape or response_prompt.dtype != torch.long:
        raise ValueError(f"{fn}: need logps [R] and integer response_prompt [R], got {tuple(logps.shape)} and "
                         f"{tuple(response_prompt.shape)} {response_prompt.dtype}")
    num_prompts = int(response_prompt.max()) + 1 if num_prompts is None else num_prompts
    shift = torch.full((num_prompts,), -math.inf, dtype=logps.dtype, device=logps.device)  # [P]
    shift = shift.scatter_reduce(0, response_prompt, logps.detach(), reduce="amax")  # [P] per-prompt max
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))  # a prompt with no rows: lse = -inf
    total = torch.zeros(num_prompts, dtype=logps.dtype, device=logps.device)  # [P]
    total = total.index_add(0, response_prompt, torch.exp(logps - shift[response_prompt]))  # [P]
    return torch.log(total) + shift  # [P]


def option_mass_anchor(policy_logps, ref_logps, response_prompt, num_prompts=None, one_sided=False):
    """The anchor on the flat direction, per prompt q (`[P]`):

        a_q = ( logsumexp_i log pi(y_qi|x_q) - logsumexp_i log pi_ref(y_qi|x_q) )^2      over q's responses y_qi

    i.e. the squared log of the ratio of the probabilities the policy and the reference keep on the prompt's
    responses. With one_sided it is max(0, lse_ref - lse_pi)^2: only a policy that keeps less than the reference
    is charged. policy_logps, ref_logps `[R]` over distinct responses, response_prompt `[R]`.
    Why this leaves SPL's optimum over the responses where Prop. A.1 puts it: see `anchored_spl_loss`.
    """
    fn = "option_mass_anchor"
    policy_logps, ref_logps = _check_tensors(fn, policy_logps=policy_logps, ref_logps=ref_logps)
    log_ratio = (prompt_logsumexp(policy_logps, response_prompt, num_prompts)
                 - prompt_logsumexp(ref_logps, response_prompt, num_prompts))  # [P] log mass_pi / mass_ref
    if one_sided:
        log_ratio = log_ratio.clamp(max=0)
    return log_ratio ** 2  # [P]


def pair_anchor(policy_logps, ref_logps, pair_chosen, response_prompt, one_sided=False):
    """`option_mass_anchor` of each pair's prompt, `[B]`: the term `anchored_spl_loss` adds to every pair (times
    `anchor`), and the one training adds to any preference loss on prompt-grouped batches (spl/step.py)."""
    penalty = option_mass_anchor(policy_logps, ref_logps, response_prompt, one_sided=one_sided)  # [P]
    return penalty[response_prompt[pair_chosen]]  # [B] each pair carries its prompt's


def anchored_spl_loss(policy_logps, ref_logps, pair_chosen, pair_rejected, response_prompt, alpha, beta, anchor,
                      chosen_prob=None, one_sided=False):
    """SPL (Eq. 5) over a prompt-grouped batch, plus `anchor` times each pair's prompt's option-mass anchor:

        loss_b = SPL_b( s[c_b] - s[r_b] ) + anchor * a_{q(b)},      s = policy log-probs of the rows,

    policy_logps, ref_logps `[R]` (one per distinct (prompt, response), see data/batching.collate_grouped),
    pair_chosen / pair_rejected `[B]` rows of each pair, response_prompt `[R]`. Returns the usual triple `[B]`.
    anchor = 0 is `spl_loss` on the gathered rows, exactly.

    The optimum over the data's responses is Prop. A.1's, with their mass equal to the reference's. Take one
    prompt x with responses y_1..y_K and n pairs; s_i = log pi(y_i|x), r_i = log pi_ref(y_i|x). Its part of
    the summed loss is

        J(s) = sum_b l_b(s) + anchor * n * (lse(s) - lse(r))^2,        lse(s) = log sum_i exp(s_i).

    (1) Every l_b depends on s only through s_i - s_j, so l_b(s + c 1) = l_b(s): 1^T grad l_b = 0 (the flat
        direction). (2) grad of the anchor = 2 anchor n (lse(s) - lse(r)) softmax(s), and 1^T softmax(s) = 1.
    (3) Project the stationarity condition grad J = 0 on the all-ones direction: 0 + 2 anchor n (lse(s) - lse(r))
        = 0, so lse(s) = lse(r): the policy keeps exactly the reference's probability on the responses. Then the
        anchor's gradient vanishes too, and what is left, sum_b grad l_b = 0, is SPL's own stationarity
        condition, whose solution (soft labels q_ij = p_i/(p_i + p_j), minimised at z = logit(q)) is
        alpha (s_i - s_j) - beta (r_i - r_j) = log p_i - log p_j, i.e. Prop. A.1:

            s*_i = log [ pi_ref(y_i)^(beta/alpha) p(y_i)^(1/alpha) / Z ] + lse(r)   (`spl.theory.anchored_optimum`)

    The same in coordinates: s = m 1 + u with m = lse(s) and lse(u) = 0 is a bijection, and
    J = SPL(u) + anchor n (m - lse(r))^2 separates, so its minimisers are exactly {m = lse(r)} x {SPL's in u}: no
    stationary point is spurious, and the anchor cannot trade ratios for mass at any weight. A model whose
    parameters are shared by all prompts reaches the joint minimum wherever it can realise s* for every prompt.
    With one_sided the anchor term is anchor n max(0, lse(r) - m)^2 and the minimisers are
    {m >= lse(r)} x {SPL's in u}: the ratios are Prop. A.1's still, the mass at least the reference's.
    """
    fn = "anchored_spl_loss"
    anchor = _check_coefficient(fn, "anchor", anchor, allow_zero=True)
    policy_logps, ref_logps = _check_tensors(fn, policy_logps=policy_logps, ref_logps=ref_logps)
    if pair_chosen.shape != pair_rejected.shape or pair_chosen.dim() != 1:
        raise ValueError(f"{fn}: pair_chosen and pair_rejected must be [B], got {tuple(pair_chosen.shape)} and "
                         f"{tuple(pair_rejected.shape)}")
    losses, chosen_rewards, rejected_rewards = _spl_loss(
        fn, policy_logps[pair_chosen], policy_logps[pair_rejected], ref_logps[pair_chosen], ref_logps[pair_rejected],
        alpha, beta, chosen_prob)  # [B] Eq. 5
    if anchor > 0:
        losses = losses + anchor * pair_anchor(policy_logps, ref_logps, pair_chosen, response_prompt, one_sided)  # [B]
    return losses, chosen_rewards, rejected_rewards


def rpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, alpha, beta,
             nll_weight, chosen_prob=None):
    """SPL plus the negative log-likelihood of the chosen response (RPO, Pang et al. 2024, "Iterative Reasoning
    Preference Optimization"; TRL's `loss_type=["sigmoid", "sft"]`, formerly `rpo_alpha`):

        loss = SPL(z) - nll_weight * log pi(y),        soft labels: - nll_weight * (q log pi(y) + (1 - q) log pi(y'))

    (the NLL of the response the label prefers, in expectation over the label). This takes summed log-probs;
    TRL averages the NLL over the chosen tokens (pass length-averaged log-probs for theirs). It is NOT invariant
    along the flat direction: 1^T grad = -nll_weight per pair, so there is no stationary point until the mass on
    the responses saturates at 1, and at Prop. A.1's ratios the NLL's gradient still pulls probability towards
    the responses chosen most often: the optimum over the responses is no longer Prop. A.1's.
    """
    fn = "rpo_loss"
    nll_weight = _check_coefficient(fn, "nll_weight", nll_weight, allow_zero=True)
    losses, chosen_rewards, rejected_rewards = _spl_loss(fn, policy_chosen_logps, policy_rejected_logps,
                                                         ref_chosen_logps, ref_rejected_logps, alpha, beta,
                                                         chosen_prob)  # [B] Eq. 5, validates every input
    dtype = losses.dtype
    chosen, rejected = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    q = _check_chosen_prob(fn, chosen_prob, losses)
    nll = -chosen if q is None else -(q * chosen + (1 - q) * rejected)  # [B]
    return losses + nll_weight * nll, chosen_rewards, rejected_rewards


def dpop_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, alpha, beta,
              dpop_lambda, chosen_prob=None):
    """DPO-Positive (Pal et al. 2024, "Smaug", Eq. 3) on SPL's logit: the chosen response is penalised for falling
    below its reference log-prob, inside the sigmoid,

        loss = -log sigmoid( z - alpha * lambda * max(0, log pi_ref(y) - log pi(y)) ),    z = Eq. 5's logit

    (alpha = beta is DPOP exactly: beta (h - lambda max(0, log pi_ref(y)/pi(y)))). With soft labels it is the
    expectation over the label, the penalty on whichever response the label prefers:
    q * loss(z, y) + (1 - q) * loss(-z, y'). Like RPO it breaks the flat direction's invariance, and at Prop.
    A.1's ratios a response held below its reference log-prob (any the optimum lowers) feels a pull that SPL's
    terms do not balance: its optimum differs. Pal et al. use lambda = 50 (5 for some tasks).
    """
    fn = "dpop_loss"
    dpop_lambda = _check_coefficient(fn, "dpop_lambda", dpop_lambda, allow_zero=True)
    logits = _spl_logits(fn, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                         alpha, beta)  # [B] Eq. 5, validates every input
    dtype = logits.dtype
    alpha, beta = float(alpha), float(beta)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    rc, rr = ref_chosen_logps.to(dtype), ref_rejected_logps.to(dtype)
    chosen_logits = logits - alpha * dpop_lambda * torch.relu(rc - pc)  # [B] Pal et al. Eq. 3
    q = _check_chosen_prob(fn, chosen_prob, logits)
    losses = -F.logsigmoid(chosen_logits)  # [B]
    if q is not None:
        flipped_logits = -logits - alpha * dpop_lambda * torch.relu(rr - pr)  # [B] the label preferring y'
        losses = q * losses - (1 - q) * F.logsigmoid(flipped_logits)
    chosen_rewards = (alpha * pc - beta * rc).detach()  # Eq. 39
    rejected_rewards = (alpha * pr - beta * rr).detach()
    return losses, chosen_rewards, rejected_rewards
