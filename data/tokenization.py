"""Chat-format tokenisation of preference pairs, truncation in token space, and PreferenceExample.

A pair becomes three id lists built separately with the tokenizer's chat format (models/chat_format.py):

    prompt_ids   = BOS + the conversation up to the generation prompt      Tokenizer.encode_prompt
                   (mistral-v1: BOS + enc("[INST] ... [/INST]"), earlier turns included)
    chosen_ids   = ids(chosen) + end of turn (EOS; <|im_end|> in ChatML)   Tokenizer.encode_response
    rejected_ids = ids(rejected) + end of turn

so prompt_ids is an exact token prefix of both sequences: no string slicing, no re-encoding, and exactly
one end-of-turn id (a literal "</s>" in the text is encoded as characters, never as the EOS id). A conversation
the chat format refuses (an empty earlier assistant turn, say), or an id the model's embedding does not have
(`vocab_size`), is a DataError naming the record's line.

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

from data.preferences import DataError, DataSummary, PreferenceRecord, read_preferences
from models.chat_format import ChatFormatError


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


class ContextError(ValueError):
    """A length past the model's context (check_context); str(error) is one line, a usage error of the scripts."""


def check_context(length: int, positions: int, what: str, model) -> None:
    """The one length rule of train.py and sample.py: a sequence of `length` tokens (what --max-length allows, a
    prompt plus --max-new-tokens) must fit the model's max_position_embeddings, positions it was never trained at
    (HF transformers warns and degrades past them): refused in one line, never truncated silently."""
    if length > positions:
        raise ContextError(f"{what} {length}: longer than the max_position_embeddings {positions} of the model in "
                           f"{model}; give at most {positions} tokens")


def tokenize_records(records: list[PreferenceRecord], tokenizer, max_length: int, max_prompt_length: int,
                     summary: DataSummary, vocab_size: int | None = None) -> list[PreferenceExample]:
    """Records -> PreferenceExamples numbered 0..N-1; every skip and truncation is counted in `summary`.

    `vocab_size` (the model's embedding rows), when given, bounds every id: one at or above it is a DataError.
    """
    check_lengths(max_length, max_prompt_length)
    examples = []
    for record in records:
        prompt_ids, chosen_ids, rejected_ids = encode_record(record, tokenizer, summary, vocab_size)
        prompt, chosen, rejected = truncate_pair(prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length)
        if not chosen or not rejected:
            summary.skip(f"prompt fills max_length={max_length}, no room for a response", record.location)
            continue
        if chosen == rejected:
            summary.skip(f"chosen and rejected are identical once cut to max_length={max_length}", record.location)
            continue
        if len(prompt) < len(prompt_ids):
            summary.count_truncation(f"prompts cut to max_prompt_length={max_prompt_length} (kept their end)")
        for kept, whole in ((chosen, chosen_ids), (rejected, rejected_ids)):
            if len(kept) < len(whole):
                summary.count_truncation(f"responses cut to fit max_length={max_length} (kept their start)")
        examples.append(PreferenceExample(prompt, chosen, rejected, record.chosen_prob, index=len(examples)))
    summary.num_kept = len(examples)
    return examples


def encode_record(record: PreferenceRecord, tokenizer, summary: DataSummary,
                  vocab_size: int | None = None) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) of one record, or a DataError at its line."""
    path = record.source or summary.path  # the record's own file when the data is several
    try:
        ids = (tokenizer.encode_prompt(record.prompt),
               tokenizer.encode_response(record.chosen),  # ids(chosen) + end of turn
               tokenizer.encode_response(record.rejected))  # ids(rejected) + end of turn
    except ChatFormatError as error:
        raise DataError(path, record.line, f"chat format {tokenizer.chat_format}: {error}", summary.where) from None
    if vocab_size is not None:
        for name, part in zip(("prompt", "chosen", "rejected"), ids):
            outside = [token for token in part if not 0 <= token < vocab_size]
            if outside:
                raise DataError(path, record.line, f"{name} token id {outside[0]} is outside the model's "
                                                   f"embedding (vocab_size {vocab_size})", summary.where)
    return ids


def load_preference_data(path, tokenizer, max_length: int, max_prompt_length: int, column_map: dict | None = None,
                         split: str | None = None, vocab_size: int | None = None,
                         subsets: list[str] | None = None) -> tuple[list[PreferenceExample], DataSummary]:
    """Read, validate and tokenise preference data (any form data/sources.py reads, one or several; `split` for a
    dataset with splits, `subsets` for some of a repository's). Raises DataError on bad input;
    print(summary.format())."""
    check_lengths(max_length, max_prompt_length)
    records, summary = read_preferences(path, column_map, split, subsets)
    examples = tokenize_records(records, tokenizer, max_length, max_prompt_length, summary, vocab_size)
    return examples, summary
