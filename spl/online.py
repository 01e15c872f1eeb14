"""Online SPL: Eq. 4 maximised on-policy, by REINFORCE on a per-sequence soft reward with a leave-one-out baseline.

SPL's RLHF form (Eq. 4) for one prompt x is

    J(theta) = E_{y~pi}[r(x, y)] + alpha H(pi) - beta H(pi, pi_ref)
             = E_{y~pi}[ s(y) ],      s(y) = r(x, y) - alpha log pi(y|x) + beta log pi_ref(y|x)   (the soft reward)

with H(pi) = -E_pi[log pi] and H(pi, pi_ref) = -E_pi[log pi_ref] (the cross-entropy, as in Eq. 4; see the
errata in spl/theory.py). Its gradient: writing J = sum_y pi(y) s(y) and differentiating the product,

    grad J = sum_y grad pi(y) s(y) + sum_y pi(y) grad s(y)
           = E_pi[ s(y) grad log pi(y) ] - alpha E_pi[ grad log pi(y) ]              (grad s = -alpha grad log pi)
           = E_pi[ s(y) grad log pi(y) ]                                             (E_pi[grad log pi] = 0)

because E_pi[grad log pi] = sum_y grad pi(y) = grad sum_y pi(y) = grad 1 = 0. So Eq. 4 is REINFORCE whose
reward is the soft reward s, held fixed (detached) in the backward pass: the entropy and cross-entropy terms
enter through s, never through a gradient of their own.

Variance: for K i.i.d. samples y_1..y_K of the same prompt, the leave-one-out (RLOO) baseline of sample k is
b_k = mean_{j != k} s(y_j). It is a function of the *other* samples only, hence independent of y_k, so

    E[ b_k grad log pi(y_k) ] = E[b_k] E[grad log pi(y_k)] = 0,

and  g = (1/K) sum_k (s(y_k) - b_k) grad log pi(y_k)  is an unbiased estimate of grad J for every K >= 2
(tests/test_spl_online.py checks this against enumeration). Algebraically s_k - b_k = K/(K-1) (s_k - mean_j s_j).
At the optimum pi* ∝ pi_ref^(beta/alpha) exp(r/alpha) (Prop. A.2) the soft reward is the same, alpha log Z, for
every y, so the advantages and with them the estimator's variance vanish there.

A training step (train.py --loss spl-online): sample K completions per prompt from the current policy at
temperature 1 with no filtering (the expectation is over pi itself), with models/generate.py's KV cache; score
them under the policy (with grad) and the reference (LoRA off, no grad); reward them; minimise
`rloo_loss`, whose gradient is -g (`--online-estimator rloo`), or `exact_candidates_loss`, the same expectation
with each prompt's data responses (on the world: its options) summed exactly and only the other text sampled
(`exact`), by default in natural-gradient form over those responses (`natural`: natural_candidates_term, the
same optimum without softmax policy gradient's slow escape from a wrong mode).
A completion that reaches max_new_tokens without EOS is the outcome "these first max_new_tokens tokens": its
probability is the product of its tokens', so the outcomes still form one distribution and the estimator stays
unbiased for the truncated problem.

Rewards: `data.world.reward.WorldReward` is the embedded world's exact one (log p of an option, the population's Bradley-Terry
score, and a floor for any other text); `RewardModelReward` wraps a reward model trained by
`train.py --loss reward`; `SupportedReward` trusts a reward only on the data's responses, with a floor elsewhere.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.batching import PreferenceBatches
from data.sft import SequenceExample, collate_sequences
from models import load_adapter, load_pretrained
from models.generate import decode_n_tokens, prefill, sample_token
from models.gguf import resolve_model
from models.lora import disable_lora, lora_modules
from models.mistral import KVCache
from spl.distributed import share_batches
from spl.step import RewardHead, load_reward_head, policy_logprobs, reward_scores

# The floor: the exact reward of any text that is not one of a question's options. log p of the options ranges
# over [log 0.05, log 0.8]; text no rater picks would have log 0 = -inf, which has no finite optimum, so a finite
# floor stands for it. Prop. A.2 gives the mass the optimum keeps off the options (spl.theory.full_space_optimum).
DEFAULT_FLOOR = math.log(0.01)
# The gradient estimators of train.py --online-estimator: exact_candidates_loss with natural=True, with
# natural=False (unbiased for grad J), and rloo_loss.
ESTIMATORS = ("natural", "exact", "rloo")


def noise_proof_floor(alpha: float, beta: float, log_num_texts: float, floor: float = DEFAULT_FLOOR) -> float:
    """The floor, lowered for alpha > beta so that noise cannot out-earn the options. Over the rest R of the
    space the best Eq. 4 can do is alpha log sum_R pi_ref^(beta/alpha) exp(floor/alpha) = floor + alpha log W, and
    W <= (1 - M)^(beta/alpha) N^(1 - beta/alpha) over N texts (spl.theory.off_option_weight_bounds): the entropy
    bonus pays up to (alpha - beta) log N for spreading over them (about 0.9 x 16 x ln 2000 = 109 nats at
    alpha/beta = 10 and 16 tokens). floor - (alpha - beta) log N takes exactly that away, so the mass off the options
    is bounded as it is for alpha = beta with `floor`; alpha <= beta leaves the floor as it is."""
    return floor - max(alpha - beta, 0.0) * log_num_texts


# -------------------------------------------------------------------------------------------- the estimator

def soft_rewards(rewards, policy_logps, ref_logps, alpha: float, beta: float):
    """s = r - alpha log pi + beta log pi_ref per sequence (Eq. 4 inside the expectation), detached. [P, K]"""
    return (rewards - alpha * policy_logps + beta * ref_logps).detach()  # (P, K)


def rloo_baselines(values):
    """Leave-one-out means over the last dim: b_k = (sum_j v_j - v_k) / (K - 1).  [P, K] -> [P, K]"""
    K = values.shape[-1]
    if K < 2:
        raise ValueError(f"rloo_baselines: need K >= 2 samples per prompt for a leave-one-out baseline, got {K}")
    return (values.sum(-1, keepdim=True) - values) / (K - 1)  # (P, K)


def rloo_loss(policy_logps, ref_logps, rewards, alpha: float, beta: float):
    """The surrogate whose gradient is minus the RLOO estimate of grad J (Eq. 4), averaged over P prompts:

        loss = -(1 / PK) sum_{p,k} (s_pk - b_pk) log pi(y_pk | x_p)

    policy_logps [P, K] (with grad), ref_logps [P, K], rewards [P, K]. Returns (loss, soft rewards [P, K],
    advantages [P, K]); the last two are detached."""
    if policy_logps.shape != ref_logps.shape or policy_logps.shape != rewards.shape or policy_logps.dim() != 2:
        raise ValueError(f"rloo_loss: policy_logps, ref_logps and rewards must all be [P, K], got "
                         f"{tuple(policy_logps.shape)}, {tuple(ref_logps.shape)}, {tuple(rewards.shape)}")
    soft = soft_rewards(rewards, policy_logps, ref_logps, alpha, beta)  # (P, K)
    advantages = soft - rloo_baselines(soft)  # (P, K)  s_k - b_k
    loss = -(advantages * policy_logps).mean()  # REINFORCE: grad = -mean (s - b) grad log pi
    return loss, soft, advantages


def exact_candidates_loss(candidate_logps, candidate_ref_logps, candidate_rewards, candidate_mask,
                          policy_logps, ref_logps, rewards, is_candidate, alpha: float, beta: float,
                          natural: bool = False):
    """RLOO's estimate with the sum over a known finite set C of each prompt's texts done exactly (a
    Rao-Blackwellisation: the samples' part on C replaced by its expectation). Splitting J = E_pi[s] over C and
    the rest R, with the -alpha E[grad log pi] terms of both parts cancelling as in the module docstring, and
    using sum_C grad pi + grad pi(R) = grad 1 = 0 twice,

        grad J = sum_{c in C} grad pi(c) (s(c) - b)  +  (b - b_R) grad pi(C)
               + E_{y~pi}[ 1{y in R} (s(y) - b_R) grad log pi(y) ]

    for any b and b_R that do not depend on the sample y they multiply. b is the soft reward's mean over C under
    pi( . | C) (detached): the first term, exact, moves mass among the candidates. b_R estimates the soft
    reward's mean over R: for sample k, the mean over the *other* samples of the micro-batch that fell in R (all
    prompts pooled: they are independent of y_k, and R's soft rewards are alike across prompts), or b when there
    are none. The second term, exact, moves mass between C and R by the gap b - b_R along grad pi(C) (without it
    that signal would come only from pushing down the few samples in R, one by one); the third is REINFORCE on
    R's samples, whose advantages are their deviations from R's mean. Samples in C contribute nothing. At the
    optimum s = alpha log Z everywhere (Prop. A.2), so every coefficient, and the variance, vanish there. A prompt
    without candidates keeps RLOO's leave-one-out baseline.

    natural=True replaces the first term by its natural-gradient form (`natural_candidates_term`): the same
    fixed point, without the factor pi(c) that traps a policy on the wrong candidate. The loss is then no longer
    an unbiased estimate of -J's gradient but of a preconditioned one; the other two terms are unchanged.

    candidate_* [P, C] (padding where candidate_mask is False; candidate_logps with grad), the samples' policy_logps
    (with grad), ref_logps, rewards and is_candidate [P, K]. Returns (loss, the samples' soft rewards [P, K],
    their advantages s - b_R [P, K] (0 on C), the policy's exact mass on C [P]); all but the loss detached."""
    if candidate_logps.shape != candidate_ref_logps.shape or candidate_logps.shape != candidate_rewards.shape \
            or candidate_logps.shape != candidate_mask.shape or policy_logps.shape != is_candidate.shape:
        raise ValueError(f"exact_candidates_loss: candidates must all be [P, C] and the samples [P, K], got "
                         f"{tuple(candidate_logps.shape)}, {tuple(candidate_mask.shape)} and "
                         f"{tuple(policy_logps.shape)}, {tuple(is_candidate.shape)}")
    masked_logps = candidate_logps.masked_fill(~candidate_mask, -math.inf)  # (P, C)
    candidate_soft = soft_rewards(candidate_rewards, candidate_logps, candidate_ref_logps, alpha, beta)  # (P, C)
    candidate_soft = candidate_soft.masked_fill(~candidate_mask, 0.0)
    has_candidates = candidate_mask.any(-1)  # (P,)
    conditional = masked_logps.detach().softmax(-1).nan_to_num(0.0)  # (P, C) pi(c | C); rows without C: 0
    soft = soft_rewards(rewards, policy_logps, ref_logps, alpha, beta)  # (P, K)
    baseline = (conditional * candidate_soft).sum(-1, keepdim=True)  # (P, 1) b
    in_rest = (~is_candidate).to(soft.dtype)  # (P, K)
    others = in_rest.sum() - in_rest  # (P, K) the other samples in R
    rest_baseline = torch.where(others > 0, ((in_rest * soft).sum() - in_rest * soft) / others.clamp(min=1),
                                baseline)  # (P, K) b_R
    if not bool(has_candidates.all()):  # (K = 1 is enough when every prompt has candidates)
        rest_baseline = torch.where(has_candidates[:, None], rest_baseline, rloo_baselines(soft))
    candidate_probs = masked_logps.exp()  # (P, C) pi(c), with grad; 0 on padding
    mass = candidate_probs.sum(-1)  # (P,) pi(C), with grad
    among = natural_candidates_term(masked_logps, candidate_soft, candidate_mask, mass.detach()) if natural \
        else (candidate_probs * (candidate_soft - baseline)).sum(-1)  # (P,) grad: sum_C grad pi (s - b)
    exact_part = among + (baseline - rest_baseline).mean(-1) * mass  # (P,) + (b - b_R) grad pi(C)
    advantages = (soft - rest_baseline).masked_fill(is_candidate, 0.0)  # (P, K) the samples in R only
    sampled_part = (advantages * policy_logps).mean(-1)  # (P,) grad: (1/K) sum_k 1{R} (s - b_R) grad log pi
    loss = -(exact_part + sampled_part).mean()
    return loss, soft, advantages, mass.detach()


def natural_candidates_term(masked_logps, candidate_soft, candidate_mask, mass):
    """The natural-gradient form of exact_candidates_loss's first term, sum_C grad pi(c) (s(c) - b) =
    pi(C) sum_C pi(c|C) (s(c) - b) grad log pi(c|C): [P] whose gradient is

        pi(C) / |C| * sum_{c in C} (s(c) - b_u) grad log pi(c),     b_u = mean_{c in C} s(c)   (uniform).

    Why: in the candidates' logits z_c = log pi(c) (pi(c|C) = softmax(z)), the plain gradient is
    pi(C) pi(c|C) (s(c) - b): a candidate the policy has nearly left is pushed back in proportion to its
    probability, so softmax policy gradient escapes a wrong mode slowly (one LoRA shared by all prompts, whose
    candidates share tokens, falls into such modes: README "Online SPL"). The Fisher matrix of pi(.|C) in z is
    diag(pi) - pi pi^T, and its pseudo-inverse applied to that gradient is s - b_u up to a constant, which
    moves every candidate by its own advantage whatever its probability (Kakade 2001's natural policy gradient;
    Cen et al. 2021 show it converges linearly with an entropy bonus, where the plain gradient can take
    exponentially long). Pulled back to the parameters by the chain rule, that is the sum above; weighting by
    pi(C) / |C| keeps its size that of the plain term. Because sum_C (s - b_u) = 0, grad log pi(c) can be the
    full-space log-prob: its grad log pi(C) part cancels, so this term moves no mass between C and the rest.

    Fixed point: it vanishes where s(c) is the same for every candidate, r(c) - alpha log pi(c) +
    beta log pi_ref(c) = const, which is pi(c|C) ∝ pi_ref^(beta/alpha) exp(r/alpha): Prop. A.1/A.2's optimum
    over C, the plain gradient's fixed point too. masked_logps [P, C] (-inf on padding, with grad),
    candidate_soft [P, C] (detached), candidate_mask [P, C], mass [P] (detached pi(C))."""
    count = candidate_mask.sum(-1, keepdim=True).clamp(min=1)  # (P, 1) |C|
    uniform_baseline = (candidate_soft * candidate_mask).sum(-1, keepdim=True) / count  # (P, 1) b_u
    advantages = ((candidate_soft - uniform_baseline) * candidate_mask) * (mass[:, None] / count)  # (P, C)
    return (advantages * masked_logps.masked_fill(~candidate_mask, 0.0)).sum(-1)  # (P,)


# -------------------------------------------------------------------------------------------- sampling

@dataclass
class Rollouts:
    """K completions of each of P prompts, prompt-major."""
    prompt_ids: list[list[int]]  # P prompts
    completions: list[list[list[int]]]  # [P][K] new tokens, up to and including EOS when it came
    sample_logps: torch.Tensor  # (P, K) log pi at sampling time (no grad): equals the policy's before the update

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.completions), len(self.completions[0])

    def lengths(self) -> torch.Tensor:
        return torch.tensor([[len(c) for c in row] for row in self.completions], dtype=torch.float64)  # (P, K)


@torch.no_grad()
def sample_rollouts(model, prompt_ids: list[list[int]], k: int, max_new_tokens: int, eos_id: int | None,
                    generator: torch.Generator | None = None) -> Rollouts:
    """K completions per prompt from the model itself: temperature 1, no top-k/p or min-p (Eq. 4 is an
    expectation over pi). Built from models/generate.py's pieces (prefill, decode_n_tokens, sample_token),
    batched further than `generate`: prompts of equal length are prefilled together, each row's cache repeated
    K times, and all G*K rows decoded as one batch until every row has emitted EOS or max_new_tokens tokens.
    The model is put in eval mode for sampling (LoRA dropout must be 0 for the samples to come from the pi that
    is differentiated) and returned to its previous mode."""
    if k < 1 or max_new_tokens < 1:
        raise ValueError(f"sample_rollouts: need k >= 1 and max_new_tokens >= 1, got {k} and {max_new_tokens}")
    was_training = model.training
    model.eval()
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    completions, logps = [None] * len(prompt_ids), torch.zeros(len(prompt_ids), k, dtype=torch.float64)
    by_length = {}
    for index, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"sample_rollouts: prompt {index} is empty (a chat prompt starts with BOS)")
        by_length.setdefault(len(ids), []).append(index)
    for length, group in by_length.items():
        prompt = torch.tensor([prompt_ids[i] for i in group], dtype=torch.long, device=device)  # (G, T)
        cache = KVCache(model.config, len(group), length + max_new_tokens, dtype=dtype, device=device)
        logits = prefill(model, prompt, cache)  # (G, V)
        rows = torch.arange(len(group), device=device).repeat_interleave(k)  # (G K,) row g*K + j is prompt g
        cache.reorder(rows)
        logits = logits[rows]  # (G K, V)
        new_tokens, lengths, sequence_logps = decode_n_tokens(
            model, logits, cache, max_new_tokens, lambda x: sample_token(x, 1.0, generator=generator), eos_id,
            logprob_dtype=torch.float64)  # (G K, max_new_tokens), (G K,), (G K,)
        for g, index in enumerate(group):
            completions[index] = [new_tokens[g * k + j, : int(lengths[g * k + j])].tolist() for j in range(k)]
            logps[index] = sequence_logps[g * k: (g + 1) * k].cpu()
    model.train(was_training)
    return Rollouts([list(ids) for ids in prompt_ids], completions, logps)


