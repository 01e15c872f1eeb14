"""What the two command-line scripts (train.py, sample.py) share: the usage error and the --device option.

A bad command line is a UsageError: the script prints it as one line and exits with code 2 (argparse's own
code for bad usage); bad files and checkpoints are the library's errors and exit with code 1.
"""
from __future__ import annotations

from models.checkpoint import resolve_device as _resolve_device


class UsageError(ValueError):
    """A bad command line; printed as one line, exit code 2."""


def resolve_device(name: str):
    """--device as a torch.device (auto: CUDA if available); a bad name is a usage error."""
    try:
        return _resolve_device(name)
    except ValueError as error:
        raise UsageError(str(error)) from None
