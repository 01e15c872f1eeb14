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
`rloo_loss`, whose gradient is -g. A completion that reaches max_new_tokens without EOS is the outcome
"these first max_new_tokens tokens": its probability is the product of its tokens', so the outcomes still
form one distribution and the estimator stays unbiased for the truncated problem.

Rewards: `WorldReward` is the embedded world's exact one (log p of an option, the population's Bradley-Terry
score, and a floor for any other text); `RewardModelReward` wraps a reward model trained by
`train.py --loss reward`.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from data.sft import SequenceExample, collate_sequences
from models.generate import decode_n_tokens, prefill, sample_token
from models.lora import disable_lora, lora_modules
from models.mistral import KVCache
from spl.step import RewardHead, policy_logprobs, reward_scores

# The floor: the exact reward of any text that is not one of a question's options. log p of the options ranges
# over [log 0.05, log 0.8]; text no rater picks would have log 0 = -inf, which has no finite optimum, so a finite
# floor stands for it. Prop. A.2 gives the mass the optimum keeps off the options (spl.theory.full_space_optimum).
# With alpha > beta the floor must also beat noise: over T tokens of V pieces alpha H(pi) - beta H(pi, pi_ref) <=
# (alpha - beta) T log V, so unless floor + (alpha - beta) T log V is below an option's reward the optimum writes noise.
DEFAULT_FLOOR = math.log(0.01)


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
def sample_rollouts(model, prompt_ids: list[list[int]], k: int, max_new_tokens: int, eos_id: int,
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


def online_step(model, rollouts: Rollouts, rewards, alpha: float, beta: float, pad_id: int, eos_id: int, *,
                device=None, compile=None):
    """One REINFORCE-RLOO step's loss (with grad) and detached metrics, given the rollouts' rewards [P, K].

    Metrics (means over the P*K samples): reward r; soft reward s; entropy estimate -mean log pi (an unbiased
    estimate of the sequence entropy H(pi), since the samples come from pi); cross-entropy estimate
    -mean log pi_ref (of H(pi, pi_ref)); completion length in tokens; the fraction that ended with EOS."""
    batch, inverse = rollout_batch(rollouts, pad_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    policy = sequence_logps(model, batch, inverse, compile=compile)  # (P, K) with grad
    ref = sequence_logps(model, batch, inverse, reference=True, compile=compile)  # (P, K)
    rewards = rewards.to(policy.device, policy.dtype)
    loss, soft, advantages = rloo_loss(policy, ref, rewards, alpha, beta)
    lengths = rollouts.lengths()
    eos = torch.tensor([[bool(c) and c[-1] == eos_id for c in row] for row in rollouts.completions])
    metrics = {"loss": float(loss.detach()), "reward": float(rewards.mean()), "soft_reward": float(soft.mean()),
               "entropy": -float(policy.detach().mean()), "cross_entropy": -float(ref.mean()),
               "advantage_abs": float(advantages.abs().mean()), "length": float(lengths.mean()),
               "eos_fraction": float(eos.float().mean()), "distinct": len(batch["input_ids"]),
               "train_tokens": int(batch["attention_mask"].sum())}
    return loss, metrics


# -------------------------------------------------------------------------------------------- rewards

@dataclass(frozen=True)
class WorldReward:
    """The embedded world's exact reward on its opinion questions, a function of the token sequence:

        r(x_q, y) = log p_q(o)   if y is exactly option o's tokens, enc(o) + EOS  (the Bradley-Terry score)
                  = floor        for any other completion (another option's text tokenised differently, a
                                 truncated or unfinished one, anything else).

    r = log p is the population's Bradley-Terry reward up to a per-prompt constant (data/world.py), which
    RLOO and the optimum ignore. `prompts[q]` are question q's chat prompt ids."""
    prompts: tuple[tuple[int, ...], ...]
    options: tuple[dict, ...]  # per question: option response ids (a tuple, EOS included) -> log p
    floor: float

    @classmethod
    def from_questions(cls, questions, tokenizer, floor: float = DEFAULT_FLOOR) -> "WorldReward":
        if not math.isfinite(floor):
            raise ValueError(f"WorldReward: the floor must be a finite number, got {floor!r}")
        prompts = tuple(tuple(tokenizer.encode_prompt([{"role": "user", "content": q.prompt}])) for q in questions)
        options = tuple({tuple(tokenizer.encode_response(o)): math.log(p) for o, p in zip(q.options, q.population)}
                        for q in questions)
        return cls(prompts, options, float(floor))

    def __call__(self, question_indices, rollouts: Rollouts) -> torch.Tensor:
        """Rewards [P, K] of the rollouts of questions `question_indices` (P of them)."""
        return torch.tensor([[self.options[q].get(tuple(c), self.floor) for c in row]
                             for q, row in zip(question_indices, rollouts.completions)], dtype=torch.float64)

    def is_option(self, question_indices, rollouts: Rollouts) -> torch.Tensor:
        """Whether each completion [P, K] is one of its question's options."""
        return torch.tensor([[tuple(c) in self.options[q] for c in row]
                             for q, row in zip(question_indices, rollouts.completions)])


class RewardModelReward:
    """A reward model trained by `train.py --loss reward`: the world's (or any) base model with the run's LoRA
    adapter and scalar head, score(x, y) = w . h_last + b (spl/step.py RewardHead). Bradley-Terry scores are
    defined up to a per-prompt constant, which the RLOO baseline removes."""

    def __init__(self, model, head: RewardHead, pad_id: int, device=None):
        self.model, self.head, self.pad_id, self.device = model.eval(), head.eval(), pad_id, device

    @classmethod
    def load(cls, run_dir, base_model_dir, pad_id: int, device=None, dtype=None) -> "RewardModelReward":
        from safetensors.torch import load_file

        from models import load_adapter, load_pretrained

        run_dir = Path(run_dir)
        head_path = run_dir / "adapter" / "reward_head.safetensors"
        if not head_path.is_file():
            raise FileNotFoundError(f"{head_path}: missing; --reward-model takes the run directory of a finished "
                                    f"`train.py --loss reward` run")
        model = load_pretrained(base_model_dir, dtype=dtype, device=device)
        load_adapter(model, run_dir / "adapter")
        for p in model.parameters():
            p.requires_grad_(False)
        head = RewardHead(model.config.hidden_size)
        head.load_state_dict(load_file(str(head_path)))
        return cls(model, head.to(device).requires_grad_(False), pad_id, device)

    @torch.no_grad()
    def __call__(self, question_indices, rollouts: Rollouts) -> torch.Tensor:
        batch, inverse = rollout_batch(rollouts, self.pad_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        return reward_scores(self.model, self.head, batch).double().cpu()[inverse]  # (P, K)


# -------------------------------------------------------------------------------------------- train.py's pieces

@dataclass
class OnlinePrompt:
    """One distinct prompt of the training data: what spl-online samples completions for."""
    prompt_ids: list[int]
    index: int


def distinct_prompts(examples) -> list[OnlinePrompt]:
    """The distinct prompts of tokenised examples (anything with `prompt_ids`), in order of first appearance."""
    seen = {}
    for example in examples:
        seen.setdefault(tuple(example.prompt_ids), len(seen))
    return [OnlinePrompt(list(ids), index) for ids, index in seen.items()]


def collate_prompts(prompts: list[OnlinePrompt], pad_id: int = 0, pad_to_multiple: int = 1) -> dict:
    """A batch of prompts for data/batching.py's seeded, resumable order: their indices [P], and a loss_mask of
    ones [P] so that train.py's accumulation counts prompts as the step's units."""
    return {"prompt_index": torch.tensor([p.index for p in prompts], dtype=torch.long),
            "loss_mask": torch.ones(len(prompts), dtype=torch.bool)}


def world_reward_for_prompts(questions, tokenizer, prompts: list[OnlinePrompt], floor: float) -> WorldReward:
    """The world's exact reward indexed like `prompts` (which must all be opinion questions' prompts)."""
    by_prompt = {tuple(tokenizer.encode_prompt([{"role": "user", "content": q.prompt}])): q for q in questions}
    missing = [p.index for p in prompts if tuple(p.prompt_ids) not in by_prompt]
    if missing:
        raise ValueError(f"the world's exact reward knows only its opinion questions; prompt {missing[0]} of the "
                         f"data is not one of them ({len(missing)} are not): give --reward-model RUN_DIR")
    return WorldReward.from_questions([by_prompt[tuple(p.prompt_ids)] for p in prompts], tokenizer, floor)


def online_step_function(model, prompts: list[OnlinePrompt], reward, alpha: float, beta: float, samples: int,
                         max_new_tokens: int, pad_id: int, eos_id: int, device=None, compile=None):
    """train.py's micro-batch loss for --loss spl-online: batch (collate_prompts) -> (loss, metric sums over its
    prompts). Samples K completions per prompt with the current policy, rewards them, and returns
    `online_step`'s loss. The batch's attention_mask becomes the trained rows' mask, so the loop's tokens/s
    counts the tokens trained on per second of the whole step (sampling included); generation has its own."""
    import time

    def step(batch):
        index = batch["prompt_index"].tolist()
        started = time.perf_counter()
        rollouts = sample_rollouts(model, [prompts[i].prompt_ids for i in index], samples, max_new_tokens, eos_id)
        generation_s = time.perf_counter() - started
        rewards = reward(index, rollouts)  # (P, K)
        loss, metrics = online_step(model, rollouts, rewards, alpha, beta, pad_id, eos_id, device=device,
                                    compile=compile)
        generated = float(rollouts.lengths().sum())
        metrics |= {"generation_s": generation_s, "generation_tokens_per_s": generated / max(generation_s, 1e-9)}
        if isinstance(reward, WorldReward):
            metrics["option_fraction"] = float(reward.is_option(index, rollouts).float().mean())
        batch["attention_mask"] = torch.ones(metrics.pop("train_tokens"), dtype=torch.bool)
        return loss, {name: value * len(index) for name, value in metrics.items()}  # sums over the prompts

    return step


def add_full_space_mass(report: dict, floor: float, alpha: float, beta: float) -> dict:
    """For alpha = beta, the option mass Eq. 4's optimum keeps under the world's exact reward with this floor
    (spl.theory.full_space_option_mass, from the reference model's own option probabilities) beside the learned
    mass, per question and on average. Other (alpha, beta): the mass depends on the reference's whole
    distribution off the options, so only the learned mass is reported."""
    from spl.theory import full_space_option_mass

    report = dict(report, reward_floor=floor)
    if alpha != beta:
        return report
    errors = []
    for row in report["questions"]:
        ref = torch.tensor(row["reference"], dtype=torch.float64) * row["reference_option_mass"]  # (K,)
        reward = torch.tensor(row["population"], dtype=torch.float64).log()  # (K,) r = log p
        row["closed_form_option_mass"] = float(full_space_option_mass(ref, reward, floor, alpha, beta))
        errors.append(abs(row["learned_option_mass"] - row["closed_form_option_mass"]))
    report["mean_closed_form_option_mass"] = sum(r["closed_form_option_mass"] for r in report["questions"]) / len(
        errors)
    report["mean_abs_option_mass_error"] = sum(errors) / len(errors)
    report["max_abs_option_mass_error"] = max(errors)
    return report
