"""spl/online.py and the full-space optimum in spl/theory.py: online SPL's estimator and closed forms.

Oracles: the exact gradient of Eq. 4 by enumeration (autograd through `spl_objective` on a tabular softmax
policy, and through the sum over every outcome a tiny model can write), against which the RLOO estimate
averaged over many draws must agree within its own standard error; LBFGS maximising Eq. 4 over a simplex of
options plus other text, against `full_space_option_mass`; the world's own files for the exact reward; and the
invariant that the log-probs a rollout batch is trained on are the ones the sampler drew it with.
"""
import itertools
import math

import pytest
import torch

from data.world.reward import WorldReward
from spl.online import (Candidates, RewardModelReward, Rollouts, exact_candidates_loss, is_outcome,
                        natural_candidates_term, online_step, rloo_baselines, rloo_loss, rollout_batch,
                        sample_rollouts, sequence_logps)
from spl.theory import full_space_option_mass, full_space_optimum, optimal_policy_from_reward, spl_objective


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny tensors, thousands of calls


def test_rloo_baseline_is_the_mean_of_the_other_samples():
    """b_k = mean_{j != k} v_j, worked by hand for v = (1, 2, 6): (4, 3.5, 1.5); and the advantages are
    K/(K-1) (v - mean v) = 1.5 (v - 3) = (-3, -1.5, 4.5)."""
    values = torch.tensor([[1.0, 2.0, 6.0]])
    torch.testing.assert_close(rloo_baselines(values), torch.tensor([[4.0, 3.5, 1.5]]))
    logps = torch.zeros(1, 3, requires_grad=True)
    _, soft, advantages = rloo_loss(logps, torch.zeros(1, 3), values, alpha=1.0, beta=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[-3.0, -1.5, 4.5]]))
    with pytest.raises(ValueError, match="K >= 2"):
        rloo_baselines(torch.zeros(3, 1))


def per_draw_gradients(theta, ref, reward, alpha, beta, draws, k, generator, estimator=rloo_loss):
    """The estimator's gradient of J for each of `draws` independent draws of K samples from softmax(theta):
    one copy of theta per draw ([draws, N] leaf), so one backward gives every draw's own gradient."""
    pi = theta.softmax(-1)
    samples = torch.multinomial(pi, draws * k, replacement=True, generator=generator).view(draws, k)  # (M, K)
    copies = theta.detach().repeat(draws, 1).requires_grad_()  # (M, N)
    policy_logps = copies.log_softmax(-1).gather(1, samples)  # (M, K)
    loss, _, _ = estimator(policy_logps, ref.log()[samples], reward[samples], alpha, beta)
    loss.backward()
    return -copies.grad * draws  # (M, N): the loss is -(1/M) sum_m of draw m's estimate of grad J


def exact_tabular_gradient(theta, ref, reward, alpha, beta):
    theta = theta.detach().clone().requires_grad_()
    spl_objective(theta.softmax(-1), reward, ref, alpha, beta).backward()  # Eq. 4 by enumeration
    return theta.grad


def tabular_problem():
    """The tabular test problem: logits, a reference distribution and rewards over 6 outcomes, seeded, with the
    generator the draws continue from."""
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(6, dtype=torch.float64, generator=generator)
    ref = torch.softmax(torch.randn(6, dtype=torch.float64, generator=generator), -1)
    reward = torch.randn(6, dtype=torch.float64, generator=generator)
    return generator, theta, ref, reward


@pytest.mark.parametrize("alpha, beta, k", [(0.3, 0.1, 2), (0.3, 0.1, 4), (0.1, 0.1, 8), (1.0, 0.0, 3)])
def test_rloo_gradient_is_unbiased_on_a_tabular_policy(alpha, beta, k):
    """pi = softmax(theta) over 6 outcomes. Averaged over M = 40000 draws of K samples, the RLOO estimate is
    within 4.5 standard errors (its own, from the M per-draw gradients) of grad J computed exactly, in every
    coordinate. The same criterion rejects the estimator that forgets the entropy term's place in the soft reward
    (plain RLOO on r + beta log pi_ref), so it has the power to see a bias of that size."""
    generator, theta, ref, reward = tabular_problem()
    exact = exact_tabular_gradient(theta, ref, reward, alpha, beta)  # (N,)
    draws = 40_000
    grads = per_draw_gradients(theta, ref, reward, alpha, beta, draws, k, generator)  # (M, N)
    mean, standard_error = grads.mean(0), grads.std(0) / math.sqrt(draws)
    assert bool(((mean - exact).abs() <= 4.5 * standard_error).all()), (mean, exact, standard_error)
    assert float(standard_error.max()) < 0.1 * float(exact.abs().max())  # a test tight enough to mean something

    def without_entropy(policy_logps, ref_logps, rewards, alpha, beta):
        return rloo_loss(policy_logps, ref_logps, rewards + alpha * policy_logps.detach(), alpha, beta)

    if alpha > 0:
        biased = per_draw_gradients(theta, ref, reward, alpha, beta, draws, k, generator, without_entropy)
        assert float(((biased.mean(0) - exact).abs() / standard_error).max()) > 10


