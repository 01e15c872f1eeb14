"""Preference-data readers: local data as downloaded -> PreferenceRecords (chat prompt, chosen, rejected).

What `path` may be (read_rows):
  a .jsonl / .json file      detected by content: a first non-blank `[` is a JSON array, anything else is JSON
                             Lines (blank lines ignored); errors name the 1-based line a record starts on
  a .jsonl.gz / .json.gz     the same, gunzipped in memory (gzip is in the standard library): HH-RLHF's train.jsonl.gz
  a .parquet file            read with pyarrow (optional: without it, one line says `pip install pyarrow`); errors
                             name the 0-based row, `file.parquet:row 12: ...`, the index `table[12]` has; a null
                             column value counts as an absent field
  a datasets directory       written by `datasets.Dataset(Dict).save_to_disk` (optional: `pip install datasets`);
                             a DatasetDict needs `split` (`--data-split`) unless it has one split; `dir[train]:row 12`
  a directory of data files  as a dataset repository is downloaded: `train.jsonl.gz`, `data/test_prefs-00000-of-
                             00001.parquet`, ...; the split is the file name up to its first "-" or suffix

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
import gzip
import hashlib
import importlib
import io
import json
import os
import re
import zlib

from models.chat_format import ChatFormatError, normalize_messages
from models.fields import lone_surrogate, show

COLUMNS = ("prompt", "chosen", "rejected", "chosen_prob")
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
DATA_SUFFIXES = JSON_SUFFIXES + (".parquet",)


class DataError(ValueError):
    """Bad input data. str(error) is one line, `path:line: problem` (`path:row N: problem` for Parquet and
    datasets rows), fit to print before exiting 1."""

    def __init__(self, path: str, line: int | None, problem: str, where: str = "line"):
        self.path, self.line, self.problem = path, line, problem
        location = f"{path}:{line}" if where == "line" else f"{path}:{where} {line}"
        super().__init__(f"{location}: {problem}" if line is not None else f"{path}: {problem}")


class UnusablePair(Exception):
    """A well-formed record that cannot be trained on; str(error) is the skip reason counted in DataSummary."""


@dataclasses.dataclass
class PreferenceRecord:
    prompt: list[dict]  # chat messages: [system?] user (assistant user)*, ending with a user turn
    chosen: str  # the preferred assistant reply
    rejected: str  # the dispreferred assistant reply
    chosen_prob: float = 1.0  # P(chosen preferred); 1.0 is a hard label
    line: int = 0  # line where the record starts in its file (its row, for Parquet and datasets)


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

    def skip(self, reason: str, line: int) -> None:
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


def read_preferences(path, column_map: dict | None = None,
                     split: str | None = None) -> tuple[list[PreferenceRecord], DataSummary]:
    """Read every record of `path` (any form in the module docstring); DataError on bad input, count unusable pairs."""
    columns = _columns(column_map)
    name, where, values = read_rows(path, split)
    summary = DataSummary(path=name, sha256="", where=where)
    records = []
    for line, value in values:
        summary.num_read += 1
        try:
            record = parse_record(value, columns, name, line, where)
        except UnusablePair as unusable:
            summary.skip(str(unusable), line)
            continue
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


# ---- the forms data comes in -----------------------------------------------------------------------------------

def read_rows(path, split: str | None = None) -> tuple[str, str, list[tuple[int, object]]]:
    """(name for messages, "line" or "row", [(line or row, value), ...]) of any form in the module docstring."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json")):
            return _dataset_rows(path, split)
        return read_rows(_split_file(path, split), None)
    if split is not None:
        raise DataError(path, None, f"--data-split {split!r} names a split, but this is one file (give the "
                                    f"directory that holds the split files, or leave out --data-split)")
    if path.endswith(".parquet"):
        return path, "row", _parquet_rows(path)
    values, _ = _read_json_values(path)
    return path, "line", values


