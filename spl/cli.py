"""What the command-line scripts (train.py, sample.py, the eval/ experiments) share: the usage error, the --device
option and the --threads rule.

A bad command line is a UsageError: the script prints it as one line and exits with code 2 (argparse's own
code for bad usage); bad files and checkpoints are the library's errors and exit with code 1.
"""
from __future__ import annotations

import argparse
import os

import torch

from models.checkpoint import resolve_device as _resolve_device
from models.mistral import Mistral, MistralConfig

SMALL_MODEL_PARAMETERS = 10_000_000  # below this, --threads 0 means one thread on CPU
THREADS_PER_CORE = 4  # --threads above cores x this is a typo, not a setting (each thread is a stack and a barrier)
SEED_LIMIT = 1 << 63  # torch.manual_seed takes [-2^63, 2^64), numpy [0, 2^32) per word: one range for all, >= 0


class UsageError(ValueError):
    """A bad command line; printed as one line, exit code 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (an unknown flag, `--steps ten`, a bad choice) are a UsageError, so they
    too are printed as one line, "train.py: error: argument --steps: invalid int value: 'ten' (see --help)",
    not argparse's usage block (of 40 lines for train.py) plus the error."""

    def error(self, message):
        raise UsageError(f"{message} (see --help)")


def steps(count: int) -> str:
    """"1 step", "4 steps": the run's length as the start-up lines and errors say it."""
    return f"{count} step{'s' * (count != 1)}"


def resolve_device(name: str):
    """--device as a torch.device (auto: CUDA if available); a bad name is a usage error."""
    try:
        return _resolve_device(name)
    except ValueError as error:
        raise UsageError(str(error)) from None


def choose_threads(requested: int, num_parameters: int, device) -> int:
    """Apply --threads and return the intra-op thread count now in use. requested > 0: that many. 0 (automatic):
    one thread for a model under 10M parameters on CPU, torch's default otherwise. A small model's matmuls
    are too small to gain from intra-op threads, and each op's thread barrier stalls whenever another process
    holds a core: on two busy cores the world's main job took 210 s with two threads and 56 s with one, and
    sample.py's 8 samples x 16 prompts over 500 s with torch's default against 11 s with one (issue 16)."""
    check_threads(requested)
    if requested:
        torch.set_num_threads(requested)
    elif torch.device(device).type == "cpu" and num_parameters < SMALL_MODEL_PARAMETERS:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def check_threads(requested: int) -> None:
    """--threads in [0, cores x THREADS_PER_CORE]: a larger count is refused before any work (libgomp would
    create the threads, or fail in its own words)."""
    limit = (os.cpu_count() or 1) * THREADS_PER_CORE
    if requested < 0:
        raise UsageError(f"--threads must be >= 0 (0: automatic), got {requested}")
    if requested > limit:
        raise UsageError(f"--threads must be at most {limit} ({THREADS_PER_CORE} per core; this machine has "
                         f"{os.cpu_count()} cores), got {requested}")


def check_seed(seed: int) -> None:
    if not 0 <= seed < SEED_LIMIT:
        raise UsageError(f"--seed must be in [0, 2^63), got {seed}")


def machine_memory(device) -> int:
    """Bytes of memory on `device`: the GPU's, or this machine's physical memory for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(needed_bytes: int, what: str, device) -> None:
    """Refuse, before allocating it, an estimate of memory larger than the device has."""
    have = machine_memory(device)
    if needed_bytes > have:
        raise UsageError(f"{what} needs about {needed_bytes / 2**30:.1f} GiB, more than the "
                         f"{have / 2**30:.1f} GiB of {torch.device(device).type} memory here")


def checkpoint_parameters(model_dir) -> int:
    """The parameter count of the HF-format checkpoint in model_dir, from its config.json alone (the model is
    built on the meta device: no memory, no weights read)."""
    with torch.device("meta"):
        return Mistral(MistralConfig.from_json(f"{model_dir}/config.json")).num_parameters()
