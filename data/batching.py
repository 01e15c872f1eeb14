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

import math
import numpy as np
import torch


def pad_rows(rows: list[list[int]], prompt_lengths: list[int], pad_id: int, pad_to_multiple: int = 1):
    """The one padding rule of every batch: rows of prompt + response token ids, right-padded to T (the longest
    row rounded up to pad_to_multiple). Returns (input_ids, targets, loss_mask, attention_mask), each [rows, T]:
    targets[t] = input_ids[t + 1], and loss_mask marks the targets that are response tokens."""
    longest = max(len(row) for row in rows)
    T = -(-longest // pad_to_multiple) * pad_to_multiple
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # [rows, T]
    attention_mask = torch.zeros((len(rows), T), dtype=torch.bool)  # [rows, T]
    loss_mask = torch.zeros((len(rows), T), dtype=torch.bool)  # [rows, T]
    for row, (ids, prompt_length) in enumerate(zip(rows, prompt_lengths)):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, :len(ids)] = True
        loss_mask[row, prompt_length - 1:len(ids) - 1] = True  # targets[t] = ids[t + 1] is a response token
    targets = torch.full_like(input_ids, pad_id)  # [rows, T]
    targets[:, :-1] = input_ids[:, 1:]  # position t predicts token t + 1
    return input_ids, targets, loss_mask, attention_mask


def collate(examples, pad_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """B PreferenceExamples -> the batch dict described in the module docstring (T rounded up to pad_to_multiple)."""
    if not examples:
        raise ValueError("collate: need at least one PreferenceExample")
    if pad_to_multiple < 1:
        raise ValueError(f"collate: pad_to_multiple must be >= 1, got {pad_to_multiple}")
    rows = [e.prompt_ids + e.chosen_ids for e in examples] + [e.prompt_ids + e.rejected_ids for e in examples]
    prompt_lengths = [len(e.prompt_ids) for e in examples] * 2
    input_ids, targets, loss_mask, attention_mask = pad_rows(rows, prompt_lengths, pad_id, pad_to_multiple)  # [2B, T]
    return {
        "input_ids": input_ids,
        "targets": targets,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "chosen_prob": torch.tensor([e.chosen_prob for e in examples], dtype=torch.float32),  # [B]
        "pair_index": torch.tensor([e.index for e in examples], dtype=torch.long),  # [B]
        # The grouped batch's prompt fields (collate_grouped), so models/prefix.py scores each prompt once:
        "response_prompt": torch.arange(len(examples)).repeat(2),  # [2B] rows b and B + b share prompt b
        "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.long),  # [2B]
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


def pair_length(example) -> int:
    """A PreferenceExample's padded length in a batch: its prompt and longer response."""
    return len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))


class PreferenceBatches:
    """Endless, deterministic, resumable iterator of collated batches over a list of examples (PreferenceExamples).

    An epoch permutes the order's units (here the examples; PromptGroupedBatches' are whole prompts) and cuts
    them into batches of `batch_size` units; `lengths` holds each unit's padded length (for group_by_length)."""
    unit, size_name = "examples", "batch_size"  # what a batch counts, for the messages

    def __init__(self, examples, batch_size: int, pad_id: int, seed: int = 0, group_by_length: bool = False,
                 drop_last: bool = False, pad_to_multiple: int = 1, collate_fn=collate, length_fn=None):
        """collate_fn(examples, pad_id, pad_to_multiple) -> batch and length_fn(example) -> padded length let the
        same order serve other example types (data/sft.py); the defaults are for PreferenceExamples."""
        name = type(self).__name__
        if not examples:
            raise ValueError(f"{name}: no examples")
        if batch_size < 1:
            raise ValueError(f"{name}: {self.size_name} must be >= 1, got {batch_size}")
        self.examples, self.batch_size, self.pad_id, self.seed = examples, batch_size, pad_id, seed
        self.group_by_length, self.drop_last, self.pad_to_multiple = group_by_length, drop_last, pad_to_multiple
        self.collate_fn = collate_fn
        self.lengths = self.unit_lengths(length_fn or pair_length)
        if drop_last and len(self.lengths) < batch_size:
            raise ValueError(f"{name}: drop_last with {len(self.lengths)} {self.unit} < {self.size_name} "
                             f"{batch_size} leaves no batch")
        self.epoch, self.offset = 0, 0
        self._order_epoch, self._order = None, None

    def unit_lengths(self, length_fn) -> list[int]:
        """The padded length of each unit the epochs permute: here, of each example."""
        return [length_fn(e) for e in self.examples]

    def unit_examples(self, units: list[int]) -> list[int]:
        """One batch's units as indices into `examples`: here, the same indices."""
        return units

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (rest > 0 and not self.drop_last)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """This epoch's batches as indices into `examples`."""
        if self._order_epoch != epoch:
            batches = batch_order(self.lengths, self.batch_size, self.seed, epoch, self.group_by_length,
                                  drop_last=self.drop_last)
            self._order = [self.unit_examples(units) for units in batches]
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


# -------------------------------------------------------------------------------------------- prompt-grouped batches