def exact_candidates_draws(theta, ref, reward, alpha, beta, draws, k, generator, candidates):
    """Like per_draw_gradients, for exact_candidates_loss with the outcomes `candidates` summed exactly."""
    pi = theta.softmax(-1)
    samples = torch.multinomial(pi, draws * k, replacement=True, generator=generator).view(draws, k)  # (M, K)
    copies = theta.detach().repeat(draws, 1).requires_grad_()  # (M, N)
    logps = copies.log_softmax(-1)  # (M, N)
    index = torch.tensor(candidates, dtype=torch.long).repeat(draws, 1)  # (M, C)
    mask = torch.ones(index.shape, dtype=torch.bool)
    is_candidate = (samples[..., None] == index[:, None, :]).any(-1)  # (M, K)
    loss, _, advantages, mass = exact_candidates_loss(
        logps.gather(1, index), ref.log()[index], reward[index], mask,
        logps.gather(1, samples), ref.log()[samples], reward[samples], is_candidate, alpha, beta)
    loss.backward()
    torch.testing.assert_close(mass, pi[candidates].sum().expand(draws), rtol=0, atol=1e-12)
    assert bool((advantages[is_candidate] == 0).all())
    return -copies.grad * draws  # (M, N)


@pytest.mark.parametrize("alpha, beta, k", [(0.3, 0.1, 2), (0.1, 0.1, 1), (1.0, 0.0, 3)])
def test_exact_candidates_gradient_is_unbiased_and_less_noisy(alpha, beta, k):
    """The same tabular policy; outcomes 0, 2, 3 are the known candidates, summed exactly, the other three
    sampled. Averaged over 40000 draws the estimate is within 4.5 of its standard errors of grad J in every
    coordinate (K = 1 included: its baseline needs no other sample), and for K >= 2 its per-draw spread is below
    RLOO's with the same K, which is what it is for. The exact part alone (no samples) is
    biased by the missing rest: the criterion sees it."""
    generator, theta, ref, reward = tabular_problem()
    exact = exact_tabular_gradient(theta, ref, reward, alpha, beta)  # (N,)
    draws = 40_000
    grads = exact_candidates_draws(theta, ref, reward, alpha, beta, draws, k, generator, [0, 2, 3])  # (M, N)
    mean, standard_error = grads.mean(0), grads.std(0) / math.sqrt(draws)
    assert bool(((mean - exact).abs() <= 4.5 * standard_error).all()), (mean, exact, standard_error)
    if k > 1:  # RLOO needs K >= 2, so K = 1 has no like-for-like comparison
        rloo = per_draw_gradients(theta, ref, reward, alpha, beta, draws, k, generator)  # (M, N)
        assert float(grads.std(0).norm()) < 0.95 * float(rloo.std(0).norm())
    theta_ = theta.detach().clone().requires_grad_()
    pi = theta_.softmax(-1)
    on = torch.tensor([0, 2, 3])
    soft = (reward - alpha * pi.log() + beta * ref.log()).detach()[on]
    baseline = ((pi[on] / pi[on].sum()).detach() * soft).sum()
    (pi[on] * (soft - baseline)).sum().backward()
    assert float(((theta_.grad - exact).abs() / standard_error).max()) > 10


@pytest.mark.parametrize("natural", [False, True])
def test_exact_candidates_without_candidates_is_rloo(natural):
    """Invariant: a prompt whose candidate row is all padding gets exactly rloo_loss's loss and gradient, in
    either form of the candidates' term."""
    generator = torch.Generator().manual_seed(3)
    logps = torch.randn(2, 4, dtype=torch.float64, generator=generator).requires_grad_()
    ref, rewards = torch.randn(2, 4, dtype=torch.float64, generator=generator), torch.randn(2, 4, dtype=torch.float64)
    candidates = torch.randn(2, 3, dtype=torch.float64, generator=generator).requires_grad_()
    loss, soft, advantages, mass = exact_candidates_loss(
        candidates, torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64),
        torch.zeros(2, 3, dtype=torch.bool), logps, ref, rewards, torch.zeros(2, 4, dtype=torch.bool), 0.3, 0.1,
        natural)
    expected_loss, expected_soft, expected_advantages = rloo_loss(logps, ref, rewards, 0.3, 0.1)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(advantages, expected_advantages, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, logps, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(expected_loss, logps)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12)
    assert mass.tolist() == [0.0, 0.0]
    assert torch.autograd.grad(loss, candidates, allow_unused=True)[0].abs().max() == 0


def candidates_field(theta, ref, reward, alpha, beta, candidates, natural):
    """The ascent direction in theta of exact_candidates_loss's exact terms for a free softmax policy whose
    every outcome is a candidate (so nothing is sampled: K = 1 sample, itself a candidate, adds nothing)."""
    theta = theta.detach().clone().requires_grad_()
    logps = theta.log_softmax(-1)
    index = torch.tensor(candidates)
    sample = index[:1]
    loss, *_ = exact_candidates_loss(
        logps[index][None], ref.log()[index][None], reward[index][None],
        torch.ones(1, len(candidates), dtype=torch.bool),
        logps[sample][None], ref.log()[sample][None], reward[sample][None], torch.ones(1, 1, dtype=torch.bool),
        alpha, beta, natural)
    (grad,) = torch.autograd.grad(-loss, theta)
    return grad


