"""Chat-format tokenisation of preference pairs, truncation in token space, and PreferenceExample.

A pair becomes three id lists built separately with the tokenizer's chat format (models/tokenizer.py):

    prompt_ids   = BOS + enc("[INST] ... [/INST]") (+ earlier turns)      Tokenizer.encode_prompt
    chosen_ids   = enc(chosen) + EOS                                      Tokenizer.encode_response
    rejected_ids = enc(rejected) + EOS

so prompt_ids is an exact token prefix of both sequences: no string slicing, no re-encoding, and exactly
one EOS (a literal "</s>" in the text is encoded as characters, never as the EOS id).

Truncation, in this order (as in eric-mitchell's DPO `tokenize_batch_element`, but always applied):
  1. a prompt longer than max_prompt_length keeps BOS and its last max_prompt_length - 1 tokens: the
     latest turn matters most, and the model has only ever seen BOS at position 0;
  2. each response is cut to its first max_length - len(prompt_ids) tokens. A cut response loses its EOS:
     it did not end there, and an EOS would teach the policy to stop mid-sentence;
  3. a pair whose prompt leaves no room for a response, or whose responses are identical once cut, is
     skipped and counted in the DataSummary.
"""
from __future__ import annotations

import dataclasses

from data.preferences import DataSummary, PreferenceRecord, read_preferences


@dataclasses.dataclass
class PreferenceExample:
    """A tokenised pair. chosen_ids / rejected_ids end with exactly one EOS unless truncated (then none).

    index is the pair's position in the list it belongs to: it comes back as `pair_index` in a batch and
    selects the pair's row in the reference-log-prob cache. It is keyword-only and required.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_prob: float = 1.0  # P(chosen preferred); 1.0 is a hard label
    _: dataclasses.KW_ONLY
    index: int

    def __post_init__(self):
        if not self.prompt_ids or not self.chosen_ids or not self.rejected_ids:
            raise ValueError(f"PreferenceExample {self.index}: prompt, chosen and rejected ids must be non-empty")
        if not 0.0 <= self.chosen_prob <= 1.0:
            raise ValueError(f"PreferenceExample {self.index}: chosen_prob must be in [0, 1], got {self.chosen_prob}")


def truncate_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int],
                  max_length: int, max_prompt_length: int) -> tuple[list[int], list[int], list[int]]:
    """Steps 1-2 of the module docstring. prompt_ids[0] is BOS and is kept; may return empty responses."""
    check_lengths(max_length, max_prompt_length)
    if len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[:1] + prompt_ids[len(prompt_ids) - (max_prompt_length - 1):]  # BOS + the end
    budget = max_length - len(prompt_ids)
    return prompt_ids, chosen_ids[:budget], rejected_ids[:budget]


def check_lengths(max_length: int, max_prompt_length: int) -> None:
    if not (isinstance(max_length, int) and isinstance(max_prompt_length, int)
            and 2 <= max_prompt_length <= max_length):
        raise ValueError(f"need 2 <= max_prompt_length <= max_length, got max_prompt_length={max_prompt_length}, "
                         f"max_length={max_length}")


def tokenize_records(records: list[PreferenceRecord], tokenizer, max_length: int, max_prompt_length: int,
                     summary: DataSummary) -> list[PreferenceExample]:
    """Records -> PreferenceExamples numbered 0..N-1; every skip and truncation is counted in `summary`."""
    check_lengths(max_length, max_prompt_length)
    examples = []
    for record in records:
        prompt_ids = tokenizer.encode_prompt(record.prompt)
        chosen_ids = tokenizer.encode_response(record.chosen)  # enc(chosen) + EOS
        rejected_ids = tokenizer.encode_response(record.rejected)  # enc(rejected) + EOS
        prompt, chosen, rejected = truncate_pair(prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length)
        if not chosen or not rejected:
            summary.skip(f"prompt fills max_length={max_length}, no room for a response", record.line)
            continue
        if chosen == rejected:
            summary.skip(f"chosen and rejected are identical once cut to max_length={max_length}", record.line)
            continue
        if len(prompt) < len(prompt_ids):
            summary.count_truncation(f"prompts cut to max_prompt_length={max_prompt_length} (kept their end)")
        for kept, whole in ((chosen, chosen_ids), (rejected, rejected_ids)):
            if len(kept) < len(whole):
                summary.count_truncation(f"responses cut to fit max_length={max_length} (kept their start)")
        examples.append(PreferenceExample(prompt, chosen, rejected, record.chosen_prob, index=len(examples)))
    summary.num_kept = len(examples)
    return examples


def load_preference_data(path, tokenizer, max_length: int, max_prompt_length: int,
                         column_map: dict | None = None) -> tuple[list[PreferenceExample], DataSummary]:
    """Read, validate and tokenise a preference file. Raises DataError on bad input; print(summary.format())."""
    check_lengths(max_length, max_prompt_length)
    records, summary = read_preferences(path, column_map)
    examples = tokenize_records(records, tokenizer, max_length, max_prompt_length, summary)
    return examples, summary
