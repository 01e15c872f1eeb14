"""One training step's math: sequence log-probs of a batch, the chosen objective, and what a trainer logs.

A preference batch holds B pairs in one tensor of 2B rows (rows 0..B-1 prompt + chosen, rows B..2B-1 prompt +
rejected; see `data/batching.py`), so the policy sees both in one forward pass:

    hidden = model.hidden_states(input_ids)                                   [2B, T, D]
    logps  = sum_t loss_mask * log softmax(hidden @ lm_head.T)[targets]       [2B]   (fused: spl/logprobs.py)
    loss   = mean_b  loss_fn(logps[:B], logps[B:], ref_chosen, ref_rejected)  (spl/losses.py)

A prompt-grouped batch (`collate_grouped`) holds each distinct response once, R rows, and the pairs as row indices;
`grouped_preference_step` scores the R rows and gathers each pair's two, and adds the option-mass anchor.

Reference log-probs are computed once per dataset with LoRA disabled (`reference_logprobs`), so the policy's
step needs one forward and one backward. Everything here is a function of tensors and a model; the loop,
files and schedules live in train.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from models.lora import disable_lora, lora_modules, output_weight
from data.batching import row_values
from spl import losses as L
from spl.logprobs import sequence_logprobs
from models.prefix import shared_prefix_hidden_states, split_shared_prefix

PREFERENCE_LOSSES = ("spl", "dpo", "ipo", "cdpo", "fdpo", "rpo", "dpop")  # train.py --loss also takes sft, reward


@dataclass(frozen=True)
class Objective:
    """Which loss and its coefficients (train.py's --loss, --alpha, --beta, ...)."""
    loss: str = "spl"
    alpha: float = 0.2
    beta: float = 0.1
    label_smoothing: float = 0.0  # cdpo
    ipo_tau: float = 0.1  # ipo
    fdpo_divergence: str = "reverse_kl"  # fdpo
    fdpo_alpha: float = 0.5  # fdpo's alpha-divergence parameter
    average_logprobs: bool = False  # length-normalised log-probs (IPO and SimPO-style variants)
    anchor: float = 0.0  # weight of the option-mass anchor (spl/losses.py option_mass_anchor); needs grouped batches
    nll_weight: float = 1.0  # rpo: weight of the NLL of the chosen response
    dpop_lambda: float = 50.0  # dpop: Pal et al.'s lambda

    @classmethod
    def from_config(cls, config) -> "Objective":
        """The objective of a training config (train.py's TrainConfig, which takes these fields' defaults from
        here): every field of the same name."""
        return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls)})


def shared_prefix_logprobs(model, batch, *, average: bool = False, compile=None):
    """Summed (or averaged) log-probs of each row's masked-in targets, [R]: policy_logprobs with every prompt of
    the batch computed once (models/prefix.py's packed forward, then the same fused head)."""
    split = split_shared_prefix(batch)
    hidden = shared_prefix_hidden_states(model, split)  # (R, Tr, D)
    return sequence_logprobs(hidden, output_weight(model), split["continuation_targets"],
                             split["continuation_loss_mask"], average=average, compile=compile)  # (R,)


def policy_logprobs(model, batch, *, average: bool = False, compile=None, shared_prefix: bool = False):
    """Summed (or averaged) log-probs of each row's masked-in targets under `model`: [rows]. With shared_prefix,
    each prompt of the batch runs once and its rows continue from its keys and values (models/prefix.py: the same
    values and gradients; needs the batch's response_prompt and prompt_lengths)."""
    if shared_prefix:
        return shared_prefix_logprobs(model, batch, average=average, compile=compile)  # (rows,)
    hidden = model.hidden_states(batch["input_ids"])  # (rows, T, D)
    return sequence_logprobs(hidden, output_weight(model), batch["targets"], batch["loss_mask"],
                             average=average, compile=compile)  # (rows,)