@pytest.mark.parametrize("alpha, beta", [(0.1, 0.1), (0.2, 0.1), (1.0, 0.1)])
def test_natural_candidates_term_has_the_closed_form_as_its_fixed_point_and_ascends_eq4(alpha, beta):
    """natural_candidates_term on the tabular problem, all 6 outcomes candidates. Oracles:
    (1) at Prop. A.2's optimum pi* ∝ pi_ref^(beta/alpha) exp(r/alpha) the direction is 0 (the soft reward is
        alpha log Z for every outcome), as the plain gradient's is;
    (2) elsewhere it is an ascent direction of J: in the logits z, plain = pi (s - b) and natural = s - b_u,
        whose inner product is sum_c pi_c (s_c - b)(s_c - b_u) = Var_pi(s) > 0 (as sum_c pi_c (s_c - b) = 0);
    (3) at a uniform policy pi_c = 1/|C| the two coincide exactly (b_u = b and pi(C)/|C| = pi_c);
    (4) in z the natural direction is s - mean(s) exactly, z = log pi (the derivation in its docstring)."""
    _, theta, ref, reward = tabular_problem()
    all_six = list(range(6))
    optimum = optimal_policy_from_reward(ref, reward, alpha, beta)  # (6,)
    at_optimum = candidates_field(optimum.log(), ref, reward, alpha, beta, all_six, natural=True)
    torch.testing.assert_close(at_optimum, torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)
    natural = candidates_field(theta, ref, reward, alpha, beta, all_six, natural=True)
    plain = candidates_field(theta, ref, reward, alpha, beta, all_six, natural=False)
    torch.testing.assert_close(plain, exact_tabular_gradient(theta, ref, reward, alpha, beta), rtol=1e-10, atol=1e-12)
    pi = theta.softmax(-1)
    soft = reward - alpha * pi.log() + beta * ref.log()
    variance = float((pi * (soft - (pi * soft).sum()) ** 2).sum())
    assert variance > 1e-3
    torch.testing.assert_close(float(natural @ plain), variance / 6, rtol=1e-10, atol=0)  # pi(C)/|C| = 1/6
    uniform = torch.zeros(6, dtype=torch.float64)
    torch.testing.assert_close(candidates_field(uniform, ref, reward, alpha, beta, all_six, natural=True),
                               candidates_field(uniform, ref, reward, alpha, beta, all_six, natural=False),
                               rtol=1e-12, atol=1e-14)
    # (4): d/dtheta of sum_c w_c log pi_c with sum_c w_c = 0 is w itself (the log-normaliser's part cancels).
    torch.testing.assert_close(natural, (soft - soft.mean()) / 6, rtol=1e-10, atol=1e-12)


def test_natural_candidates_term_contracts_at_the_same_rate_from_any_start():
    """The trap README "Online SPL" measured, on a free softmax over 4 options, alpha = beta = 0.1: the policy
    starts with 0.98 on an option the closed form gives 0.03. Closed form of the natural flow: at the optimum
    r + beta log pi_ref = alpha z* + const, so s - mean(s) = -alpha centred(z - z*) with z = log pi = theta + const,
    and a step theta += eta * direction shrinks centred(theta - z*) by exactly 1 - eta alpha / |C| whatever the
    start (a linear contraction: Cen et al. 2021's rate). The plain gradient, pi(c) (s(c) - b) in z, moves the
    option the policy has left (the optimum's favourite, at 0.02 / 3) more than 10x less than the natural one."""
    alpha = beta = 0.1
    ref = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    reward = torch.tensor([0.3, 0.4, 0.2, 0.1], dtype=torch.float64).log()
    optimum = optimal_policy_from_reward(ref, reward, alpha, beta)  # (4,)
    wrong, best = int(optimum.argmin()), int(optimum.argmax())
    assert float(optimum[wrong]) < 0.05
    trapped = torch.full((4,), math.log(0.02 / 3), dtype=torch.float64)
    trapped[wrong] = math.log(0.98)
    eta, centred = 5.0, lambda v: v - v.mean()  # noqa: E731
    for start in (trapped, tabular_problem()[1][:4]):
        theta = start.clone()
        for _ in range(20):
            following = theta + eta * candidates_field(theta, ref, reward, alpha, beta, list(range(4)), True)
            torch.testing.assert_close(centred(following - optimum.log()),
                                       (1 - eta * alpha / 4) * centred(theta - optimum.log()), rtol=1e-9, atol=1e-12)
            theta = following
    natural = candidates_field(trapped, ref, reward, alpha, beta, list(range(4)), True)
    plain = candidates_field(trapped, ref, reward, alpha, beta, list(range(4)), False)
    assert float(natural[best]) > 0 and float(plain[best]) > 0
    assert float(natural[best]) > 10 * float(plain[best]), (natural, plain)


