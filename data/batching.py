"""Collation of preference pairs into one tensor per batch, and a seeded, resumable batch order.

collate(): chosen and rejected of every pair share one [2B, T] tensor, so a single forward pass scores both
(rows 0..B-1 prompt+chosen, rows B..2B-1 prompt+rejected, right-padded). With targets = input_ids shifted left,
the log-probability of a response under a model with logits [2B, T, V] is

    logp(y | x) = sum_t loss_mask[t] * log softmax(logits[t])[targets[t]]

where loss_mask[t] is True exactly when targets[t] is a response token or its EOS, i.e. for the positions
t = len(prompt) - 1, ..., len(prompt) + len(response) - 2 of that row.

PreferenceBatches: an endless iterator of collated batches. Each epoch visits every pair once in an order
drawn from (seed, epoch); its position is the small dict {"epoch", "offset", "seed"} (offset = batches
already yielded this epoch), which a checkpoint stores and load_state_dict resumes from exactly.
"""
from __future__ import annotations

import numpy as np
import torch


def collate(examples, pad_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """B PreferenceExamples -> the batch dict described in the module docstring (T rounded up to pad_to_multiple)."""
    if not examples:
        raise ValueError("collate: need at least one PreferenceExample")
    if pad_to_multiple < 1:
        raise ValueError(f"collate: pad_to_multiple must be >= 1, got {pad_to_multiple}")
    rows = [e.prompt_ids + e.chosen_ids for e in examples] + [e.prompt_ids + e.rejected_ids for e in examples]
    prompt_lengths = [len(e.prompt_ids) for e in examples] * 2
    longest = max(len(row) for row in rows)
    T = -(-longest // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # [2B, T]
    attention_mask = torch.zeros((len(rows), T), dtype=torch.bool)  # [2B, T]
    loss_mask = torch.zeros((len(rows), T), dtype=torch.bool)  # [2B, T]
    for row, (ids, prompt_length) in enumerate(zip(rows, prompt_lengths)):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = True
        loss_mask[row, prompt_length - 1:len(ids) - 1] = True  # targets[t] = ids[t + 1] is a response token
    targets = torch.full_like(input_ids, pad_id)  # [2B, T]
    targets[:, :-1] = input_ids[:, 1:]  # position t predicts token t + 1
    return {
        "input_ids": input_ids,
        "targets": targets,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "chosen_prob": torch.tensor([e.chosen_prob for e in examples], dtype=torch.float32),  # [B]
        "pair_index": torch.tensor([e.index for e in examples], dtype=torch.long),  # [B]
    }


def batch_order(lengths: list[int], batch_size: int, seed: int, epoch: int,
                group_by_length: bool = False, group_batches: int = 32, drop_last: bool = False) -> list[list[int]]:
    """One epoch's batches of indices into `lengths`: a permutation drawn from (seed, epoch), cut into batches.

    With group_by_length, the shuffled indices are split into groups of group_batches * batch_size, each group
    is sorted by length (longest first) and cut into batches, and the batches are shuffled: pairs of similar
    length share a batch (less padding) while the order stays random. drop_last drops a final partial batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])  # independent streams for every (seed, epoch)
    order = rng.permutation(len(lengths))
    if group_by_length:
        group = batch_size * group_batches
        order = np.concatenate([sorted(order[start:start + group], key=lambda i: -lengths[i])
                                for start in range(0, len(order), group)]).astype(np.int64)
    batches = [order[start:start + batch_size].tolist() for start in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class PreferenceBatches:
    """Endless, deterministic, resumable iterator of collated batches over a list of examples (PreferenceExamples)."""

    def __init__(self, examples, batch_size: int, pad_id: int, seed: int = 0, group_by_length: bool = False,
                 drop_last: bool = False, pad_to_multiple: int = 1, collate_fn=collate, length_fn=None):
        """collate_fn(examples, pad_id, pad_to_multiple) -> batch and length_fn(example) -> padded length let the
        same order serve other example types (data/sft.py); the defaults are for PreferenceExamples."""
        if not examples:
            raise ValueError("PreferenceBatches: no examples")
        if batch_size < 1:
            raise ValueError(f"PreferenceBatches: batch_size must be >= 1, got {batch_size}")
        if drop_last and len(examples) < batch_size:
            raise ValueError(f"PreferenceBatches: drop_last with {len(examples)} examples < batch_size {batch_size} "
                             f"leaves no batch")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.group_by_length, self.drop_last, self.pad_to_multiple = group_by_length, drop_last, pad_to_multiple
        self.collate_fn = collate_fn
        length_fn = length_fn or (lambda e: len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)))
        self.lengths = [length_fn(e) for e in examples]
        self.epoch, self.offset = 0, 0
        self._order_epoch, self._order = None, None

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self.examples), self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        if self._order_epoch != epoch:
            self._order = batch_order(self.lengths, self.batch_size, self.seed, epoch,
                                      self.group_by_length, drop_last=self.drop_last)
            self._order_epoch = epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.offset >= len(self):
            self.epoch, self.offset = self.epoch + 1, 0
        indices = self.epoch_order(self.epoch)[self.offset]
        self.offset += 1
        return self.collate_fn([self.examples[i] for i in indices], self.pad_id, self.pad_to_multiple)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"epoch", "offset", "seed"}:
            raise ValueError(f"data state must have keys epoch, offset, seed; got {sorted(state)}")
        if state["seed"] != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run uses seed {self.seed}")
        if state["epoch"] < 0 or not 0 <= state["offset"] <= len(self):
            raise ValueError(f"data state {state} is out of range ({len(self)} batches per epoch)")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
