"""One checked reader for the fields of the JSON files a checkpoint holds (config.json, the shard index,
adapter_config.json, tokenizer_config.json): every value's type, range, finiteness and size is checked, and a
bad one named with its file and field, before anything is built from it.

    config = read_json_object(path, CheckpointError)              # one line for every way a file can be bad
    layers = integer(config, "num_hidden_layers", path, CheckpointError, low=1, high=MAX_DIMENSION)
    theta = number(config, "rope_theta", path, CheckpointError, default=10000.0, low=0, low_open=True)

Why each check: JSON booleans are Python ints (`sliding_window: true` would read as a window of one token);
JSON allows integers of any length (an int of 10^400 overflows float() and, past 4300 digits, even str());
Python's JSON reader accepts NaN and Infinity; and a value taken on trust reaches an allocator (a hidden size
of 10^12) or a division (a RoPE base of -1) long after the file that caused it is forgotten.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

MISSING = object()
MAX_FILE_BYTES = 64 << 20  # a config file larger than this is not a config file (tokenizer_config.json ~ 2 MB)
MAX_DIMENSION = 1 << 24  # the largest size any architecture field may claim (vocabularies reach ~2^18)


def show(value) -> str:
    """A value as it appears in the file, short; safe for integers too large for str() (over 4300 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_json_object(path, error=ValueError, what: str = "a JSON object") -> dict:
    """The JSON object in `path`, or error("<path>: <why>") in one line: missing, too large, not UTF-8, not
    JSON (malformed, nested too deeply, an integer too long to read), or not an object."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise error(f"{path}: {path.stat().st_size} bytes, too large for {what} (at most {MAX_FILE_BYTES})")
        text = path.read_bytes().decode("utf-8")
        value = json.loads(text)
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as failure:
        raise error(f"{path}: cannot read ({failure.strerror})") from None
    except UnicodeDecodeError as failure:
        raise error(f"{path}: not valid UTF-8 (byte 0x{failure.object[failure.start]:02x} at offset "
                    f"{failure.start})") from None
    except json.JSONDecodeError as failure:
        raise error(f"{path}: not valid JSON ({failure.msg} at line {failure.lineno} column {failure.colno})") from None
    except RecursionError:  # [[[[...]]]] a million deep
        raise error(f"{path}: not valid JSON (nested too deeply to parse)") from None
    except ValueError as failure:  # an integer literal over 4300 digits
        raise error(f"{path}: not valid JSON ({str(failure).splitlines()[0][:80]})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected {what}, got {show(value)}")
    return value


def _lookup(obj: dict, key: str, source, error, default):
    """obj[key], or `default` when it is absent or null; error naming the key when it is required (MISSING)."""
    value = obj[key] if key in obj and obj[key] is not None else default
    if value is MISSING:
        raise error(f'{source}: missing key "{key}"')
    return value


def integer(obj: dict, key: str, source, error=ValueError, *, default=MISSING, low: int | None = None,
            high: int | None = None, nullable: bool = False):
    """obj[key] as an int (not a bool, not a float) in [low, high]; `default` when absent or null (MISSING:
    required); None when null and `nullable`."""
    if nullable and key in obj and obj[key] is None:
        return None
    value = _lookup(obj, key, source, error, default)
    if value is default:
        return value
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(f"{source}: {key} must be an integer, got {show(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        span = f">= {low}" if high is None else f"<= {high}" if low is None else f"in [{low}, {high}]"
        raise error(f"{source}: {key} must be an integer {span}, got {show(value)}")
    return value


def number(obj: dict, key: str, source, error=ValueError, *, default=MISSING, low: float | None = None,
           high: float | None = None, low_open: bool = False):
    """obj[key] as a finite float (an int or a float in the file, not a bool) in [low, high] ((low, high] with
    low_open); `default` when absent or null."""
    value = _lookup(obj, key, source, error, default)
    if value is default:
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise error(f"{source}: {key} must be a number, got {show(value)}")
    if isinstance(value, int) and value.bit_length() > 1000:
        raise error(f"{source}: {key} must be a finite number, got {show(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise error(f"{source}: {key} must be a finite number, got {value}")
    if (low is not None and (value < low or (low_open and value == low))) or (high is not None and value > high):
        left = "(" if low_open else "["
        raise error(f"{source}: {key} must be in {left}{low}, {high if high is not None else 'inf'}], got {value}")
    return value


def boolean(obj: dict, key: str, source, error=ValueError, *, default=MISSING) -> bool:
    """obj[key] as a JSON true/false (a string "false" would be truthy); `default` when absent or null."""
    return _of_type(obj, key, source, error, default, bool, "true or false")


def string(obj: dict, key: str, source, error=ValueError, *, default=MISSING):
    return _of_type(obj, key, source, error, default, str, "a string")


def mapping(obj: dict, key: str, source, error=ValueError, *, default=MISSING) -> dict:
    return _of_type(obj, key, source, error, default, dict, "an object")


def _of_type(obj: dict, key: str, source, error, default, kind: type, words: str):
    value = _lookup(obj, key, source, error, default)
    if value is not default and not isinstance(value, kind):
        raise error(f"{source}: {key} must be {words}, got {show(value)}")
    return value


def lone_surrogate(text: str) -> str | None:
    """Why `text` is not text that can be written out, or None: JSON's "\\ud800" escapes decode to a lone
    surrogate, which no tokenizer (and no UTF-8 file) can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"holds a lone surrogate (\\u{ord(text[error.start]):04x} at character {error.start}), not text"
    return None


def read_text(path, error=ValueError) -> str:
    """A small text file (a chat template) as UTF-8, or one line saying why not."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise error(f"{path}: {path.stat().st_size} bytes, too large (at most {MAX_FILE_BYTES})")
        return path.read_bytes().decode("utf-8")
    except OSError as failure:
        raise error(f"{path}: cannot read ({failure.strerror})") from None
    except UnicodeDecodeError as failure:
        raise error(f"{path}: not valid UTF-8 (byte 0x{failure.object[failure.start]:02x} at offset "
                    f"{failure.start})") from None