def test_natural_candidates_term_ignores_padding_and_each_prompt_is_its_own():
    """Invariant: in a batch of two prompts, one with 2 of its 4 candidate slots padding, the natural term's
    gradient is the sum of each prompt's alone with only its real candidates (padding slots get no gradient,
    and |C| and b_u count the real ones)."""
    generator = torch.Generator().manual_seed(11)
    logps = torch.randn(2, 4, dtype=torch.float64, generator=generator).requires_grad_()
    soft = torch.randn(2, 4, dtype=torch.float64, generator=generator)
    mask = torch.tensor([[True, True, True, True], [True, False, True, False]])
    mass = torch.tensor([0.9, 0.6], dtype=torch.float64)
    term = natural_candidates_term(logps.masked_fill(~mask, -math.inf), soft, mask, mass)  # (2,)
    (together,) = torch.autograd.grad(term.sum(), logps)
    for row in range(2):
        real = mask[row].nonzero().flatten()
        alone = logps.detach()[row, real].clone().requires_grad_()
        value = natural_candidates_term(alone[None], soft[row, real][None], torch.ones(1, len(real), dtype=torch.bool),
                                        mass[row:row + 1])
        (grad,) = torch.autograd.grad(value.sum(), alone)
        centred = soft[row, real] - soft[row, real].mean()
        torch.testing.assert_close(grad, centred * float(mass[row]) / len(real), rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(together[row, real], grad, rtol=1e-12, atol=1e-15)
    assert bool((together[~mask] == 0).all())


# -------------------------------------------------------------------------------------------- a tiny model

def all_outcomes(vocab_size, eos_id, max_new_tokens):
    """Every completion generation can return with max_new_tokens tokens: a sequence ending at its first EOS,
    or max_new_tokens tokens without an EOS before the last."""
    outcomes = []
    for length in range(1, max_new_tokens + 1):
        for tokens in itertools.product(range(vocab_size), repeat=length):
            if eos_id in tokens[:-1]:
                continue
            if length < max_new_tokens and tokens[-1] != eos_id:
                continue
            outcomes.append(list(tokens))
    return outcomes


def tiny_lora_model(tiny_model):
    from models import add_lora

    model = tiny_model(vocab_size=5, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       num_key_value_heads=1, seed=3)
    add_lora(model, rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():  # B != 0, so the policy differs from its reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return model


@pytest.mark.parametrize("with_candidates", [False, True])
def test_rloo_gradient_is_unbiased_on_a_tiny_model_by_enumeration(tiny_model, with_candidates):
    """A LoRA Mistral with 5 tokens (EOS = 2) and at most 2 new tokens can write 21 completions. J (Eq. 4) is a
    sum over them, so grad J over the LoRA parameters is exact by autograd through the enumeration (whose
    probabilities sum to 1: the truncated outcomes are one distribution). The RLOO estimate from
    sample_rollouts (models/generate.py, temperature 1) averaged over 6000 draws of K = 4 matches it, per
    parameter, within 5 standard errors estimated from 30 batches of 200 draws; so does online_step's estimate
    with five of the completions (one truncated) as candidates summed exactly (exact_candidates_loss)."""
    model = tiny_lora_model(tiny_model)
    prompt, eos, alpha, beta, k = [1, 3, 4], 2, 0.4, 0.1, 4
    params = [p for p in model.parameters() if p.requires_grad]
    outcomes = all_outcomes(5, eos, 2)
    assert len(outcomes) == 21
    reward_of = {tuple(o): float(r) for o, r in
                 zip(outcomes, torch.randn(len(outcomes), generator=torch.Generator().manual_seed(1)))}

    everything = Rollouts([prompt], [outcomes], torch.zeros(1, len(outcomes)))
    batch, inverse = rollout_batch(everything, pad_id=0)
    assert inverse.tolist() == [list(range(21))]
    policy = sequence_logps(model, batch, inverse, compile=False)[0]  # (21,) with grad
    ref = sequence_logps(model, batch, inverse, reference=True, compile=False)[0]  # (21,)
    torch.testing.assert_close(policy.exp().sum(), torch.tensor(1.0), rtol=0, atol=1e-5)
    rewards = torch.tensor([reward_of[tuple(o)] for o in outcomes])
    objective = (policy.exp() * (rewards - alpha * policy + beta * ref)).sum()  # Eq. 4 = E_pi[s]
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(objective, params)])  # (D,)

    known = [outcomes[i] for i in (0, 3, 7, 12, 20)]  # one of them, [4, 4], is truncated
    assert all(is_outcome(c, 2, eos) for c in known) and not is_outcome([2, 2], 2, eos) and not is_outcome([3], 2, eos)
    candidates = lambda rows: Candidates([known] * rows, torch.tensor([[reward_of[tuple(c)] for c in known]] * rows),
                                         torch.ones(rows, len(known), dtype=torch.bool))  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    batch_means = []
    for _ in range(30):
        drawn = sample_rollouts(model, [prompt], 200 * k, 2, eos, generator)  # (1, 200 K) i.i.d. samples
        rollouts = Rollouts([prompt] * 200, [drawn.completions[0][i:i + k] for i in range(0, 200 * k, k)],
                            drawn.sample_logps.view(200, k))  # (200, K): 200 draws of K
        rewards = torch.tensor([[reward_of[tuple(c)] for c in row] for row in rollouts.completions])
        loss, _ = online_step(model, rollouts, rewards, alpha, beta, pad_id=0, eos_id=eos, compile=False,
                              candidates=candidates(200) if with_candidates else None)
        batch_means.append(-torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    batch_means = torch.stack(batch_means)  # (30, D)
    mean, standard_error = batch_means.mean(0), batch_means.std(0) / math.sqrt(len(batch_means))
    z = (mean - exact).abs() / standard_error
    assert float(z.max()) < 5, float(z.max())
    assert float(torch.nn.functional.cosine_similarity(mean, exact, dim=0)) > 0.95


def test_rollouts_are_scored_with_the_log_probs_they_were_sampled_with(tiny_model):
    """Invariant: the teacher-forced log-prob of each sampled completion (rollout_batch + sequence_logps, the
    training side) equals the one models/generate.py accumulated while sampling it (KV-cache decoding), truncated
    completions included; the reference (LoRA off) differs."""
    model = tiny_lora_model(tiny_model)
    rollouts = sample_rollouts(model, [[1, 3], [1, 4, 4, 0], [1, 4]], 6, 3, eos_id=2,
                               generator=torch.Generator().manual_seed(0))
    assert rollouts.shape == (3, 6)
    batch, inverse = rollout_batch(rollouts, pad_id=0)
    assert len(batch["input_ids"]) == len({(p, tuple(c)) for p, row in enumerate(rollouts.completions) for c in row})
    logps = sequence_logps(model, batch, inverse, compile=False)
    torch.testing.assert_close(logps.detach().double(), rollouts.sample_logps, rtol=0, atol=1e-5)
    ref = sequence_logps(model, batch, inverse, reference=True, compile=False)
    assert float((ref - logps.detach()).abs().max()) > 1e-2
    assert any(len(c) == 3 and c[-1] != 2 for row in rollouts.completions for c in row)  # some were truncated


# -------------------------------------------------------------------------------------------- rewards

def test_world_reward_is_log_p_on_options_and_the_floor_elsewhere():
    """On the shipped world: each option's exact tokens (enc(option) + EOS) get log of its population share,
    read here from world.json; the same option without EOS, a different option's tokens and arbitrary text get
    the floor."""
    import json

    from data.world import DEFAULT_DIR, load_world
    from models import Tokenizer

    tokenizer = Tokenizer(DEFAULT_DIR / "model" / "tokenizer.model")
    questions = load_world(DEFAULT_DIR).opinions
    reward = WorldReward.from_questions(questions, tokenizer, floor=-7.5)
    spec = json.loads((DEFAULT_DIR / "world.json").read_text(encoding="utf-8"))["opinions"]
    q = 2
    options = [tokenizer.encode_response(o) for o in spec[q]["options"]]
    completions = options + [options[0][:-1], tokenizer.encode_response("A dog and a cat"),
                             tokenizer.encode_response(spec[q + 1]["options"][0])]
    rollouts = Rollouts([list(reward.prompts[q])], [completions], torch.zeros(1, len(completions)))
    expected = [math.log(p) for p in spec[q]["population"]] + [-7.5, -7.5, -7.5]
    torch.testing.assert_close(reward([q], rollouts), torch.tensor([expected], dtype=torch.float64))
    assert reward.is_option([q], rollouts).tolist() == [[True] * len(options) + [False] * 3]
    assert list(reward.prompts[q]) == tokenizer.encode_prompt([{"role": "user", "content": spec[q]["prompt"]}])
    with pytest.raises(ValueError, match="finite"):
        WorldReward.from_questions(questions, tokenizer, floor=float("-inf"))


def test_reward_model_reward_scores_each_completion_alone(tiny_model):
    """RewardModelReward on a [P, K] batch of rollouts equals the head applied to each (prompt, completion) alone:
    w . h(last token) + b, with h from the model on that sequence only (padding changes nothing)."""
    from spl.step import RewardHead

    model = tiny_model(seed=1)
    head = RewardHead(model.config.hidden_size)
    with torch.no_grad():
        head.score.weight.copy_(torch.randn(head.score.weight.shape, generator=torch.Generator().manual_seed(2)))
        head.score.bias.fill_(0.25)
    completions = [[[5, 6, 2], [7, 2]], [[9, 9, 9, 9], [2]]]
    rollouts = Rollouts([[1, 3], [1, 4, 4]], completions, torch.zeros(2, 2))
    scores = RewardModelReward(model, head, pad_id=0)([0, 1], rollouts)
    for p, row in enumerate(completions):
        for k, completion in enumerate(row):
            ids = torch.tensor([rollouts.prompt_ids[p] + completion])
            expected = head.score(model.hidden_states(ids)[0, -1]).item()
            assert abs(scores[p, k].item() - expected) < 1e-5


def test_reward_optimum_is_the_closed_form_for_the_true_reward_and_moves_with_a_wrong_one():
    """add_reward_optimum on a report of the world's 30 questions (a random reference and learned policy per
    question). Oracles: with the true reward plus a per-question constant (log p + 3 q: Bradley-Terry scores are
    defined up to one), Prop. A.2's optimum over the options is Prop. A.1's closed form, TV 0 to 1e-12; with a
    reward that is 0 on every option it is the reference tempered, pi_ref^(beta/alpha) normalised; and the
    learned-vs-optimum TV is computed from the rows themselves."""
    from data.world import DEFAULT_DIR, load_world
    from models import Tokenizer
    from data.world.report import add_reward_optimum
    from spl.online import OnlinePrompt
    from spl.theory import optimal_policy

    tokenizer = Tokenizer(DEFAULT_DIR / "model" / "tokenizer.model")
    questions = load_world(DEFAULT_DIR).opinions
    generator = torch.Generator().manual_seed(7)
    alpha, beta = 0.2, 0.1
    rows = []
    for q in questions:
        reference = torch.softmax(torch.randn(len(q.options), dtype=torch.float64, generator=generator), -1)
        learned = torch.softmax(torch.randn(len(q.options), dtype=torch.float64, generator=generator), -1)
        closed = optimal_policy(reference, torch.tensor(q.population, dtype=torch.float64), alpha, beta)
        rows.append({"prompt": q.prompt, "options": list(q.options), "reference": reference.tolist(),
                     "learned": learned.tolist(), "closed_form": closed.tolist()})
    prompts = [OnlinePrompt(tokenizer.encode_prompt([{"role": "user", "content": q.prompt}]), 29 - i)
               for i, q in enumerate(reversed(questions))]  # another order: matched by tokens, not position
    true = WorldReward.from_questions(questions, tokenizer)

    def shifted(indices, rollouts):  # log p + 3 q, q the prompt's index: its question's number
        return torch.stack([true([q], rollouts)[0] + 3.0 * q for q in indices])

    report = add_reward_optimum({"questions": rows}, shifted, prompts, tokenizer, alpha, beta)
    assert report["max_tv_reward_optimum_vs_closed_form"] < 1e-12
    for row in report["questions"]:
        learned, optimum = (torch.tensor(row[k], dtype=torch.float64) for k in ("learned", "reward_optimum"))
        assert abs(row["tv_learned_vs_reward_optimum"] - 0.5 * float((learned - optimum).abs().sum())) < 1e-12
    flat = add_reward_optimum({"questions": rows}, lambda i, r: torch.zeros(1, len(r.completions[0])), prompts,
                              tokenizer, alpha, beta)
    for row in flat["questions"]:
        tempered = torch.tensor(row["reference"], dtype=torch.float64) ** (beta / alpha)
        torch.testing.assert_close(torch.tensor(row["reward_optimum"], dtype=torch.float64), tempered / tempered.sum(),
                                   rtol=1e-12, atol=1e-15)
    assert flat["mean_tv_reward_optimum_vs_closed_form"] > 0.05


def test_supported_reward_is_the_model_on_data_responses_and_the_floor_elsewhere():
    """SupportedReward over distinct_prompts: a completion that is one of its own prompt's data responses gets the
    wrapped reward's score (here a stub: 10 x prompt + length), anything else (another prompt's response, an
    unseen text) the floor; and with_candidate_rewards scores exactly the responses generation can write."""
    from data.tokenization import PreferenceExample
    from spl.online import SupportedReward, distinct_prompts, with_candidate_rewards

    examples = [PreferenceExample([1, 5], [7, 2], [8, 8, 2], index=0),
                PreferenceExample([1, 5], [7, 2], [9, 2], index=1),
                PreferenceExample([1, 6], [4, 2], [3, 3, 3], index=2)]  # [3, 3, 3] was truncated (no EOS)
    prompts = distinct_prompts(examples)
    assert [p.candidates for p in prompts] == [[[7, 2], [8, 8, 2], [9, 2]], [[4, 2], [3, 3, 3]]]
    stub = lambda indices, rollouts: torch.tensor([[10.0 * q + len(c) for c in row]  # noqa: E731
                                                   for q, row in zip(indices, rollouts.completions)])
    reward = SupportedReward(stub, prompts, floor=-9.0)
    rollouts = Rollouts([[1, 5], [1, 6]], [[[8, 8, 2], [4, 2], [5, 2]], [[4, 2], [3, 3, 3], [7, 2]]], None)
    torch.testing.assert_close(reward([0, 1], rollouts), torch.tensor([[3.0, -9.0, -9.0], [12.0, 13.0, -9.0]]))
    scored = with_candidate_rewards(prompts, reward, max_new_tokens=2, eos_id=2)
    assert [p.candidates for p in scored] == [[[7, 2], [9, 2]], [[4, 2]]]
    assert [p.candidate_rewards for p in scored] == [[2.0, 2.0], [12.0]]


# -------------------------------------------------------------------------------------------- the full-space optimum

def maximise_eq4(ref, reward, alpha, beta):
    """LBFGS on a free softmax policy over the whole (finite) space; Eq. 4 is strictly concave in pi."""
    logits = torch.zeros_like(ref, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], lr=1.0, max_iter=500, tolerance_grad=1e-13, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = -spl_objective(logits.softmax(-1), reward, ref, alpha, beta)
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    return logits.detach().softmax(-1)


@pytest.mark.parametrize("alpha, beta, floor", [(0.5, 0.5, -1.0), (1.0, 1.0, 0.5), (0.2, 0.2, -0.6),
                                                (0.4, 0.2, -1.5), (1.0, 0.1, -3.0)])
def test_full_space_optimum_maximises_eq4_over_options_and_other_text(alpha, beta, floor):
    """A space of 4 options and 9 other texts, the reference keeping 0.7 on the options; reward log p on the
    options, `floor` on the rest. LBFGS's maximiser of Eq. 4 over all 13 outcomes keeps on the options the mass
    `full_space_option_mass` predicts (alpha = beta: from the options' reference probabilities alone; otherwise
    given W = sum of pi_ref^(beta/alpha) over the other texts), gives each option `full_space_optimum`'s
    probability, and its distribution over the options is Prop. A.1's whatever the floor."""
    generator = torch.Generator().manual_seed(int(100 * alpha + 10 * beta))
    ref = torch.softmax(torch.randn(13, dtype=torch.float64, generator=generator), -1)
    ref = torch.cat([0.7 * ref[:4] / ref[:4].sum(), 0.3 * ref[4:] / ref[4:].sum()])  # (13,)
    p = torch.softmax(torch.randn(4, dtype=torch.float64, generator=generator), -1)
    reward = torch.cat([p.log(), torch.full((9,), floor, dtype=torch.float64)])
    optimum = maximise_eq4(ref, reward, alpha, beta)  # (13,)

    weight = None if alpha == beta else (ref[4:] ** (beta / alpha)).sum()
    mass = full_space_option_mass(ref[:4], p.log(), floor, alpha, beta, off_option_weight=weight)
    torch.testing.assert_close(mass, optimum[:4].sum(), rtol=0, atol=1e-7)
    torch.testing.assert_close(full_space_optimum(ref[:4], p.log(), floor, alpha, beta, weight), optimum[:4],
                               rtol=0, atol=1e-7)
    torch.testing.assert_close(optimal_policy_from_reward(ref[:4], p.log(), alpha, beta),
                               optimum[:4] / optimum[:4].sum(), rtol=0, atol=1e-7)
    assert 0.05 < float(mass) < 0.999  # the floor matters: neither all nor none of the mass on the options


def test_full_space_option_mass_refuses_what_it_cannot_know():
    """alpha != beta without W is an error (it depends on the reference's spread over all other text); so are
    option probabilities summing past 1, and a non-finite floor. A reference with all its mass on the options
    keeps it there (W = 0)."""
    with pytest.raises(ValueError, match="off_option_weight"):
        full_space_option_mass([0.3, 0.2], [0.0, -1.0], -1.0, alpha=0.2, beta=0.1)
    with pytest.raises(ValueError, match="more than 1"):
        full_space_option_mass([0.8, 0.4], [0.0, -1.0], -1.0, alpha=0.1, beta=0.1)
    with pytest.raises(ValueError, match="floor"):
        full_space_option_mass([0.3, 0.2], [0.0, -1.0], float("nan"), alpha=0.1, beta=0.1)
    assert float(full_space_option_mass([0.25, 0.75], [0.0, -1.0], 5.0, alpha=0.1, beta=0.1)) == 1.0


@pytest.mark.parametrize("alpha, beta", [(1.0, 0.1), (0.4, 0.2), (0.2, 0.2), (0.1, 0.3)])
def test_off_option_weight_bounds_hold_and_are_attained(alpha, beta):
    """log_num_completions counts what generation can write (21 for V = 5, T = 2, as all_outcomes enumerates).
    Over N = 21 texts, 4 of them options holding 0.6 of the reference: W = sum of pi_ref^(beta/alpha) over the
    other 17 lies within off_option_weight_bounds for a random rest, reaches one bound when the rest is uniform
    (Hoelder's equality case) and the other when it sits on one text; so the optimum's option mass
    (full_space_option_mass, decreasing in W) lies between the masses the bounds give. With noise_proof_floor the
    upper bound on the mass off the options is the alpha = beta one: floor/alpha + log W <= floor0/alpha +
    (beta/alpha) log(1 - M)."""
    from spl.online import DEFAULT_FLOOR, noise_proof_floor
    from spl.theory import log_num_completions, off_option_weight_bounds

    log_n = log_num_completions(2, 5)
    assert math.isclose(math.exp(log_n), len(all_outcomes(5, 2, 2)), rel_tol=1e-12)
    generator = torch.Generator().manual_seed(7)
    options = 0.6 * torch.softmax(torch.randn(4, dtype=torch.float64, generator=generator), -1)  # (4,)
    low, high = off_option_weight_bounds(options, alpha, beta, math.log(17))
    a = beta / alpha
    for rest, expected in [(torch.softmax(torch.randn(17, dtype=torch.float64, generator=generator), -1), None),
                           (torch.full((17,), 1 / 17, dtype=torch.float64), high if a <= 1 else low),
                           (torch.eye(17, dtype=torch.float64)[3], low if a <= 1 else high)]:
        weight = ((0.4 * rest) ** a).sum()
        assert float(low) * (1 - 1e-12) <= float(weight) <= float(high) * (1 + 1e-12)
        if expected is not None:
            torch.testing.assert_close(weight, expected, rtol=1e-12, atol=0)
        reward = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64))
        masses = [float(full_space_option_mass(options, reward, -2.0, alpha, beta, w)) for w in (high, weight, low)]
        assert masses == sorted(masses)
    floor = noise_proof_floor(alpha, beta, log_n)
    assert floor == DEFAULT_FLOOR - max(alpha - beta, 0) * log_n
    if alpha >= beta:
        _, high = off_option_weight_bounds(options, alpha, beta, log_n)
        assert floor / alpha + math.log(high) <= DEFAULT_FLOOR / alpha + a * math.log(0.4) + 1e-9


