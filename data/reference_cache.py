"""On-disk cache of reference log-probabilities, computed once per dataset and reference model.

SPL's loss (Eq. 5) needs log pi_ref(y|x) and log pi_ref(y'|x) for every pair, and they never change during
training: the reference is frozen. And since SPL is DPO with the reference log-ratio scaled by beta / alpha,
one cache serves every (alpha, beta). This module stores them in a directory `ref_logps-<key digest>/` holding
one safetensors file and a manifest (models/files.py: sizes and sha256, written last, verified on load),

    ref_logps.safetensors
      ref_chosen_logps    float32 [N]     row i belongs to the PreferenceExample with index i
      ref_rejected_logps  float32 [N]

with the cache key in the file's metadata. The key names everything the numbers depend on: the dataset's
content hash, the reference model's identity (a string or hash the caller supplies), the tokenisation
settings (max_length, max_prompt_length, chat format, tokenizer file hash) and, as a last guard, a hash of
the token ids themselves. A cache whose key differs in any field is stale and never used. The directory is
published atomically, so a crash mid-write leaves no cache at all; one that was damaged afterwards (cut short,
altered) fails its manifest, is reported in one line as a miss, recomputed and replaced.

The compute function is the caller's (this module knows nothing of models): reference_logps(path, key,
compute) returns the cached tensors on a hit and otherwise calls compute(), saves, and returns its result.
"""
from __future__ import annotations

import array
import dataclasses
import hashlib
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.files import IntegrityError, file_sha256, publish_directory, verify_directory

FORMAT_VERSION = "2"  # 2: a published directory with a manifest (1 was a bare .safetensors file)
TENSOR_NAMES = ("ref_chosen_logps", "ref_rejected_logps")
TENSOR_FILE = "ref_logps.safetensors"


class CacheMiss(Exception):
    """The cache cannot be used; str(miss) says why (no file, unreadable, or which key field is stale)."""


def examples_sha256(examples) -> str:
    """sha256 of every example's index and prompt / chosen / rejected ids, in order (lengths delimit lists)."""
    digest = hashlib.sha256()
    for example in examples:
        for ids in ([example.index], example.prompt_ids, example.chosen_ids, example.rejected_ids):
            digest.update(array.array("q", [len(ids), *ids]).tobytes())
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ReferenceCacheKey:
    dataset_sha256: str
    reference_model: str
    max_length: int
    max_prompt_length: int
    chat_format: str
    tokenizer_sha256: str
    num_examples: int
    examples_sha256: str  # last: the other fields name a mismatch more readably

    @classmethod
    def build(cls, examples, *, dataset_sha256: str, reference_model: str, max_length: int,
              max_prompt_length: int, chat_format: str, tokenizer_sha256: str) -> "ReferenceCacheKey":
        return cls(dataset_sha256, reference_model, max_length, max_prompt_length, chat_format, tokenizer_sha256,
                   len(examples), examples_sha256(examples))

    def metadata(self) -> dict[str, str]:
        """The key as safetensors metadata (str -> str)."""
        fields = {name: str(value) for name, value in dataclasses.asdict(self).items()}
        return {"format_version": FORMAT_VERSION, **fields}

    def digest(self) -> str:
        """A short hash of the whole key, for a file name per key (see cache_path)."""
        return hashlib.sha256(repr(sorted(self.metadata().items())).encode()).hexdigest()[:16]


def cache_path(directory, key: ReferenceCacheKey) -> str:
    """`directory/ref_logps-<key digest>`: different settings get different cache directories."""
    return os.path.join(os.fspath(directory), f"ref_logps-{key.digest()}")


def load_reference_logps(path, key: ReferenceCacheKey) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref_chosen_logps [N], ref_rejected_logps [N]) from the cache directory `path`, or CacheMiss if absent,
    incomplete, damaged (its manifest disagrees), unreadable or stale."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CacheMiss(f"no cache at {path}")
    try:
        verify_directory(path)
    except IntegrityError as error:
        raise CacheMiss(f"damaged cache: {error}") from None
    file_path = os.path.join(path, TENSOR_FILE)
    try:
        with safe_open(file_path, framework="pt") as file:
            stored = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except Exception as error:  # a corrupt file is a miss, not a crash: it is recomputed and replaced
        raise CacheMiss(f"unreadable cache file {file_path} ({type(error).__name__}: {error})") from None
    for name, expected in key.metadata().items():
        if stored.get(name) != expected:
            raise CacheMiss(f"stale cache {path}: {name} is {stored.get(name)!r} there, {expected!r} now")
    if set(tensors) != set(TENSOR_NAMES) or any(t.shape != (key.num_examples,) for t in tensors.values()):
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        raise CacheMiss(f"malformed cache {path}: expected {TENSOR_NAMES} of shape ({key.num_examples},), got {shapes}")
    return tensors["ref_chosen_logps"], tensors["ref_rejected_logps"]


def save_reference_logps(path, key: ReferenceCacheKey, ref_chosen_logps: torch.Tensor,
                         ref_rejected_logps: torch.Tensor) -> None:
    """Write both [N] tensors as float32 with the key in the metadata into the cache directory `path`, published
    atomically with a manifest; a previous (stale or damaged) cache there is replaced."""
    path = os.fspath(path)
    tensors = {}
    for name, tensor in zip(TENSOR_NAMES, (ref_chosen_logps, ref_rejected_logps)):
        if not isinstance(tensor, torch.Tensor) or tensor.shape != (key.num_examples,):
            raise ValueError(f"{name} must be a tensor of shape ({key.num_examples},), "
                             f"got {getattr(tensor, 'shape', type(tensor).__name__)}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(f"{name} must be finite floating-point log-probabilities")
        tensors[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    with publish_directory(path, overwrite=True) as staging:
        save_file(tensors, str(staging / TENSOR_FILE), metadata=key.metadata())


def reference_logps(path, key: ReferenceCacheKey, compute, log=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached reference log-probs: load on a hit; else compute() -> (chosen [N], rejected [N]), save, return.

    `log`, if given (e.g. print), receives one line saying whether the cache was used and why not.
    """
    try:
        ref_chosen_logps, ref_rejected_logps = load_reference_logps(path, key)
        if log is not None:
            log(f"reference log-probs: loaded {key.num_examples} pairs from {os.fspath(path)}")
        return ref_chosen_logps, ref_rejected_logps
    except CacheMiss as miss:
        if log is not None:
            log(f"reference log-probs: {miss}; computing them")
    ref_chosen_logps, ref_rejected_logps = compute()
    save_reference_logps(path, key, ref_chosen_logps, ref_rejected_logps)
    return (ref_chosen_logps.detach().to("cpu", torch.float32),
            ref_rejected_logps.detach().to("cpu", torch.float32))


def reference_identity(model_dir: Path | None, init_config, seed: int, dtype: str, average: bool) -> str:
    """What the reference log-probs depend on besides the data: the weights, their dtype, the objective's
    length normalisation (or, for random weights, the config and seed). Weight files under 1 GB are hashed;
    larger ones are named by size and mtime."""
    if model_dir is None:
        return f"random-init:{init_config}:{seed}"
    parts = [file_sha256(model_dir / "config.json")]
    files = sorted(model_dir.glob("*.safetensors"))
    small = sum(f.stat().st_size for f in files) < 1 << 30
    for f in files:
        stat = f.stat()
        parts.append(file_sha256(f) if small else f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}")
    parts += [dtype, f"average={average}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()
