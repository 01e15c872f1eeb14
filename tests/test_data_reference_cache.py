"""data.reference_cache: a hit returns identical tensors without computing; any change to what the numbers
depend on (data, reference model, max_length, ...) misses and recomputes; writes are atomic.

Oracles: invariants. A counter in the caller's compute function shows whether it ran; tensors are compared
with torch.equal; the file's own metadata (read with safetensors directly) must hold the key.
"""
import dataclasses
import os

import pytest
import torch
from safetensors import safe_open

from data.reference_cache import (TENSOR_FILE, CacheMiss, ReferenceCacheKey, cache_path, examples_sha256, file_sha256,
                                  load_reference_logps, reference_logps, save_reference_logps)
from data.tokenization import PreferenceExample

EXAMPLES = [PreferenceExample([1, 5, 6], [7, 2], [8, 9, 2], index=0),
            PreferenceExample([1, 5], [10, 2], [11, 2], 0.6, index=1),
            PreferenceExample([1, 4, 4, 4], [12, 13, 2], [2], index=2)]
SETTINGS = dict(dataset_sha256="d" * 64, reference_model="tiny-mistral@abc123", max_length=512,
                max_prompt_length=256, chat_format="mistral-v1-inst", tokenizer_sha256="t" * 64)


class Compute:
    """The caller's compute function: fixed log-probs for N pairs; counts its calls."""

    def __init__(self, n, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.chosen = -torch.rand(n, generator=generator, dtype=torch.float64) * 10  # [N], not float32 on purpose
        self.rejected = -torch.rand(n, generator=generator, dtype=torch.float64) * 10  # [N]
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.chosen, self.rejected


def test_miss_computes_then_hit_returns_identical_tensors(tmp_path):
    key = ReferenceCacheKey.build(EXAMPLES, **SETTINGS)
    path = cache_path(tmp_path, key)
    compute, lines = Compute(3), []
    chosen, rejected = reference_logps(path, key, compute, log=lines.append)
    assert compute.calls == 1 and lines[0].startswith(f"reference log-probs: no cache at {path}")
    torch.testing.assert_close(chosen, compute.chosen.float(), rtol=0, atol=0)
    assert chosen.dtype == torch.float32 and rejected.dtype == torch.float32 and chosen.shape == (3,)

    hit_chosen, hit_rejected = reference_logps(path, key, compute, log=lines.append)
    assert compute.calls == 1 and lines[1] == f"reference log-probs: loaded 3 pairs from {path}"
    assert torch.equal(hit_chosen, chosen) and torch.equal(hit_rejected, rejected)
    with safe_open(os.path.join(path, TENSOR_FILE), framework="pt") as file:
        assert file.metadata()["max_length"] == "512"
        assert file.metadata()["examples_sha256"] == examples_sha256(EXAMPLES)
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temp file left behind


@pytest.mark.parametrize("change, field", [
    (dict(max_length=256), "max_length"),
    (dict(max_prompt_length=128), "max_prompt_length"),
    (dict(dataset_sha256="e" * 64), "dataset_sha256"),
    (dict(reference_model="tiny-mistral@def456"), "reference_model"),
    (dict(tokenizer_sha256="u" * 64), "tokenizer_sha256"),
    (dict(chat_format="chatml"), "chat_format"),
])
def test_any_changed_setting_misses(tmp_path, change, field):
    """A cache written under one key is stale under a key that differs in one field; the miss names it."""
    key = ReferenceCacheKey.build(EXAMPLES, **SETTINGS)
    path = tmp_path / "ref"
    reference_logps(path, key, Compute(3))
    changed = ReferenceCacheKey.build(EXAMPLES, **{**SETTINGS, **change})
    with pytest.raises(CacheMiss, match=f"stale cache .*: {field} is"):
        load_reference_logps(path, changed)
    compute = Compute(3, seed=1)
    chosen, _ = reference_logps(path, changed, compute)
    assert compute.calls == 1 and torch.equal(chosen, compute.chosen.float())
    assert cache_path(tmp_path, changed) != cache_path(tmp_path, key)


def test_changed_data_misses_even_under_the_same_settings(tmp_path):
    """One token changed in one response (e.g. a tokenisation fix) changes the token hash: a miss."""
    key = ReferenceCacheKey.build(EXAMPLES, **SETTINGS)
    path = tmp_path / "ref"
    reference_logps(path, key, Compute(3))
    edited = list(EXAMPLES)
    edited[1] = dataclasses.replace(EXAMPLES[1], chosen_ids=[10, 14, 2])
    with pytest.raises(CacheMiss, match="examples_sha256 is"):
        load_reference_logps(path, ReferenceCacheKey.build(edited, **SETTINGS))
    with pytest.raises(CacheMiss, match="num_examples is '3' there, '2' now"):
        load_reference_logps(path, ReferenceCacheKey.build(EXAMPLES[:2], **SETTINGS))
    assert examples_sha256(EXAMPLES) == examples_sha256([dataclasses.replace(e) for e in EXAMPLES])


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "no-manifest"])
def test_damaged_cache_is_a_miss_naming_the_file_and_is_replaced(tmp_path, damage):
    """A cache directory whose file was cut short, had one byte changed, was replaced by garbage of the same size,
    or whose manifest is gone (never completely written) is a miss whose reason names the file; reference_logps
    then recomputes and publishes a good one. Oracle: the manifest's recorded size and sha256 (models/files.py)."""
    key = ReferenceCacheKey.build(EXAMPLES, **SETTINGS)
    path = tmp_path / "ref"
    save_reference_logps(path, key, torch.zeros(3), torch.zeros(3))
    tensors = path / TENSOR_FILE
    data = tensors.read_bytes()
    if damage == "truncate":
        tensors.write_bytes(data[:len(data) // 2])
    elif damage == "flip":
        tensors.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "garbage":
        tensors.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json".ljust(len(data), b"x"))
    else:
        (path / "manifest.json").unlink()
    with pytest.raises(CacheMiss, match="damaged cache: .*(ref_logps.safetensors|manifest.json)") as miss:
        load_reference_logps(path, key)
    assert "\n" not in str(miss.value)
    compute, lines = Compute(3), []
    reference_logps(path, key, compute, log=lines.append)
    assert compute.calls == 1 and lines[0].startswith("reference log-probs: damaged cache: ")
    chosen, rejected = load_reference_logps(path, key)
    assert torch.equal(chosen, compute.chosen.float()) and torch.equal(rejected, compute.rejected.float())
    assert sorted(os.listdir(tmp_path)) == ["ref"]  # nothing left of the damaged one


def test_save_rejects_wrong_shapes_and_non_finite_values(tmp_path):
    key = ReferenceCacheKey.build(EXAMPLES, **SETTINGS)
    with pytest.raises(ValueError, match=r"ref_chosen_logps must be a tensor of shape \(3,\)"):
        save_reference_logps(tmp_path / "a.safetensors", key, torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="ref_rejected_logps must be finite"):
        save_reference_logps(tmp_path / "a.safetensors", key, torch.zeros(3), torch.tensor([0.0, float("nan"), 0.0]))
    assert os.listdir(tmp_path) == []


def test_file_sha256_reads_the_bytes(tmp_path):
    import hashlib
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"x" * (3 << 20) + b"tail")  # more than one 1 MiB block
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()