# -------------------------------------------------------------------------------------------- train.py --loss spl-online

def online_args(out, *extra):
    return ["--loss", "spl-online", "--alpha", "0.2", "--beta", "0.1", "--steps", "4", "--batch-size", "3",
            "--online-samples", "3", "--warmup-steps", "1", "--out", str(out), "--no-progress", "--no-plot", *extra]


def test_train_spl_online_on_the_world_resumes_bit_identically(tmp_path):
    """Invariant: 4 uninterrupted steps vs. the same command rolled back to its step-2 checkpoint and resumed
    (sampling draws from the global RNG, which the checkpoint restores). The metrics log has every step's
    online metrics, and the world report is written, with the full-space option mass as an interval (alpha > beta)."""
    import json
    import shutil

    from safetensors.torch import load_file

    import train

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert train.main(online_args(full, "--save-every", "2")) == 0
    assert train.main(online_args(resumed, "--save-every", "2")) == 0
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    shutil.rmtree(resumed / "adapter")
    assert train.main(online_args(resumed, "--save-every", "2", "--resume")) == 0
    a, b = (load_file(str(run / "adapter" / "adapter_model.safetensors")) for run in (full, resumed))
    assert set(a) == set(b) and all(torch.equal(a[name], b[name]) for name in a)
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("reward", "soft_reward", "entropy", "cross_entropy", "length", "generation_tokens_per_s",
                "tokens_per_s", "option_fraction", "candidate_mass"):
        assert all(math.isfinite(r[key]) for r in records), key
    report = json.loads((full / "report.json").read_text())
    assert len(report["questions"]) == 30 and "reward_floor" in report
    low, high = report["mean_closed_form_option_mass"]  # alpha != beta: the interval the bounds on W give
    assert 0 <= low <= high <= 1 and report["mean_abs_option_mass_error"] >= 0