@torch.no_grad()
def reference_logprobs(model, batch, *, average: bool = False, compile=None, shared_prefix: bool = False):
    """The same log-probs under the reference policy: the model with every LoRA branch off (torchtune's
    disable_adapter: the reference for free), or the model as it is if it has no LoRA yet.
    Returns (ref_chosen_logps [B], ref_rejected_logps [B])."""
    with disable_lora(model) if lora_modules(model) else contextlib.nullcontext():
        logps = policy_logprobs(model, batch, average=average, compile=compile, shared_prefix=shared_prefix)  # (2B,)
    pairs = logps.shape[0] // 2
    return logps[:pairs], logps[pairs:]


def preference_losses(objective: Objective, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps, chosen_prob=None):
    """(losses [B], chosen_rewards [B], rejected_rewards [B]) of the objective's loss."""
    args = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    name = objective.loss
    if name == "spl":
        return L.spl_loss(*args, objective.alpha, objective.beta, chosen_prob=chosen_prob)
    if name == "dpo":
        return L.dpo_loss(*args, objective.beta, chosen_prob=chosen_prob)
    if name == "cdpo":  # label smoothing is its own (uniform) soft label; per-example ones are refused at start-up
        return L.cdpo_loss(*args, objective.beta, objective.label_smoothing)
    if name == "ipo":
        return L.ipo_loss(*args, objective.ipo_tau, chosen_prob=chosen_prob)
    if name == "fdpo":
        return L.fdpo_loss(*args, objective.beta, objective.fdpo_divergence, objective.fdpo_alpha,
                           chosen_prob=chosen_prob)
    if name == "rpo":
        return L.rpo_loss(*args, objective.alpha, objective.beta, objective.nll_weight, chosen_prob=chosen_prob)
    if name == "dpop":
        return L.dpop_loss(*args, objective.alpha, objective.beta, objective.dpop_lambda, chosen_prob=chosen_prob)
    raise ValueError(f"unknown preference loss {name!r} (choose from {', '.join(PREFERENCE_LOSSES)})")