def collate_grouped(examples, pad_id: int, pad_to_multiple: int = 1) -> dict[str, torch.Tensor]:
    """B PreferenceExamples -> one row per distinct (prompt, response), and the pairs as indices into the rows.

    A prompt with K responses and K(K-1)/2 pairs is K rows here, where `collate` makes K(K-1): its responses are
    scored once each, and every pair's log-ratio is a difference of two rows' log-probs,

        logp[pair_chosen[b]] - logp[pair_rejected[b]]   for pair b.

    Rows are in first-seen order (prompts in the order they first occur, each prompt's responses in the order they
    first occur), prompt + response right-padded exactly as in `collate`. Two responses are the same row when their
    prompt and response token ids are equal. Fields:

        input_ids, targets, loss_mask, attention_mask   [R, T]  as in `collate`
        response_prompt                                 [R]     the row's prompt, 0..P-1 in first-seen order
        prompt_lengths                                  [R]     len(prompt_ids) of the row
        pair_chosen, pair_rejected                      [B]     row of each pair's chosen / rejected response
        chosen_prob, pair_index                         [B]     as in `collate`

    `collate` is the special case where no response repeats: there rows 0..B-1 are the chosen ones and
    pair_chosen = arange(B), pair_rejected = B + arange(B).
    """
    if not examples:
        raise ValueError("collate_grouped: need at least one PreferenceExample")
    if pad_to_multiple < 1:
        raise ValueError(f"collate_grouped: pad_to_multiple must be >= 1, got {pad_to_multiple}")
    prompt_of = {}  # tuple(prompt_ids) -> its index in the batch
    row_of = {}  # (prompt index, tuple(response_ids)) -> its row
    rows, row_prompts, row_prompt_lengths, pair_chosen, pair_rejected = [], [], [], [], []
    for e in examples:
        prompt = prompt_of.setdefault(tuple(e.prompt_ids), len(prompt_of))
        for response, pair_rows in ((e.chosen_ids, pair_chosen), (e.rejected_ids, pair_rejected)):
            key = (prompt, tuple(response))
            if key not in row_of:
                row_of[key] = len(rows)
                rows.append(e.prompt_ids + response)
                row_prompts.append(prompt)
                row_prompt_lengths.append(len(e.prompt_ids))
            pair_rows.append(row_of[key])
    input_ids, targets, loss_mask, attention_mask = pad_rows(rows, row_prompt_lengths, pad_id,
                                                             pad_to_multiple)  # [R, T]
    return {
        "input_ids": input_ids,
        "targets": targets,
        "loss_mask": loss_mask,
        "attention_mask": attention_mask,
        "response_prompt": torch.tensor(row_prompts, dtype=torch.long),  # [R]
        "prompt_lengths": torch.tensor(row_prompt_lengths, dtype=torch.long),  # [R]
        "pair_chosen": torch.tensor(pair_chosen, dtype=torch.long),  # [B]
        "pair_rejected": torch.tensor(pair_rejected, dtype=torch.long),  # [B]
        "chosen_prob": torch.tensor([e.chosen_prob for e in examples], dtype=torch.float32),  # [B]
        "pair_index": torch.tensor([e.index for e in examples], dtype=torch.long),  # [B]
    }


def row_values(batch, chosen_values: torch.Tensor, rejected_values: torch.Tensor) -> torch.Tensor:
    """Per-pair values ([B] for the chosen and the rejected responses, e.g. cached reference log-probs) as one
    value per row of a grouped batch, [R]. A row shared by several pairs takes the value any of them holds (they
    agree: the same sequence under the same model)."""
    rows = batch["input_ids"].shape[0]
    values = torch.zeros(rows, dtype=chosen_values.dtype, device=chosen_values.device)  # [R]
    values[batch["pair_chosen"]] = chosen_values
    values[batch["pair_rejected"]] = rejected_values
    return values


def prompt_groups(examples) -> list[list[int]]:
    """Indices into `examples` grouped by prompt (equal prompt_ids), groups and members in first-seen order."""
    groups = {}
    for i, e in enumerate(examples):
        groups.setdefault(tuple(e.prompt_ids), []).append(i)
    return list(groups.values())


class PromptGroupedBatches(PreferenceBatches):
    """Endless, seeded, resumable batches of whole prompts: each batch holds `prompts_per_batch` prompts and all
    of their pairs (collated by `collate_grouped`), so every response of a prompt is in the batch that holds any
    of its pairs, and each distinct response is scored once.

    An epoch is a permutation of the prompts drawn from (seed, epoch), cut into batches of prompts_per_batch
    (with group_by_length, prompts of similar longest row share a batch, as in `batch_order`). The position is
    the same {"epoch", "offset", "seed"} as PreferenceBatches', counted in batches.
    """

    unit, size_name = "prompts", "prompts_per_batch"

    def __init__(self, examples, prompts_per_batch: int, pad_id: int, seed: int = 0, group_by_length: bool = False,
                 drop_last: bool = False, pad_to_multiple: int = 1):
        self.groups = prompt_groups(examples)  # the units: each prompt's pairs, as indices into examples
        super().__init__(examples, prompts_per_batch, pad_id, seed, group_by_length, drop_last, pad_to_multiple,
                         collate_fn=collate_grouped)

    def unit_lengths(self, length_fn) -> list[int]:
        """Per prompt: its longest row."""
        return [max(length_fn(self.examples[i]) for i in group) for group in self.groups]

    def unit_examples(self, units: list[int]) -> list[int]:
        """Each prompt's pairs together, in data order."""
        return [i for prompt in units for i in self.groups[prompt]]

    @staticmethod
    def shares(examples, world_size: int) -> list[list]:
        """One global batch's examples cut into world_size contiguous shares of whole prompts (for torchrun,
        spl/distributed.share_batches): ceil(P / world_size) prompts each, the last shares possibly empty."""
        groups = [[examples[i] for i in group] for group in prompt_groups(examples)]
        per_process = -(-len(groups) // world_size)
        return [[e for group in groups[rank * per_process:(rank + 1) * per_process] for e in group]
                for rank in range(world_size)]


def epochs_to_steps(examples, epochs: float, per_step: int, grouped: bool) -> int:
    """--epochs as optimizer steps: passes over the pairs (or, grouped, the prompts), per_step of them a step."""
    units = len(prompt_groups(examples)) if grouped else len(examples)
    return max(1, math.ceil(epochs * units / per_step))