def _optional(module: str, package: str, path: str, purpose: str):
    """Import an optional package, or a one-line DataError saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(path, None, f"{purpose} needs the optional package {package}: pip install {package}") from None


def _present(row: dict) -> dict:
    """A table row as a JSON object: a null column is a field the record does not have (Parquet holds one schema
    for all rows, so a field some records lack is null in the others)."""
    return {key: value for key, value in row.items() if value is not None}


def _parquet_rows(path: str) -> list[tuple[int, object]]:
    parquet = _optional("pyarrow.parquet", "pyarrow", path, "reading Parquet")
    if not os.path.isfile(path):
        raise DataError(path, None, "no such file")
    try:
        rows = parquet.read_table(path).to_pylist()
    except Exception as error:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
        raise DataError(path, None, f"not a readable Parquet file ({type(error).__name__}: "
                                    f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if not rows:
        raise DataError(path, None, "Parquet file has no rows (no preference pairs)")
    return [(number, _present(row)) for number, row in enumerate(rows)]


def _dataset_rows(path: str, split: str | None) -> tuple[str, str, list[tuple[int, object]]]:
    datasets = _optional("datasets", "datasets", path, "reading a datasets.save_to_disk directory")
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as error:  # datasets raises FileNotFoundError, ValueError, ... for a damaged directory
        raise DataError(path, None, f"not a readable datasets directory ({type(error).__name__}: "
                                    f"{str(error).splitlines()[0] if str(error) else ''})") from None
    name = path
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        if split is None and len(splits) != 1:
            raise DataError(path, None, f"has splits {', '.join(splits)}: choose one with --data-split")
        split = splits[0] if split is None else split
        if split not in loaded:
            raise DataError(path, None, f"has no split {split!r} (its splits: {', '.join(splits)})")
        loaded, name = loaded[split], f"{path}[{split}]"
    elif split is not None:
        raise DataError(path, None, f"--data-split {split!r}: this dataset has no splits (a Dataset, not a "
                                    f"DatasetDict)")
    rows = loaded.to_list()
    if not rows:
        raise DataError(name, None, "dataset has no rows (no preference pairs)")
    return name, "row", [(number, _present(row)) for number, row in enumerate(rows)]


def _split_file(directory: str, split: str | None) -> str:
    """The one data file of `split` in a downloaded dataset directory (or its data/ folder)."""
    files = {}  # split -> [path, ...]
    for folder in (directory, os.path.join(directory, "data")):
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            suffix = next((s for s in DATA_SUFFIXES if name.endswith(s)), None)
            if suffix and os.path.isfile(os.path.join(folder, name)):
                files.setdefault(name[:-len(suffix)].split("-")[0], []).append(os.path.join(folder, name))
    if not files:
        raise DataError(directory, None, f"is a directory with no data files ({', '.join(DATA_SUFFIXES)}) and "
                                         f"not a datasets.save_to_disk directory")
    if split is None:
        if len(files) != 1:
            raise DataError(directory, None, f"has splits {', '.join(files)}: choose one with --data-split")
        split = next(iter(files))
    if split not in files:
        raise DataError(directory, None, f"has no split {split!r} (its splits: {', '.join(files)})")
    if len(files[split]) > 1:
        raise DataError(directory, None, f"split {split!r} is {len(files[split])} files; pass one of them as "
                                         f"--data ({', '.join(os.path.basename(f) for f in files[split][:3])}, ...)")
    return files[split][0]


def _read_json_values(path: str) -> tuple[list[tuple[int, object]], str]:
    """The JSON values of a .jsonl / .json file (gzipped when it ends in .gz), each with the line it starts on;
    and the sha256 of the file's bytes."""
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        raise DataError(path, None, "no such file") from None
    except IsADirectoryError:
        raise DataError(path, None, "is a directory, expected a .jsonl or .json file") from None
    sha256 = hashlib.sha256(raw).hexdigest()
    if path.endswith(".gz"):
        raw = _gunzip(raw, path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(path, line, f"not valid UTF-8 (byte 0x{raw[error.start]:02x} at column {column})") from None
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not content
    if not text.strip():
        raise DataError(path, None, "file is empty (no preference pairs)")
    values = _json_array(text, path) if text.lstrip().startswith("[") else _json_lines(text, path)
    if not values:
        raise DataError(path, None, "JSON array is empty (no preference pairs)")
    return values, sha256


def _gunzip(raw: bytes, path: str) -> bytes:
    """A .gz file's bytes, at most 1 GiB (or $SPL_MAX_DECOMPRESSED_BYTES): 300 KB can expand to gigabytes."""
    limit = int(os.environ.get("SPL_MAX_DECOMPRESSED_BYTES", 1 << 30))
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as file:
            data = file.read(limit + 1)
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(path, None, f"not a valid gzip file ({error or type(error).__name__})") from None
    if len(data) > limit:
        raise DataError(path, None, f"decompresses to more than {limit} bytes (the limit; a larger file: set "
                                    f"SPL_MAX_DECOMPRESSED_BYTES, or decompress it and give the .jsonl)")
    return data


def _json_lines(text: str, path: str) -> list[tuple[int, object]]:
    values = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold \u2028
        if not line.strip():
            continue
        try:
            values.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            problem = f"malformed JSON: {error.msg} (column {error.colno})"
            if number == 1 and _is_one_json_object(text):
                problem = "the file is one JSON object; expected JSON Lines (one object per line) or a JSON array"
            raise DataError(path, number, problem) from None
        except (RecursionError, ValueError) as error:  # [[[[...]]]] a million deep; an int of over 4300 digits
            raise DataError(path, number, "malformed JSON: " + ("nested too deeply to parse" if isinstance(
                error, RecursionError) else str(error).splitlines()[0][:80])) from None
    return values


def _is_one_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (json.JSONDecodeError, RecursionError):
        return False


def _json_array(text: str, path: str) -> list[tuple[int, object]]:
    """Parse a top-level JSON array element by element, to know the line on which each element starts."""
    decoder = json.JSONDecoder()
    values = []
    position = _JSON_WHITESPACE.match(text, text.index("[") + 1).end()
    line, counted_to = 1, 0  # line number of `position`, counted incrementally (files can be large)

    def line_at(offset):
        nonlocal line, counted_to
        line += text.count("\n", counted_to, offset)
        counted_to = offset
        return line

    if text.startswith("]", position):
        position += 1
    else:
        while True:
            start_line = line_at(position)
            try:
                value, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError as error:
                raise DataError(path, error.lineno, f"malformed JSON in array element {len(values)}: "
                                                    f"{error.msg} (column {error.colno})") from None
            except (RecursionError, ValueError) as error:  # too deep; an integer literal of over 4300 digits
                raise DataError(path, start_line, f"malformed JSON: array element {len(values)} " + (
                    "is nested too deeply to parse" if isinstance(error, RecursionError) else
                    f"holds {str(error).splitlines()[0][:80]}")) from None
            values.append((start_line, value))
            position = _JSON_WHITESPACE.match(text, position).end()
            if text.startswith(",", position):
                position = _JSON_WHITESPACE.match(text, position + 1).end()
                continue
            if text.startswith("]", position):
                position += 1
                break
            raise DataError(path, line_at(position),
                            f"malformed JSON: expected ',' or ']' after array element {len(values) - 1}")
    if text[position:].strip():
        raise DataError(path, line_at(position), "malformed JSON: extra data after the array's closing ']'")
    return values
