"""Preference-data readers: local data as downloaded -> PreferenceRecords (chat prompt, chosen, rejected).

What `path` may be (a file, a dataset directory or repository, shards, several files, records in memory) is
data/sources.py's: it reads them all as rows, and DataError is its.

Each record, whatever the file, is in one of the layouts users actually have:

  standard        {"prompt": str, "chosen": str, "rejected": str}                           (TRL)
  conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages], ...}
                  chosen / rejected are the assistant message list, or the whole conversation, prompt
                  included (UltraFeedback-binarized; its "prompt" may then be the user's string); extra keys
                  such as score_chosen, score_rejected, messages are ignored; with no "prompt", two whole
                  conversations that share every turn before the reply
  HH-RLHF         {"chosen": str, "rejected": str}: whole transcripts with "\\n\\nHuman:" / "\\n\\nAssistant:"
                  markers; the prompt is everything up to and including the last "\\n\\nAssistant:" the two share

plus an optional "chosen_prob" in [0, 1] (soft label: the fraction of raters preferring chosen; default 1).
`column_map` renames fields, e.g. {"prompt": "question", "chosen": "good", "rejected": "bad"}.

Bad input (missing file, empty file, non-UTF-8 bytes, malformed JSON, missing field, wrong type) raises
DataError, whose message is the one line `path:line: problem` (for a JSON array, the line on which the
element starts; `path: problem` where no line applies: a missing or empty file). Valid but unusable pairs
(identical or empty responses, empty prompt, an HH transcript that is not a chat) are skipped and counted
in a DataSummary, whose format() says what was skipped, why and where. The same records give the same records,
skips and DataSummary.sha256 (a hash of the records' content, not of the file's bytes) in every file format.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

from data.sources import DataError, read_sources
from models.chat_format import ChatFormatError, normalize_messages
from models.fields import lone_surrogate, show

COLUMNS = ("prompt", "chosen", "rejected", "chosen_prob")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")


class UnusablePair(Exception):
    """A well-formed record that cannot be trained on; str(error) is the skip reason counted in DataSummary."""


@dataclasses.dataclass
class PreferenceRecord:
    prompt: list[dict]  # chat messages: [system?] user (assistant user)*, ending with a user turn
    chosen: str  # the preferred assistant reply
    rejected: str  # the dispreferred assistant reply
    chosen_prob: float = 1.0  # P(chosen preferred); 1.0 is a hard label
    line: int = 0  # line where the record starts in its file (its row, for Parquet and datasets)
    source: str | None = None  # its file, when the data is several files (None: DataSummary.path)

    @property
    def location(self) -> int | str:
        """Where the record is, for a skip count: its line, or `file:line` when the data is several files."""
        return self.line if self.source is None else f"{os.path.basename(self.source)}:{self.line}"


@dataclasses.dataclass
class DataSummary:
    """What happened to every record of one file: kept, or skipped with a reason and its line numbers."""

    path: str
    sha256: str  # of the records read (records_sha256): the dataset's content hash for the reference cache
    num_read: int = 0
    num_kept: int = 0
    skipped: dict = dataclasses.field(default_factory=dict)  # reason -> [line, ...]
    truncated: dict = dataclasses.field(default_factory=dict)  # what was truncated -> count
    unit: str = "pairs"  # what one record is, for the printed summary ("records" for SFT data)
    where: str = "line"  # what locates a record: a file's "line", a table's "row"

    def skip(self, reason: str, line: int | str) -> None:
        self.skipped.setdefault(reason, []).append(line)

    def count_truncation(self, what: str) -> None:
        self.truncated[what] = self.truncated.get(what, 0) + 1

    @property
    def num_skipped(self) -> int:
        return sum(len(lines) for lines in self.skipped.values())

    def format(self) -> str:
        """One header line, then one line per skip reason and per kind of truncation."""
        out = [f"{self.path}: read {self.num_read} {self.unit}, kept {self.num_kept}, skipped {self.num_skipped}"]
        for reason, lines in self.skipped.items():
            shown = ", ".join(str(line) for line in lines[:8]) + (", ..." if len(lines) > 8 else "")
            out.append(f"  skipped {len(lines)}: {reason} ({self.where} {shown})")
        for what, count in self.truncated.items():
            out.append(f"  truncated {count}: {what}")
        return "\n".join(out)


def read_preferences(path, column_map: dict | None = None, split: str | None = None,
                     subsets: list[str] | None = None) -> tuple[list[PreferenceRecord], DataSummary]:
    """Read every record of `path` (any form in the module docstring, one or several); DataError on bad input,
    count unusable pairs."""
    columns = _columns(column_map)
    sources = read_sources(path, split, subsets)
    several = len(sources) > 1
    name = sources[0][0] if not several else f"{sources[0][0]} (+ {len(sources) - 1} more)"
    summary = DataSummary(path=name, sha256="", where=sources[0][1])
    records = []
    for source, where, values in sources:
        for line, value in values:
            summary.num_read += 1
            try:
                record = parse_record(value, columns, source, line, where)
            except UnusablePair as unusable:
                summary.skip(str(unusable), f"{os.path.basename(source)}:{line}" if several else line)
                continue
            record.source = source if several else None
            records.append(record)
    summary.num_kept = len(records)
    summary.sha256 = records_sha256(records)
    return records, summary


def records_sha256(records: list[PreferenceRecord]) -> str:
    """sha256 of the records' content (prompt messages, chosen, rejected, chosen_prob), in order: the same for the
    same records in a .jsonl, a .jsonl.gz, a Parquet file or a datasets directory; lines and rows are not part of it."""
    digest = hashlib.sha256()
    for record in records:
        content = [record.prompt, record.chosen, record.rejected, float(record.chosen_prob)]
        digest.update(json.dumps(content, ensure_ascii=False, sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def parse_record(value, columns: dict, path: str, line: int, where: str = "line") -> PreferenceRecord:
    """One JSON value -> a PreferenceRecord; DataError if malformed, UnusablePair if it cannot be trained on."""
    def fail(problem):
        raise DataError(path, line, problem, where)

    if not isinstance(value, dict):
        fail(f"expected a JSON object, got {_json_type(value)}")
    for name in ("chosen", "rejected"):
        if columns[name] not in value:
            fail(f'missing field "{columns[name]}"')
        if not isinstance(value[columns[name]], (str, list)):
            fail(f'field "{columns[name]}" must be a string or a list of messages, '
                 f"got {_json_type(value[columns[name]])}")
    chosen_value, rejected_value = value[columns["chosen"]], value[columns["rejected"]]

    if columns["prompt"] in value:
        prompt_value = value[columns["prompt"]]
        prompt = parse_prompt(prompt_value, columns["prompt"], fail)
        prefix_c, chosen = _split_reply(chosen_value, columns["chosen"], fail)
        prefix_r, rejected = _split_reply(rejected_value, columns["rejected"], fail)
        for prefix, name in ((prefix_c, columns["chosen"]), (prefix_r, columns["rejected"])):
            # A whole conversation must continue the prompt; a string prompt may be its last user turn only.
            if prefix and prefix != prompt and not (isinstance(prompt_value, str) and prefix[-1] == prompt[-1]):
                fail(f'field "{name}" is a conversation whose turns before the reply differ from "{columns["prompt"]}"')
        if prefix_c and prefix_r and prefix_c != prefix_r:
            fail(f'fields "{columns["chosen"]}" and "{columns["rejected"]}" continue different conversations')
        prompt = prefix_c or prefix_r or prompt
    elif isinstance(chosen_value, str) and isinstance(rejected_value, str):
        if ASSISTANT not in os.path.commonprefix([chosen_value, rejected_value]):
            fail(f'missing field "{columns["prompt"]}" ("{columns["chosen"]}" and "{columns["rejected"]}" are not '
                 f'HH-RLHF transcripts: they share no "\\n\\nAssistant:" turn)')
        prompt, chosen, rejected = split_hh_transcripts(chosen_value, rejected_value)
    elif isinstance(chosen_value, list) and isinstance(rejected_value, list):
        prefix_c, chosen = _split_reply(chosen_value, columns["chosen"], fail)
        prefix_r, rejected = _split_reply(rejected_value, columns["rejected"], fail)
        if not prefix_c or prefix_c != prefix_r:
            fail(f'missing field "{columns["prompt"]}" (and "{columns["chosen"]}" / "{columns["rejected"]}" '
                 f"are not two conversations that share every turn before the reply)")
        prompt = prefix_c
    else:
        fail(f'missing field "{columns["prompt"]}"')

    chosen_prob = 1.0
    if columns["chosen_prob"] in value:
        chosen_prob = value[columns["chosen_prob"]]
        if isinstance(chosen_prob, bool) or not isinstance(chosen_prob, (int, float)) \
                or not (chosen_prob in (0, 1) or (isinstance(chosen_prob, float) and 0.0 <= chosen_prob <= 1.0)):
            fail(f'field "{columns["chosen_prob"]}" must be a number in [0, 1], got {show(chosen_prob)}')
    check_text([m["content"] for m in prompt] + [chosen, rejected], fail)

    if not any(message["content"].strip() for message in prompt if message["role"] == "user"):
        raise UnusablePair("empty prompt")
    if not chosen.strip():
        raise UnusablePair("empty chosen response")
    if not rejected.strip():
        raise UnusablePair("empty rejected response")
    if chosen == rejected:
        raise UnusablePair("chosen and rejected responses are identical")
    return PreferenceRecord(prompt, chosen, rejected, float(chosen_prob), line)


def check_text(texts, fail) -> None:
    """Every string must be text that can be written out (models/fields.py lone_surrogate)."""
    for problem in filter(None, map(lone_surrogate, texts)):
        fail(problem)


def split_hh_transcripts(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """Two HH-RLHF transcripts -> (prompt messages, chosen reply, rejected reply); UnusablePair if not a chat.

    The prompt is everything up to and including the last "\\n\\nAssistant:" both transcripts share; its
    "\\n\\nHuman:" / "\\n\\nAssistant:" turns become user / assistant messages. Turn contents and the replies
    are stripped of surrounding whitespace: the space after "Assistant:" belongs to the marker, and the chat
    format gives every segment its own leading "▁" anyway.
    """
    common = os.path.commonprefix([chosen, rejected])
    if ASSISTANT not in common:
        raise ValueError('split_hh_transcripts: the transcripts share no "\\n\\nAssistant:" turn')
    cut = common.rfind(ASSISTANT) + len(ASSISTANT)
    chosen_reply, rejected_reply = chosen[cut:], rejected[cut:]
    if HUMAN in chosen_reply or HUMAN in rejected_reply or ASSISTANT in chosen_reply or ASSISTANT in rejected_reply:
        raise UnusablePair("HH-RLHF transcripts differ before their last turn")
    parts = _HH_MARKER.split(chosen[:cut])  # [text before the first marker, role, content, role, content, ...]
    if parts[0].strip():
        raise UnusablePair('HH-RLHF transcript does not start with "\\n\\nHuman:"')
    messages = [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
                for role, content in zip(parts[1::2], parts[2::2])]
    messages = messages[:-1]  # the final, empty "Assistant:" turn is the reply to come
    roles = [message["role"] for message in messages]
    if len(roles) % 2 == 0 or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise UnusablePair("HH-RLHF transcript turns do not alternate Human, Assistant")  # not a chat: skipped
    return messages, chosen_reply.strip(), rejected_reply.strip()


# ---- helpers ---------------------------------------------------------------------------------------------------

def _columns(column_map: dict | None) -> dict:
    columns = {name: name for name in COLUMNS}
    for name, key in (column_map or {}).items():
        if name not in COLUMNS:
            raise ValueError(f"column_map: unknown column {name!r} (expected some of {COLUMNS})")
        if not isinstance(key, str) or not key:
            raise ValueError(f"column_map[{name!r}] must be a non-empty field name, got {key!r}")
        columns[name] = key
    return columns


def parse_prompt(value, name: str, fail) -> list[dict]:
    """A prompt field as chat messages: a string is one user turn, a list must be chat messages (`_messages`);
    anything else calls `fail(problem)`. The one reader of a prompt field, for preference and SFT records."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return _messages(value, name, fail)
    fail(f'field "{name}" must be a string or a list of messages, got {_json_type(value)}')