def rollout_batch(rollouts: Rollouts, pad_id: int) -> tuple[dict, torch.Tensor]:
    """The distinct (prompt, completion) rows of the rollouts as one right-padded batch in data/sft.py's layout
    (loss_mask on the completion's tokens), and `inverse` [P, K]: the row of each sample.

    A policy that favours a few short texts samples them many times, and each distinct text needs its log-prob
    once: the estimator sum_k A_k grad log pi(y_k) is sum_u (sum_{k: y_k = u} A_k) grad log pi(u), which autograd
    computes from the gathered [P, K] log-probs without change."""
    rows = {}  # (prompt index, completion) -> row
    inverse = [[rows.setdefault((p, tuple(c)), len(rows)) for c in row] for p, row in enumerate(rollouts.completions)]
    examples = [SequenceExample(rollouts.prompt_ids[p], list(completion), index)
                for index, (p, completion) in enumerate(rows)]
    return collate_sequences(examples, pad_id), torch.tensor(inverse, dtype=torch.long)


def sequence_logps(model, batch, inverse, *, reference: bool = False, compile=None):
    """log pi(y|x) of each sample [P, K] from its distinct row's: the policy with grad, or (reference=True) the
    model with every LoRA branch off, without grad (the reference for free, as in spl/step.py)."""
    inverse = inverse.to(batch["input_ids"].device)
    if not reference:
        return policy_logprobs(model, batch, compile=compile)[inverse]  # (P, K)
    with torch.no_grad(), disable_lora(model) if lora_modules(model) else contextlib.nullcontext():
        return policy_logprobs(model, batch, compile=compile)[inverse]  # (P, K)


