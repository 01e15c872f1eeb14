"""The forms preference (and SFT) data comes in, read as rows: [(line or row, JSON value), ...] per file.

What `data` may be (read_sources; read_rows reads one file or datasets directory):
  a .jsonl / .json file      detected by content: a first non-blank `[` is a JSON array, anything else is JSON
                             Lines (blank lines ignored); errors name the 1-based line a record starts on
  a .jsonl.gz / .json.gz     the same, gunzipped in memory (gzip is in the standard library): HH-RLHF's train.jsonl.gz
  a .parquet file            read with pyarrow (optional: without it, one line says `pip install pyarrow`); errors
                             name the 0-based row, `file.parquet:row 12: ...`, the index `table[12]` has; a null
                             column value counts as an absent field
  a datasets directory       written by `datasets.Dataset(Dict).save_to_disk` (optional: `pip install datasets`);
                             a DatasetDict needs `split` (`--data-split`) unless it has one split; `dir[train]:row 12`
  a directory of data files  as a dataset repository is downloaded: `train.jsonl.gz`, `data/test_prefs-00000-of-
                             00001.parquet`, ...; the split is the file name up to its first "-" or suffix, and a
                             split stored as shards (`train-00000-of-00003.parquet`, ...) is read as one, in name
                             order; the repository's subsets, one folder each (HH-RLHF's `helpful-base/`,
                             `harmless-base/`, ...), are all read, or those named in `subsets` (--data-subsets)
  several of these           a list of paths, or a glob (`data/*.jsonl`), read one after another (a glob in name order)
  records in memory          a list of dicts (one per record), or a `datasets.Dataset` (anything with .to_list())

Several files read as one give the records, skip counts and DataSummary.sha256 of one file holding them all in
that order; a record's location in a message is then `file:line` (`file:row 3`).

Bad input (missing file, empty file, non-UTF-8 bytes, malformed JSON) raises DataError, whose message is the one
line `path:line: problem` (for a JSON array, the line on which the element starts; `path: problem` where no line
applies: a missing or empty file). What a row must hold is data/preferences.py's (and data/sft.py's).
"""
from __future__ import annotations

import glob
import gzip
import io
import hashlib
import importlib
import json
import os
import re
import zlib

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


def read_sources(data, split: str | None = None,
                 subsets: list[str] | None = None) -> list[tuple[str, str, list[tuple[int, object]]]]:
    """[(name for messages, "line" or "row", [(line or row, value), ...]), ...]: one per file of `data`, any form
    in the module docstring (records in memory are one source)."""
    if hasattr(data, "to_list") and hasattr(data, "column_names"):  # a datasets.Dataset, duck-typed (no import)
        data = data.to_list()
    if isinstance(data, (list, tuple)) and data and all(isinstance(item, dict) for item in data):
        return [("<records>", "row", [(number, _present(row)) for number, row in enumerate(data)])]
    if isinstance(data, (list, tuple)):
        if not data:
            raise DataError("<records>", None, "no records (an empty list)")
        if len(data) > 1 and split is not None:
            raise DataError(os.fspath(data[0]), None, f"--data-split {split!r} with several paths: give the "
                                                      f"split's files, or one dataset directory")
        return [source for item in data for source in read_sources(item, split, subsets)]
    path = os.fspath(data)
    if not os.path.exists(path) and glob.has_magic(path):
        matches = sorted(glob.glob(path))
        if not matches:
            raise DataError(path, None, "no file matches this pattern")
        return read_sources(matches, split, subsets)
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json")):
            return [_dataset_rows(path, split)]
        return [read_rows(file) for file in _split_files(path, split, subsets)]
    if subsets is not None:
        raise DataError(path, None, "--data-subsets names folders of a dataset repository, but this is one file")
    return [read_rows(path, split)]


def read_rows(path, split: str | None = None) -> tuple[str, str, list[tuple[int, object]]]:
    """(name for messages, "line" or "row", [(line or row, value), ...]) of one file or datasets directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if any(os.path.isfile(os.path.join(path, name)) for name in ("dataset_dict.json", "state.json")):
            return _dataset_rows(path, split)
        files = _split_files(path, split, None)
        if len(files) > 1:
            raise DataError(path, None, f"is {len(files)} files: read it with read_sources or read_preferences")
        return read_rows(files[0], None)
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


def _data_files(folder: str) -> dict[str, list[str]]:
    """{split: [path, ...]} of the data files in `folder` and its data/ folder, in name order."""
    files = {}
    for place in (folder, os.path.join(folder, "data")):
        for name in sorted(os.listdir(place)) if os.path.isdir(place) else []:
            suffix = next((s for s in DATA_SUFFIXES if name.endswith(s)), None)
            if suffix and os.path.isfile(os.path.join(place, name)):
                files.setdefault(name[:-len(suffix)].split("-")[0], []).append(os.path.join(place, name))
    return files


def _split_files(directory: str, split: str | None, subsets: list[str] | None) -> list[str]:
    """The data files of `split` in a downloaded dataset repository: its own (and data/'s), shards included, and
    those of its subsets, the folders beside them that hold data files (all, or those named in `subsets`)."""
    found = {name: _data_files(os.path.join(directory, name)) for name in sorted(os.listdir(directory))
             if os.path.isdir(os.path.join(directory, name)) and name != "data"}
    found = {name: files for name, files in found.items() if files}  # the subsets
    if subsets is not None:
        unknown = [name for name in subsets if name not in found]
        if unknown:
            raise DataError(directory, None, f"has no subset {unknown[0]!r} (its subsets: "
                                             f"{', '.join(found) or 'none'})")
        found = {name: found[name] for name in subsets}
    files = {}  # split -> [path, ...]: the repository's own files, then each subset's
    for part in ([] if subsets is not None else [_data_files(directory)]) + list(found.values()):
        for name, paths in part.items():
            files.setdefault(name, []).extend(paths)
    if not files:
        raise DataError(directory, None, f"is a directory with no data files ({', '.join(DATA_SUFFIXES)}) and "
                                         f"not a datasets.save_to_disk directory")
    if split is None:
        if len(files) != 1:
            raise DataError(directory, None, f"has splits {', '.join(files)}: choose one with --data-split")
        split = next(iter(files))
    if split not in files:
        raise DataError(directory, None, f"has no split {split!r} (its splits: {', '.join(files)})")
    return files[split]


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