def _json_type(value) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _messages(value: list, name: str, fail, alternate: bool = True) -> list[dict]:
    """Validate a JSON list of chat messages (roles alternate unless told otherwise), keeping role and content."""
    for position, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            fail(f'field "{name}" message {position}: expected an object with "role" and "content"')
        if not isinstance(message["content"], str):
            fail(f'field "{name}" message {position}: "content" must be a string, got {_json_type(message["content"])}')
    messages = [{"role": message["role"], "content": message["content"]} for message in value]
    if alternate:  # the chat formats' rules (mistral-common's): consecutive turns merge, an empty reply is refused
        try:
            normalize_messages(messages)
        except ChatFormatError as error:
            fail(f'field "{name}": {error}')
    return messages


def _split_reply(value, name: str, fail) -> tuple[list[dict], str]:
    """A reply as a string, [assistant message] or a whole conversation -> (turns before the reply, reply)."""
    if isinstance(value, str):
        return [], value
    if not value:
        fail(f'field "{name}" is an empty list of messages')
    if len(value) == 1:  # TRL's conversational layout: the assistant message alone
        messages = _messages(value, name, fail, alternate=False)
    else:  # UltraFeedback-binarized: the whole conversation, prompt included
        messages = _messages(value, name, fail)
    if messages[-1]["role"] != "assistant":
        fail(f'field "{name}": the last message must be the assistant\'s reply, got role {messages[-1]["role"]!r}')
    return messages[:-1], messages[-1]["content"]