@dataclass
class Candidates:
    """Each of P prompts' known texts (the data's responses that generation can write), which enter the
    gradient exactly (exact_candidates_loss): completions [P][C], rows padded by repeating one (mask False)."""
    completions: list[list[list[int]]]
    rewards: torch.Tensor  # (P, C)
    mask: torch.Tensor  # (P, C) bool

    def contains(self, rollouts: Rollouts) -> torch.Tensor:
        """Whether each sample [P, K] is one of its prompt's candidates (matched on tokens)."""
        known = [{tuple(c) for c, keep in zip(row, mask) if keep} for row, mask in
                 zip(self.completions, self.mask.tolist())]
        return torch.tensor([[tuple(c) in known[p] for c in row] for p, row in enumerate(rollouts.completions)],
                            dtype=torch.bool)


def online_step(model, rollouts: Rollouts, rewards, alpha: float, beta: float, pad_id: int, eos_id: int, *,
                candidates: Candidates | None = None, natural: bool = False, device=None, compile=None):
    """One step's loss (with grad) and detached metrics, given the rollouts' rewards [P, K]: RLOO (rloo_loss),
    or with `candidates` the estimator that sums over them exactly (exact_candidates_loss); the candidates and
    the samples are scored in one batch, each distinct text once.

    Metrics (means over the P*K samples): reward r; soft reward s; entropy estimate -mean log pi (an unbiased
    estimate of the sequence entropy H(pi), since the samples come from pi); cross-entropy estimate
    -mean log pi_ref (of H(pi, pi_ref)); completion length in tokens; the fraction that ended with EOS; with
    candidates, the policy's exact probability on them (candidate_mass, mean over prompts)."""
    width = 0 if candidates is None else candidates.mask.shape[1]
    joint = rollouts if candidates is None else Rollouts(
        rollouts.prompt_ids, [c + s for c, s in zip(candidates.completions, rollouts.completions)], None)
    batch, inverse = rollout_batch(joint, pad_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    policy = sequence_logps(model, batch, inverse, compile=compile)  # (P, C + K) with grad
    ref = sequence_logps(model, batch, inverse, reference=True, compile=compile)  # (P, C + K)
    rewards = rewards.to(policy.device, policy.dtype)
    extra = {}
    if candidates is None:
        loss, soft, advantages = rloo_loss(policy, ref, rewards, alpha, beta)
    else:
        on = lambda x: x.to(policy.device)  # noqa: E731
        loss, soft, advantages, mass = exact_candidates_loss(
            policy[:, :width], ref[:, :width], on(candidates.rewards).to(policy.dtype), on(candidates.mask),
            policy[:, width:], ref[:, width:], rewards, on(candidates.contains(rollouts)), alpha, beta, natural)
        policy, ref = policy[:, width:], ref[:, width:]
        extra = {"candidate_mass": float(mass.mean())}
    lengths = rollouts.lengths()
    eos = torch.tensor([[bool(c) and c[-1] == eos_id for c in row] for row in rollouts.completions])
    metrics = {"loss": float(loss.detach()), "reward": float(rewards.mean()), "soft_reward": float(soft.mean()),
               "entropy": -float(policy.detach().mean()), "cross_entropy": -float(ref.mean()),
               "advantage_abs": float(advantages.abs().mean()), "length": float(lengths.mean()),
               "eos_fraction": float(eos.float().mean()), **extra, "distinct": len(batch["input_ids"]),
               "train_tokens": int(batch["attention_mask"].sum())}
    return loss, metrics


# -------------------------------------------------------------------------------------------- rewards

class RewardModelReward:
    """A reward model trained by `train.py --loss reward`: the world's (or any) base model with the run's LoRA
    adapter and scalar head, score(x, y) = w . h_last + b (spl/step.py RewardHead). Bradley-Terry scores are
    defined up to a per-prompt constant, which the RLOO baseline removes."""

    def __init__(self, model, head: RewardHead, pad_id: int, device=None):
        self.model, self.head, self.pad_id, self.device = model.eval(), head.eval(), pad_id, device

    @classmethod
    def load(cls, run_dir, base_model_dir, pad_id: int, device=None, dtype=None) -> "RewardModelReward":
        run_dir = Path(run_dir)
        head = load_reward_head(run_dir / "adapter")
        model = load_pretrained(base_model_dir, dtype=dtype, device=device)
        if head.score.in_features != model.config.hidden_size:
            raise ValueError(f"{run_dir}: its reward head reads {head.score.in_features} features, the base model "
                             f"{base_model_dir} has {model.config.hidden_size}")
        load_adapter(model, run_dir / "adapter")
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, head.to(device), pad_id, device)

    @torch.no_grad()
    def __call__(self, question_indices, rollouts: Rollouts) -> torch.Tensor:
        batch, inverse = rollout_batch(rollouts, self.pad_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return reward_scores(self.model, self.head, batch).double().cpu()[inverse]  # (P, K)


class SupportedReward:
    """A reward trusted only where it was trained: `reward` on each prompt's responses in the data, `floor` on
    any other completion. A Bradley-Terry reward model has seen only the data's responses; what it says about
    other text is extrapolation, and online SPL with alpha >= beta exploits it (README: scored noise above the
    options). This is the world's exact reward with the model's scores in place of log p, so the run shows
    what the reward model learned about the options (the exact-reward run being the oracle)."""

    def __init__(self, reward, prompts, floor: float):
        if not math.isfinite(floor):
            raise ValueError(f"SupportedReward: the floor must be a finite number, got {floor!r}")
        self.reward, self.floor = reward, float(floor)
        self.responses = {p.index: {tuple(c) for c in p.candidates} for p in prompts}

    def __call__(self, question_indices, rollouts: Rollouts) -> torch.Tensor:
        scores = self.reward(question_indices, rollouts)  # (P, K)
        known = torch.tensor([[tuple(c) in self.responses[q] for c in row]
                              for q, row in zip(question_indices, rollouts.completions)], dtype=torch.bool)
        return torch.where(known, scores, torch.full_like(scores, self.floor))  # (P, K)


def load_reward_model(run_dir, default_base, prompts, pad_id: int, floor: float | None, device=None, dtype=None):
    """--reward-model RUN_DIR as a reward: the `train.py --loss reward` run's adapter and head on the base model
    it was trained from (its config.json's `model`, else `default_base`); with `floor`, trusted only on the data's
    responses (SupportedReward). A directory that is not such a run is a ValueError naming it."""
    from models.fields import read_json_object
    saved = read_json_object(Path(run_dir) / "config.json", ValueError)  # one line for a file that is no config
    if saved.get("loss") != "reward" or saved.get("init_config") or not isinstance(saved.get("model") or "", str):
        raise ValueError(f"--reward-model {run_dir}: not a LoRA `--loss reward` run")
    base = resolve_model(saved["model"]) if saved.get("model") else default_base  # as train.py resolved it
    reward = RewardModelReward.load(run_dir, base, pad_id, device, dtype)
    return reward if floor is None else SupportedReward(reward, prompts, floor)


# -------------------------------------------------------------------------------------------- train.py's pieces

@dataclass
class OnlinePrompt:
    """One distinct prompt of the training data: what spl-online samples completions for, and the data's
    distinct responses to it (candidates for the exact sum, with their rewards once `with_candidate_rewards`
    has scored them)."""
    prompt_ids: list[int]
    index: int
    candidates: list[list[int]] = field(default_factory=list)
    candidate_rewards: list[float] = field(default_factory=list)


def distinct_prompts(examples) -> list[OnlinePrompt]:
    """The distinct prompts of tokenised examples (anything with `prompt_ids`), in order of first appearance,
    with the distinct responses (`chosen_ids`, `rejected_ids` or `response_ids`) each has in the data."""
    seen = {}
    for example in examples:
        responses = seen.setdefault(tuple(example.prompt_ids), {})
        for name in ("chosen_ids", "rejected_ids", "response_ids"):
            if hasattr(example, name):
                responses.setdefault(tuple(getattr(example, name)), None)
    return [OnlinePrompt(list(ids), index, [list(r) for r in responses])
            for index, (ids, responses) in enumerate(seen.items())]


def is_outcome(completion, max_new_tokens: int, eos_id: int) -> bool:
    """Whether sample_rollouts can return `completion` as it is: EOS last and nowhere before, within
    max_new_tokens, or exactly max_new_tokens tokens without EOS. Only such texts are disjoint outcomes of the
    sampler, so only they may enter the exact sum (a longer response's probability is that of its prefix)."""
    if not completion or eos_id in completion[:-1] or len(completion) > max_new_tokens:
        return False
    return completion[-1] == eos_id or len(completion) == max_new_tokens


def with_candidate_rewards(prompts: list[OnlinePrompt], reward, max_new_tokens: int, eos_id: int):
    """The prompts with only the candidates the sampler can write (is_outcome) and their rewards, scored once
    (the reward is fixed)."""
    scored = []
    for prompt in prompts:
        kept = [c for c in prompt.candidates if is_outcome(c, max_new_tokens, eos_id)]
        rewards = reward([prompt.index], Rollouts([prompt.prompt_ids], [kept], None))[0].tolist() if kept else []
        scored.append(OnlinePrompt(prompt.prompt_ids, prompt.index, kept, rewards))
    return scored


def batch_candidates(prompts: list[OnlinePrompt]) -> Candidates:
    """The Candidates of a batch of prompts, padded to the widest (a prompt with none pads with an empty
    completion, masked)."""
    width = max(1, max(len(p.candidates) for p in prompts))
    completions = [p.candidates + [(p.candidates or [[]])[0]] * (width - len(p.candidates)) for p in prompts]
    rewards = torch.tensor([p.candidate_rewards + [0.0] * (width - len(p.candidates)) for p in prompts],
                           dtype=torch.float64)  # (P, C)
    mask = torch.tensor([[i < len(p.candidates) for i in range(width)] for p in prompts])  # (P, C)
    return Candidates(completions, rewards, mask)


def collate_prompts(prompts: list[OnlinePrompt], pad_id: int = 0, pad_to_multiple: int = 1) -> dict:
    """A batch of prompts for data/batching.py's seeded, resumable order: their indices [P], and a loss_mask of
    ones [P] so that train.py's accumulation counts prompts as the step's units."""
    return {"prompt_index": torch.tensor([p.index for p in prompts], dtype=torch.long),
            "loss_mask": torch.ones(len(prompts), dtype=torch.bool)}


def training_batches(prompts: list[OnlinePrompt], reward, tokenizer, micro_batch: int, seed: int,
                     max_new_tokens: int, estimator: str, procs):
    """train.py's batches for --loss spl-online: (a seeded order of micro-batches of the data's distinct prompts,
    each process drawing its share (spl/distributed.py share_batches), and what online_step_function needs:
    (prompts, reward, pad id, stop id)). Unless estimator is "rloo", the responses the sampler can write are
    scored once here (with_candidate_rewards)."""
    if estimator != "rloo":
        prompts = with_candidate_rewards(prompts, reward, max_new_tokens, tokenizer.end_of_turn_id)
    batches = share_batches(PreferenceBatches(prompts, micro_batch, tokenizer.pad_id, seed=seed,
                                              collate_fn=collate_prompts,
                                              length_fn=lambda prompt: len(prompt.prompt_ids)), procs)
    return batches, (prompts, reward, tokenizer.pad_id, tokenizer.end_of_turn_id)


def online_step_function(model, prompts: list[OnlinePrompt], reward, alpha: float, beta: float, samples: int,
                         max_new_tokens: int, pad_id: int, eos_id: int, estimator: str = "rloo", device=None,
                         compile=None):
    """train.py's micro-batch loss for --loss spl-online: batch (collate_prompts) -> (loss, metric sums over its
    prompts). Samples K completions per prompt with the current policy, rewards them, and returns
    `online_step`'s loss by `estimator` (ESTIMATORS): "rloo" samples everything; "exact" and "natural" sum the
    prompts' scored candidates (from with_candidate_rewards) exactly, "natural" in natural-gradient form. The
    batch's attention_mask becomes the trained rows' mask, so the loop's tokens/s counts the tokens trained on per
    second of the whole step (sampling included); generation has its own."""
    def step(batch):
        index = batch["prompt_index"].tolist()
        started = time.perf_counter()
        rollouts = sample_rollouts(model, [prompts[i].prompt_ids for i in index], samples, max_new_tokens, eos_id)
        generation_s = time.perf_counter() - started
        rewards = reward(index, rollouts)  # (P, K)
        candidates = None if estimator == "rloo" else batch_candidates([prompts[i] for i in index])
        loss, metrics = online_step(model, rollouts, rewards, alpha, beta, pad_id, eos_id, candidates=candidates,
                                    natural=estimator == "natural", device=device, compile=compile)
        generated = float(rollouts.lengths().sum())
        metrics |= {"generation_s": generation_s, "generation_tokens_per_s": generated / max(generation_s, 1e-9)}
        if hasattr(reward, "is_option"):  # the world's exact reward knows which texts are options
            metrics["option_fraction"] = float(reward.is_option(index, rollouts).float().mean())
        batch["attention_mask"] = torch.ones(metrics.pop("train_tokens"), dtype=torch.bool)
        return loss, {name: value * len(index) for name, value in metrics.items()}  # sums over the prompts

    return step
