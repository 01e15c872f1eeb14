"""GGUF (llama.cpp's container) read from scratch with numpy: header, metadata, tensor infos, dequantisation.

    magic "GGUF" | version u32 (3; 2 reads the same) | n_tensors u64 | n_kv u64
    n_kv x  [key: string | value_type u32 | value]            string = u64 length + UTF-8 bytes
    n_tensors x [name: string | n_dims u32 | ne[n_dims] u64 | ggml_type u32 | offset u64]
    padding to `general.alignment` (default 32), then the data section; each tensor at data + offset

Everything is little-endian. `ne[0]` is the fastest-moving dimension, so a tensor of ne = [in, out] is the numpy
array of shape (out, in): the same [out, in] as a torch Linear's weight. Quantised types store blocks of 32
elements along ne[0] (blocks never cross a row):

    Q8_0  34 bytes: f16 d, 32 x int8 q                          x = d * q
    Q4_0  18 bytes: f16 d, 16 bytes of nibbles                  x = d * (q - 8)
    Q4_1  20 bytes: f16 d, f16 m, 16 bytes of nibbles           x = d * q + m
    (nibbles: byte j holds element j in its low 4 bits and element j + 16 in its high 4 bits)

Why our own reader rather than the `gguf` package (ggml's, which the tests use as the oracle): the format is ~20
lines of struct, the three block types a few numpy lines each, and the runtime then needs nothing beyond numpy
(the project's rule: torch, sentencepiece, safetensors, numpy, tqdm). The file is memory-mapped and every tensor
is an `np.frombuffer` view into it, so opening a 100 MB file reads only its header, and dequantising goes tensor
by tensor (the caller holds one float32 tensor at a time). Every length, count and offset is checked against the
file's size before it is used, so a truncated or hostile file is one GGUFError line, never a huge allocation.

What the tensors and metadata become (an HF-format directory) is models/gguf.py; the tokenizer,
models/gguf_tokenizer.py.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.checkpoint import CheckpointError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# Metadata value types (gguf.h's gguf_type): fixed-size scalars by struct format; 8 string and 9 array are read apart.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
STRING, ARRAY = 8, 9

# ggml types: name, elements per block, bytes per block. Only the first six are dequantised; the names of the rest
# are here so a refusal can say which type it met (ggml.h's enum ggml_type).
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
GGML_TYPES = {F32: ("F32", 1, 4), F16: ("F16", 1, 2), BF16: ("BF16", 1, 2), Q8_0: ("Q8_0", 32, 34),
              Q4_0: ("Q4_0", 32, 18), Q4_1: ("Q4_1", 32, 20)}
OTHER_TYPE_NAMES = {6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
                    15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
                    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
                    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


class GGUFError(CheckpointError):
    """A GGUF file that cannot be used as it is; the message starts with the file and names the field or tensor.
    A CheckpointError, so train.py and sample.py report it in one line like any other unloadable model."""


def type_name(ggml_type: int) -> str:
    if ggml_type in GGML_TYPES:
        return GGML_TYPES[ggml_type][0]
    return OTHER_TYPE_NAMES.get(ggml_type, f"type {ggml_type}")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: reversed(ne), so a weight is (out, in)
    ggml_type: int
    offset: int  # absolute byte offset in the file (data section start + the stored offset)

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    @property
    def nbytes(self) -> int:
        """Bytes on disk; only defined for the types this reader dequantises."""
        _, block, block_bytes = GGML_TYPES[self.ggml_type]
        return int(np.prod(self.shape, dtype=np.int64)) // block * block_bytes


class GGUFFile:
    """An open GGUF file: `metadata` {key: value} (strings, numbers, bools; arrays as lists of str or numpy arrays),
    `tensors` {name: TensorInfo} in file order, and `dequantize(name)` -> float32 numpy array."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as file:
                size = file.seek(0, 2)
                if size == 0:
                    raise GGUFError(f"{self.path}: empty file, not GGUF")
                self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise GGUFError(f"{self.path}: no such file") from None
        except IsADirectoryError:
            raise GGUFError(f"{self.path}: is a directory, not a GGUF file") from None
        self._pos = 0
        magic = self._read(4, "magic")
        if magic != MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        self.version = self._scalar(4, "version")
        if self.version not in (2, 3):
            raise GGUFError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._scalar(10, "tensor count"), self._scalar(10, "metadata count")
        self.metadata = {}
        for index in range(n_kv):
            key = self._string(f"metadata key {index}")
            self.metadata[key] = self._value(self._scalar(4, key), key)
        self.tensors = {}
        for index in range(n_tensors):
            name = self._string(f"tensor info {index}")
            n_dims = self._scalar(4, name)
            if not 1 <= n_dims <= 4:
                raise GGUFError(f"{self.path}: tensor {name}: {n_dims} dimensions (GGUF allows 1 to 4)")
            ne = [self._scalar(10, name) for _ in range(n_dims)]
            ggml_type, offset = self._scalar(4, name), self._scalar(10, name)
            self.tensors[name] = (tuple(reversed(ne)), ggml_type, offset)
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = {name: TensorInfo(name, shape, ggml_type, data_start + offset)
                        for name, (shape, ggml_type, offset) in self.tensors.items()}
        self.size = size

    # ---- the header, field by field: every read checked against the file's end --------------------------------

    def _read(self, count: int, what: str) -> bytes:
        if count < 0 or self._pos + count > len(self._map):
            raise GGUFError(f"{self.path}: truncated: {what} needs {count} bytes at offset {self._pos}, the file "
                            f"has {len(self._map)}")
        data = self._map[self._pos:self._pos + count]
        self._pos += count
        return data

    def _scalar(self, value_type: int, what: str):
        fmt = _SCALAR[value_type]
        return struct.unpack(fmt, self._read(struct.calcsize(fmt), what))[0]

    def _string(self, what: str) -> str:
        raw = self._read(self._scalar(10, what), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise GGUFError(f"{self.path}: {what}: not UTF-8 ({error.reason} at byte {error.start})") from None

    def _value(self, value_type: int, key: str):
        if value_type in _SCALAR:
            return self._scalar(value_type, key)
        if value_type == STRING:
            return self._string(key)
        if value_type != ARRAY:
            raise GGUFError(f"{self.path}: {key}: unknown value type {value_type}")
        item_type, count = self._scalar(4, key), self._scalar(10, key)
        if item_type in _NUMPY:  # one frombuffer for the whole array (token types, scores)
            dtype = np.dtype(_NUMPY[item_type])
            values = np.frombuffer(self._read(count * dtype.itemsize, key), dtype=dtype)
            return values.astype(bool) if item_type == 7 else values
        if item_type == STRING:
            if 8 * count > len(self._map) - self._pos:  # each string takes at least 8 bytes: refuse before looping
                raise GGUFError(f"{self.path}: truncated: {key} claims {count} strings")
            return [self._string(f"{key}[{i}]") for i in range(count)]
        if count > len(self._map) - self._pos:
            raise GGUFError(f"{self.path}: truncated: {key} claims {count} arrays")
        return [self._value(item_type, f"{key}[{i}]") for i in range(count)]  # arrays of arrays

    # ---- tensors ------------------------------------------------------------------------------------------------

    def check_tensor(self, name: str) -> TensorInfo:
        """The tensor's info once its type is one we dequantise and its bytes lie inside the file."""
        info = self.tensors[name]
        if info.ggml_type not in GGML_TYPES:
            raise GGUFError(f"{self.path}: tensor {name} has type {info.type_name}, which this reader does not "
                            f"dequantise (supported: {', '.join(t[0] for t in GGML_TYPES.values())})")
        block = GGML_TYPES[info.ggml_type][1]
        if info.shape[-1] % block:
            raise GGUFError(f"{self.path}: tensor {name}: rows of {info.shape[-1]} elements are not whole "
                            f"{info.type_name} blocks of {block}")
        if info.offset + info.nbytes > self.size:
            raise GGUFError(f"{self.path}: truncated: tensor {name} ends at byte {info.offset + info.nbytes}, the "
                            f"file has {self.size}")
        return info

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a uint8 view into the memory-mapped file (no copy)."""
        info = self.check_tensor(name)
        return np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32, shape `info.shape` (a fresh array the caller owns)."""
        info = self.check_tensor(name)
        return dequantize(self.raw(name), info.ggml_type).reshape(info.shape)

    def close(self):
        self._map.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """Flat float32 values of `raw` (uint8 bytes of whole blocks) stored as `ggml_type`."""
    if ggml_type == F32:
        return raw.view("<f4").copy()
    if ggml_type == F16:
        return raw.view("<f2").astype(np.float32)
    if ggml_type == BF16:  # bfloat16 is the top half of a float32
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    name, block, block_bytes = GGML_TYPES[ggml_type]
    blocks = raw.reshape(-1, block_bytes)  # (n_blocks, bytes)
    d = blocks[:, 0:2].copy().view("<f2").astype(np.float32)  # (n_blocks, 1): the scale
    if ggml_type == Q8_0:
        return (d * blocks[:, 2:].view(np.int8)).reshape(-1)  # (n_blocks, 32) -> flat
    nibbles = blocks[:, -16:]  # (n_blocks, 16): element j low, element j + 16 high
    q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1)  # (n_blocks, 32) in 0..15
    if ggml_type == Q4_0:
        return (d * (q.astype(np.int8) - 8)).reshape(-1)
    m = blocks[:, 2:4].copy().view("<f2").astype(np.float32)  # Q4_1: (n_blocks, 1) the minimum
    return (d * q + m).reshape(-1)


__all__ = ["GGUFFile", "GGUFError", "TensorInfo", "dequantize", "type_name", "GGML_TYPES"]
