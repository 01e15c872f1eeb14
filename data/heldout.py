"""A held-out evaluation set cut from the training pairs by prompt (train.py --eval-fraction).

TRL users cut one with `dataset.train_test_split(test_size=F, seed=S)`, which draws rows: with several pairs per
prompt (HH-RLHF's, UltraFeedback's, the world's), the same prompt then lands on both sides and the eval set
measures memorisation of prompts the policy was trained on. Here whole prompts are drawn:

    prompts  = the distinct prompt_ids of the examples, in order of first appearance          P of them
    order    = a permutation of the P prompts drawn from numpy's default_rng(seed)
    held out = the pairs of the first max(1, round(F * P)) prompts of `order` (at most P - 1)

so no prompt (as token ids, after truncation: what the model sees) is on both sides, the cut depends only on the
data and the seed, and each side keeps the examples' order. Both lists are renumbered 0..n-1: an example's index
is its row in its own reference-log-prob cache and comes back as a batch's pair_index.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def split_by_prompt(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(training examples, held-out examples), each renumbered from 0 (module docstring). fraction in (0, 1);
    ValueError when the examples have fewer than two distinct prompts (nothing can be held out and trained on)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    prompts = list(dict.fromkeys(tuple(e.prompt_ids) for e in examples))  # distinct, in order of first appearance
    if len(prompts) < 2:
        raise ValueError(f"{len(prompts)} distinct prompt(s): need at least 2 to hold some out and train on the rest")
    count = min(len(prompts) - 1, max(1, round(fraction * len(prompts))))
    order = np.random.default_rng(seed).permutation(len(prompts))
    held = {prompts[i] for i in order[:count]}
    train = [e for e in examples if tuple(e.prompt_ids) not in held]
    held_out = [e for e in examples if tuple(e.prompt_ids) in held]
    return renumber(train), renumber(held_out)


def renumber(examples: list) -> list:
    """Copies of `examples` with index = position (PreferenceExample's index is its row in the reference cache)."""
    return [dataclasses.replace(e, index=i) for i, e in enumerate(examples)]
