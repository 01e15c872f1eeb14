"""Supervised fine-tuning data: chat records -> token sequences whose loss covers the response and its EOS.

Accepted records (JSON Lines or a JSON array, read with the same checks and line-numbered errors as preference
data): `{"prompt": str | messages, "response": str}` or `{"messages": [..., {"role": "assistant", ...}]}`.
The prompt goes through the tokenizer's chat format and the response is encoded separately and ends with one
EOS, so the prompt is an exact token prefix, as for preference pairs. Truncation is the same too: a prompt
longer than max_prompt_length keeps BOS and its end; the response is cut to fit max_length.

The SFT loss is the mean negative log-likelihood per response token (spl/step.py `sft_step`). This is how the
embedded world's reference model is trained (`train.py --loss sft`).
"""
from __future__ import annotations

import dataclasses
import os

import torch

from data.batching import PreferenceBatches, pad_rows
from data.preferences import DataError, DataSummary, _messages, check_text, parse_prompt
from data.sources import _read_json_values
from data.tokenization import check_lengths, truncate_pair


@dataclasses.dataclass
class SequenceExample:
    prompt_ids: list[int]
    response_ids: list[int]  # ends with EOS unless truncated
    index: int


def _record(value, columns: dict, path: str, line: int) -> tuple[list[dict], str]:
    def fail(problem):
        raise DataError(path, line, problem)

    if not isinstance(value, dict):
        fail(f"expected a JSON object, got {type(value).__name__}")
    if "messages" in value and columns["prompt"] not in value:
        messages = _messages(value["messages"], "messages", fail)
        if not messages or messages[-1]["role"] != "assistant":
            fail('"messages" must end with an assistant turn (the response to train on)')
        check_text([m["content"] for m in messages], fail)
        return messages[:-1], messages[-1]["content"]
    for key in (columns["prompt"], columns["response"]):
        if key not in value:
            fail(f'missing field "{key}"')
    prompt = parse_prompt(value[columns["prompt"]], columns["prompt"], fail)
    response = value[columns["response"]]
    if not isinstance(response, str):
        fail(f'field "{columns["response"]}" must be a string, got {type(response).__name__}')
    check_text([m["content"] for m in prompt] + [response], fail)
    return prompt, response


def load_sft_data(path, tokenizer, max_length: int, max_prompt_length: int,
                  column_map: dict | None = None) -> tuple[list[SequenceExample], DataSummary]:
    """Read, validate and tokenise an SFT file. Raises DataError on bad input; empty responses are skipped
    and counted in the summary."""
    check_lengths(max_length, max_prompt_length)
    columns = {"prompt": "prompt", "response": "response", **(column_map or {})}
    path = os.fspath(path)
    values, sha256 = _read_json_values(path)
    summary = DataSummary(path=path, sha256=sha256, unit="records")
    examples = []
    for line, value in values:
        summary.num_read += 1
        prompt, response = _record(value, columns, path, line)
        if not response.strip():
            summary.skip("empty response", line)
            continue
        prompt_ids = tokenizer.encode_prompt(prompt)
        response_ids = tokenizer.encode_response(response)  # enc(response) + EOS
        kept_prompt, kept_response, _ = truncate_pair(prompt_ids, response_ids, [], max_length, max_prompt_length)
        if len(kept_prompt) < len(prompt_ids):
            summary.count_truncation(f"prompts cut to max_prompt_length={max_prompt_length} (kept their end)")
        if len(kept_response) < len(response_ids):
            summary.count_truncation(f"responses cut to fit max_length={max_length} (kept their start)")
        prompt_ids, response_ids = kept_prompt, kept_response
        examples.append(SequenceExample(prompt_ids, response_ids, index=len(examples)))
    summary.num_kept = len(examples)
    return examples, summary


def collate_sequences(examples: list[SequenceExample], pad_id: int, pad_to_multiple: int = 1) -> dict:
    """B sequences -> input_ids, targets (shifted left), loss_mask (response tokens and EOS as targets),
    attention_mask, each [B, T], right-padded; the same conventions as `data.batching.collate`."""
    rows = [e.prompt_ids + e.response_ids for e in examples]
    input_ids, targets, loss_mask, attention_mask = pad_rows(rows, [len(e.prompt_ids) for e in examples], pad_id,
                                                             pad_to_multiple)  # [B, T]
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask, "attention_mask": attention_mask,
            "index": torch.tensor([e.index for e in examples])}


class SequenceBatches(PreferenceBatches):
    """The same seeded, resumable batch order as preference pairs, over single sequences."""

    def __init__(self, examples, batch_size: int, pad_id: int, seed: int = 0, group_by_length: bool = False,
                 drop_last: bool = False, pad_to_multiple: int = 1):
        super().__init__(examples, batch_size, pad_id, seed, group_by_length, drop_last, pad_to_multiple,
                         collate_fn=collate_sequences,
                         length_fn=lambda e: len(e.prompt_ids) + len(e.response_ids))
