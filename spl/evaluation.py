"""Held-out evaluation (train.py --eval-data / --eval-split / --eval-fraction, every --eval-every steps and at the end).

The eval set is a list of preference pairs the policy never trains on: another file (--eval-data), another split
of the dataset directory (--eval-split, of --eval-data or else of --data), or whole prompts cut from the training
data (--eval-fraction, data/heldout.py). Its reference log-probs are computed once, like training's, and cached under
their own key (spl/reference.py). Each evaluation runs the training step's own loss function (the objective in use)
with the model in eval mode (no LoRA dropout) and no gradient over every held-out pair once, and reports the mean
over pairs of each metric the training step logs, prefixed `eval_`:

    eval_loss             mean_i loss_i                                      (the objective's per-pair loss)
    eval_reward_accuracy  mean_i [r_c,i > r_r,i]                              (implicit rewards, spl/step.py)
    eval_margin           mean_i (r_c,i - r_r,i)
    eval_reward_chosen, eval_reward_rejected, eval_logps_chosen, eval_logps_rejected

which are TRL's DPOTrainer.evaluate() figures (eval_loss, eval_rewards/accuracies, eval_rewards/margins, ...) for
DPO on the same pairs (tests/test_evaluation.py). The world's option-mass anchor, a regulariser of whole training
prompts, is added to eval_loss when the run uses it, as in training. Under torchrun each process evaluates its share
of every batch and the sums are all-reduced.
"""
from __future__ import annotations

import torch

from data.heldout import split_by_prompt
from data.tokenization import load_preference_data
from spl.cli import UsageError
from spl.distributed import Processes, sum_across


def has_eval_set(c) -> bool:
    """Whether a run (TrainConfig) evaluates held-out pairs."""
    return bool(c.eval_data or c.eval_split or c.eval_fraction)


def check_evaluation_options(c, world_run: bool) -> None:
    """The held-out evaluation options of a TrainConfig, checked at start-up (spl/config.py validate): one
    UsageError line each. world_run: a run on the embedded world, where --eval-every is the world report's period."""
    def fail(message):
        raise UsageError(message)

    if not 0 <= c.eval_fraction < 1:
        fail(f"--eval-fraction must be in [0, 1), got {c.eval_fraction}")
    named = c.eval_data is not None or c.eval_split is not None
    if named and c.eval_fraction:
        fail("give --eval-data / --eval-split (a held-out file or split) or --eval-fraction (prompts held out of "
             "--data), not both")
    if c.eval_split is not None and c.eval_data is None and c.data is None:
        fail(f"--eval-split {c.eval_split} names a split of --eval-data's or --data's dataset directory: give one")
    if has_eval_set(c) and c.loss in ("sft", "spl-online"):
        fail(f"--eval-data, --eval-split and --eval-fraction evaluate preference pairs with the training loss; "
             f"--loss {c.loss} has none to evaluate")
    if c.eval_every and not has_eval_set(c) and not world_run:
        fail(f"--eval-every {c.eval_every}: nothing to evaluate; give --eval-data FILE, --eval-split NAME or "
             f"--eval-fraction F")


def held_out_examples(c, tokenizer, examples: list, dataset_sha256: str, vocab_size: int, say):
    """(training examples, eval examples, the eval set's content hash for its reference cache key): --eval-data /
    --eval-split read and tokenised as --data is, or --eval-fraction's prompts cut from `examples`; with no eval
    set, (examples, [], None) unchanged."""
    if c.eval_fraction:
        try:
            train, held_out = split_by_prompt(examples, c.eval_fraction, c.seed)
        except ValueError as error:
            raise UsageError(f"--eval-fraction {c.eval_fraction}: {error}") from None
        prompts = len({tuple(e.prompt_ids) for e in held_out})
        say(f"eval set: {len(held_out)} pairs of {prompts} prompts held out of the training data (--eval-fraction "
            f"{c.eval_fraction:g} of its prompts, seed {c.seed}); {len(train)} pairs left to train on")
        return train, held_out, f"{dataset_sha256}:eval_fraction={c.eval_fraction!r}:seed={c.seed}"
    if not (c.eval_data or c.eval_split):
        return examples, [], None
    held_out, summary = load_preference_data(c.eval_data or c.data, tokenizer, c.max_length, c.max_prompt_length,
                                             c.column_map(), c.eval_split, vocab_size,
                                             None if c.eval_data else c.data_subsets)
    say(f"eval set: {summary.format()}")
    if not held_out:
        raise UsageError(f"{summary.path}: no usable eval pairs")
    return examples, held_out, summary.sha256


@torch.no_grad()
def evaluate(model, step_loss, batches, procs: Processes, device) -> dict[str, float]:
    """One pass over the eval set: {eval_<metric>: its mean over the held-out pairs}, all processes together.

    step_loss: the training step's batch -> (loss, metric sums over the batch's pairs) (train.py step_function);
    batches: a fresh seeded order of the eval pairs (an epoch visits every pair once; its len() is the epoch's
    batch count). The model is put in eval mode for the pass and given back in the mode it was in."""
    was_training = model.training
    model.eval()
    sums, pairs = {}, 0
    try:
        for _ in range(len(batches)):
            batch = next(batches)  # this process's share of the next batch
            counts = batch.pop("counts", True)
            batch = {k: v.to(device) for k, v in batch.items()}
            _, metrics = step_loss(batch)
            pairs += len(batch["chosen_prob"]) if counts else 0
            for name, value in metrics.items():
                sums[name] = sums.get(name, 0.0) + (float(value) if counts else 0.0)
    finally:
        model.train(was_training)
    names = list(sums)  # the same order on every process
    reduced = sum_across(procs, [sums[name] for name in names] + [pairs], device)
    return {f"eval_{name}": total / reduced[-1] for name, total in zip(names, reduced[:-1])}


def format_evaluation(step: int, record: dict) -> str:
    """The printed line of one evaluation."""
    shown = ", ".join(f"{name.removeprefix('eval_').replace('_', ' ')} {value:.4f}" for name, value in record.items())
    return f"eval at step {step}: {shown}"
