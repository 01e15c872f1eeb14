"""The one path every run-directory write takes, so a full disk is a sentence, not a traceback.

A write can fail in more ways than OSError: safetensors raises its own SafetensorError for a full disk (its
Rust writer's io::Error, as text), torch raises RuntimeError from its own file writers, and a JSON dump can
fail half-way through. `writing(what)` turns every one of them into a RunError of one line,

    out/checkpoints/step_000004: not written (No space left on device); the previous checkpoint ... is intact

naming what was being written and why it failed. What stays intact is the writers' job, not this module's:
every file goes through a temporary sibling and a rename (models/files.py publish_directory and
write_file_atomic), so a failed write leaves the previous version, or nothing.

The low-level write functions are looked up here at call time (`os.write` under Python's own file objects,
`safetensors.torch.save_file`), so a test can inject ENOSPC at any one of them (tests/test_faults.py).
"""
from __future__ import annotations

import contextlib
import errno
import os

from safetensors import SafetensorError

__all__ = ["RunError", "writing", "reason"]

# Words a full disk / read-only file system / permission error come with, for errors that carry no errno
# (SafetensorError and torch's RuntimeError hold the OS error only as text).
_KNOWN_TEXT = {"No space left on device": errno.ENOSPC, "Read-only file system": errno.EROFS,
               "Permission denied": errno.EACCES, "Disk quota exceeded": errno.EDQUOT}


class RunError(ValueError):
    """A run directory, or a file in it, that cannot be used or written as asked; the message is one line naming
    it and saying what to do."""


def reason(error: BaseException) -> str:
    """Why a write failed, in a few words: the OS's own words when there is an errno (strerror), else the known
    words found in the error's text, else its type and first line."""
    number = getattr(error, "errno", None)
    if isinstance(error, OSError) and number:
        return os.strerror(number)
    text = str(error)
    for words in _KNOWN_TEXT:
        if words in text:
            return words
    first = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {first[:160]}" if first else type(error).__name__


@contextlib.contextmanager
def writing(what, kept: str = "", failed: str = "not written"):
    """`with writing(path):` runs a write; an OSError or SafetensorError raised inside (or a RuntimeError whose
    text is an OS error's: torch's file writers) becomes RunError("<what>: <failed> (<reason>)[; <kept>]").
    `kept` says what survived (e.g. the previous checkpoint) when the caller knows. Other errors (a bug) pass
    through unchanged."""
    try:
        yield
    except (OSError, SafetensorError, RuntimeError) as error:
        if type(error) is RuntimeError and not any(words in str(error) for words in _KNOWN_TEXT):
            raise  # a RuntimeError that is no write failure (a bug): keep its traceback
        raise RunError(f"{what}: {failed} ({reason(error)}){'; ' + kept if kept else ''}") from None