def pair_metrics(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """What a preference step logs, each summed over the batch's pairs (divide by the pair count): the loss; the
    margin chosen_reward - rejected_reward (for SPL the logit z of Eq. 5); the implicit rewards; reward accuracy
    (the fraction of pairs whose chosen reward is higher); the policy's log-probs of chosen and rejected."""
    return {
        "loss": losses.detach().sum(),
        "margin": (chosen_rewards - rejected_rewards).sum(),
        "reward_chosen": chosen_rewards.sum(),
        "reward_rejected": rejected_rewards.sum(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).float().sum(),
        "logps_chosen": chosen_logps.detach().sum(),
        "logps_rejected": rejected_logps.detach().sum(),
    }


def preference_step(model, batch, ref_chosen_logps, ref_rejected_logps, objective: Objective, *, compile=None,
                    shared_prefix: bool = False):
    """Mean loss over the batch's pairs (with grad) and detached metrics.

    Logged metrics: the loss; the margin, i.e. chosen_reward - rejected_reward, which for SPL is the logit z of
    Eq. 5; the implicit rewards `alpha * log pi - beta * log pi_ref` (Eq. 39 without log Z); reward accuracy (the
    fraction of pairs whose chosen reward is higher); the policy's log-probs of chosen and rejected.
    """
    logps = policy_logprobs(model, batch, average=objective.average_logprobs, compile=compile,
                            shared_prefix=shared_prefix)  # (2B,)
    pairs = logps.shape[0] // 2
    chosen_logps, rejected_logps = logps[:pairs], logps[pairs:]  # (B,), (B,)
    losses, chosen_rewards, rejected_rewards = preference_losses(
        objective, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, batch.get("chosen_prob"))
    metrics = pair_metrics(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
    return losses.mean(), metrics, pairs  # metrics are sums over the batch's pairs: divide by the pair count


def grouped_preference_step(model, batch, ref_chosen_logps, ref_rejected_logps, objective: Objective, *,
                            compile=None, shared_prefix: bool = False):
    """`preference_step` on a prompt-grouped batch (data/batching.py collate_grouped): each of the R distinct
    responses is scored once, each pair's log-ratio is a difference of two rows, and with objective.anchor > 0
    every pair carries anchor * its prompt's option-mass anchor (spl/losses.py pair_anchor, the term
    anchored_spl_loss adds, which the closed-form tests minimise):

        logps  = sequence log-probs of the rows                                        [R]
        loss_b = loss_fn(logps[c_b], logps[r_b], ...) + anchor * a_{q(b)}               [B]

    ref_chosen_logps / ref_rejected_logps are the pairs' cached reference log-probs [B], as for preference_step.
    With anchor = 0 the losses and gradients are preference_step's on the same pairs (tests/test_data_batching.py).
    """
    logps = policy_logprobs(model, batch, average=objective.average_logprobs, compile=compile,
                            shared_prefix=shared_prefix)  # (R,) each prompt once with shared_prefix
    chosen_logps, rejected_logps = logps[batch["pair_chosen"]], logps[batch["pair_rejected"]]  # (B,), (B,)
    losses, chosen_rewards, rejected_rewards = preference_losses(
        objective, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, batch.get("chosen_prob"))
    metrics = {}
    if objective.anchor > 0:
        ref_rows = row_values(batch, ref_chosen_logps, ref_rejected_logps)  # (R,)
        pair_penalty = L.pair_anchor(logps, ref_rows, batch["pair_chosen"], batch["response_prompt"])  # (B,)
        losses = losses + objective.anchor * pair_penalty
        metrics["anchor"] = pair_penalty.detach().sum()
    metrics = {**pair_metrics(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps), **metrics}
    return losses.mean(), metrics, len(losses)


def sft_step(model, batch, *, compile=None):
    """Supervised fine-tuning: mean negative log-likelihood per response token of the batch.
    Returns (loss, metrics as sums, token count)."""
    logps = policy_logprobs(model, batch, compile=compile)  # (rows,) summed over response tokens
    tokens = batch["loss_mask"].sum()
    loss = -logps.sum() / tokens.clamp(min=1)
    return loss, {"loss": loss.detach() * tokens, "logps": logps.detach().sum()}, int(tokens)


class RewardHead(nn.Module):
    """A scalar head on the decoder's final hidden state at the sequence's last real token (its EOS):
    score(x, y) = w . h_last + b. Trained with the Bradley-Terry loss (Eq. 2) for `train.py --loss reward`."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, hidden, attention_mask):
        last = attention_mask.long().sum(-1) - 1  # (rows,) index of the last real token
        h_last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (rows, D)
        return self.score(h_last.float()).squeeze(-1)  # (rows,)


def load_reward_head(directory) -> RewardHead:
    """The scalar head that `train.py --loss reward` saves beside its adapter (`reward_head.safetensors`, keys
    `score.weight` [1, D] and `score.bias` [1]), on CPU, frozen. The one reader of that file."""
    path = Path(directory) / "reward_head.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no reward head (train one with `train.py --loss reward`)")
    state = load_file(str(path))
    if set(state) != {"score.weight", "score.bias"} or state["score.weight"].dim() != 2:
        raise ValueError(f"{path}: expected keys score.weight [1, D] and score.bias [1], got {sorted(state)}")
    head = RewardHead(state["score.weight"].shape[-1])
    head.load_state_dict(state)
    return head.requires_grad_(False)


def reward_scores(model, head: RewardHead, batch):
    """Scalar scores [rows] of every sequence in a batch."""
    hidden = model.hidden_states(batch["input_ids"])  # (rows, T, D)
    return head(hidden, batch["attention_mask"])


def reward_step(model, head: RewardHead, batch):
    scores = reward_scores(model, head, batch)  # (2B,)
    pairs = scores.shape[0] // 2
    losses, chosen, rejected = L.bradley_terry_loss(scores[:pairs], scores[pairs:], batch.get("chosen_prob"))
    metrics = {"loss": losses.detach().sum(), "margin": (chosen - rejected).sum(),
               "reward_chosen": chosen.sum(), "reward_rejected": rejected.sum(),
               "reward_accuracy": (chosen > rejected).float().sum()}
    return losses.mean(), metrics, pairs