def test_train_reward_model_then_online_spl_reports_the_reward_optimum(tmp_path):
    """The README's two-command pipeline, shortened: `--loss reward` for 3 steps, then spl-online scored by it
    (with a floor off the data's responses). The report carries the reward's own optimum over the options,
    whose scores are those RewardModelReward.load gives the options independently, and its TVs."""
    import json

    import train
    from data.world import DEFAULT_DIR, MODEL_DIR, load_world
    from models import Tokenizer

    rm, out = tmp_path / "rm", tmp_path / "online"
    assert train.main(["--loss", "reward", "--steps", "3", "--batch-size", "4", "--out", str(rm), "--no-progress",
                       "--no-plot"]) == 0
    assert train.main(online_args(out, "--steps", "2", "--reward-model", str(rm), "--reward-floor", "-4.6")) == 0
    report = json.loads((out / "report.json").read_text())
    assert "mean_closed_form_option_mass" not in report  # the full-space optimum is the exact reward's
    assert 0 <= report["mean_tv_reward_optimum_vs_closed_form"] <= report["max_tv_reward_optimum_vs_closed_form"] <= 1
    tokenizer = Tokenizer(MODEL_DIR / "tokenizer.model")
    question = load_world(DEFAULT_DIR).opinions[0]
    ids = tokenizer.encode_prompt([{"role": "user", "content": question.prompt}])
    options = [tokenizer.encode_response(o) for o in question.options]
    scores = RewardModelReward.load(rm, MODEL_DIR, tokenizer.pad_id)([0], Rollouts([ids], [options], None))[0]
    row = next(r for r in report["questions"] if r["prompt"] == question.prompt)
    torch.testing.assert_close(torch.tensor(row["reward_scores"], dtype=torch.float64), scores, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    (("--lora-dropout", "0.1"), "--lora-dropout 0"),
    (("--online-samples", "1"), "--online-samples must be >= 2"),
    (("--reward-floor", "nan"), "--reward-floor must be a finite"),
    (("--reward-model", "/nonexistent"), "reward_head.safetensors"),
])
def test_train_spl_online_refuses_bad_options_in_one_line(tmp_path, capsys, extra, message):
    import train

    assert train.main(online_args(tmp_path / "run", *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
