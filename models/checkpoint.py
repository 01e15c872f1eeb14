"""HF-format checkpoints: `config.json` + `model.safetensors` (or shards with `model.safetensors.index.json`).

One explicit name table maps HF's keys to ours; a missing, unexpected or mis-shaped key is an error that lists
them, never a silently random weight. Loading builds the model on the meta device and assigns the tensors read
from the safetensors files (memory-mapped), so the process holds about one copy of the weights, not two; with a
`device`, tensors are read straight onto it (a 7B checkpoint goes to the GPU without a CPU copy of the model).
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.fields import mapping, read_json_object, show
from models.files import IntegrityError, publish_directory, verify_directory
from models.mistral import ConfigError, Mistral, MistralConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HASH_LIMIT = 1 << 30  # a model directory with a manifest: sizes always checked, sha256 up to 1 GiB of files

# {HF name: our name}; "{}" is the layer index. Our modules mirror HF's names without the "model." prefix that
# MistralForCausalLM puts around the decoder.
_FROM_HF = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    "model.layers.{}.input_layernorm.weight": "layers.{}.input_layernorm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_layernorm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "layers.{}.self_attn.q_proj.weight",
    "model.layers.{}.self_attn.k_proj.weight": "layers.{}.self_attn.k_proj.weight",
    "model.layers.{}.self_attn.v_proj.weight": "layers.{}.self_attn.v_proj.weight",
    "model.layers.{}.self_attn.o_proj.weight": "layers.{}.self_attn.o_proj.weight",
    "model.layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "model.layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "model.layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
}
_TO_HF = {ours: hf for hf, ours in _FROM_HF.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the path and the keys."""


def raise_key_problems(source, missing, unexpected, misshaped, error=CheckpointError) -> None:
    """The one report of a state dict that does not fit its model, shared by models and adapters: raise
    `error("source: missing keys: a, b | unexpected keys: c | mis-shaped tensors: d: (2, 3), ...")` listing every
    problem at once, or return if all three lists are empty. Each entry is already a readable string."""
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped tensors: {'; '.join(misshaped)}")
    if problems:
        raise error(f"{source}: " + " | ".join(problems))


def _translate(name: str, table: dict) -> str | None:
    """Map one key through a table whose entries may hold "{}" for a layer index; None if no entry matches."""
    layer = re.search(r"\.(\d+)\.", name)
    pattern = name.replace(f".{layer.group(1)}.", ".{}.", 1) if layer else name
    target = table.get(pattern)
    if target is None:
        return None
    return target.format(layer.group(1)) if layer else target


def hf_to_ours(name: str) -> str | None:
    return _translate(name, _FROM_HF)


def ours_to_hf(name: str) -> str | None:
    return _translate(name, _TO_HF)


def _weight_files(path: Path) -> tuple[list[Path], dict | None]:
    """(the weight files, the index's {HF name: file name} or None for a single file)."""
    single, index = path / SINGLE_FILE, path / INDEX_FILE
    if single.is_file():
        return [single], None
    if index.is_file():
        def invalid(message: str):  # "<index>: not a valid safetensors index (<what the reader found>)"
            return CheckpointError(f"{index}: not a valid safetensors index ({message.removeprefix(f'{index}: ')})")
        weight_map = mapping(read_json_object(index, invalid), "weight_map", index, invalid)
        for name, file_name in weight_map.items():
            if not isinstance(file_name, str) or not file_name or Path(file_name).name != file_name or \
                    file_name in (".", ".."):  # a shard outside the directory is not this checkpoint's
                raise CheckpointError(f"{index}: weight_map[{show(name)}] must be a file name in {path}, got "
                                      f"{show(file_name)}")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
        return files, weight_map
    found = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    hint = f" (found {', '.join(found)}: only safetensors is read; convert them first)" if found else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def resolve_device(name: str) -> torch.device:
    """A device name as a torch.device: "auto" is CUDA when available, else CPU; ValueError if the name is not a
    device or names CUDA on a machine without it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (try cpu, cuda, cuda:0 or auto)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def _check_layer_count(path: Path, config: MistralConfig, files: list[Path]) -> None:
    """config.json's num_hidden_layers against the layers the weight files hold (their headers only), before a
    model is built: a config made to claim 10^12 layers would otherwise build modules until memory runs out."""
    stored = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                stored |= {int(m.group(1)) for m in map(re.compile(r"^model\.layers\.(\d+)\.").match, f.keys()) if m}
        except SafetensorError as error:
            raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None
    if stored and config.num_hidden_layers > max(stored) + 1:
        raise CheckpointError(f"{path / 'config.json'}: num_hidden_layers is {config.num_hidden_layers} but the weight "
                              f"files hold layers 0..{max(stored)} (missing keys for every layer above)")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in `tensor`. Its min and max in one pass (NaN propagates into both, an infinity shows in
    one): 20x faster than `torch.isfinite(tensor).all()`, which writes a bool tensor as large as the weights
    (0.5 s for SmolLM2's 28M-entry embedding on one thread, a minute for a 7B model)."""
    return tensor.numel() == 0 or all(math.isfinite(float(v)) for v in torch.aminmax(tensor))


def load_pretrained(path, dtype: torch.dtype | None = None, device=None) -> Mistral:
    """Load an HF-format Mistral (or Llama) directory. dtype None keeps the stored dtype; device None is CPU."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: missing config.json")
    try:
        config = MistralConfig.from_json(path / "config.json")
    except ConfigError as error:
        raise CheckpointError(str(error)) from None
    try:  # a directory we wrote carries a manifest: a file cut short or altered is named before it is parsed
        verify_directory(path, required=False, hash_limit=HASH_LIMIT)
    except IntegrityError as error:
        raise CheckpointError(str(error)) from None
    files, weight_map = _weight_files(path)
    _check_layer_count(path, config, files)
    with torch.device("meta"):
        model = Mistral(config)
    expected = {name: p.shape for name, p in model.state_dict(keep_vars=True).items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # the same tensor as embed_tokens.weight; HF does not store it

    device_str = str(torch.device(device)) if device is not None else "cpu"
    state, unexpected, misshaped, misshaped_names, stored_head = {}, [], [], set(), None
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=device_str) as f:
                for hf_name in f.keys():
                    if weight_map is not None and weight_map.get(hf_name) != file.name:
                        # in two shards, or in a shard the index does not name for it: which one is meant?
                        raise CheckpointError(f"{path / INDEX_FILE}: {hf_name} is in {file.name}, but the index "
                                              f"puts it in {weight_map.get(hf_name) or 'no shard'}")
                    name = hf_to_ours(hf_name)
                    if name is None or name not in expected:
                        if config.tie_word_embeddings and name == "lm_head.weight":
                            stored_head = (f.get_tensor(hf_name), file.name)  # some tied checkpoints store it too
                            continue
                        unexpected.append(f"{hf_name} ({file.name})")
                        continue
                    tensor = f.get_tensor(hf_name)
                    if tensor.shape != expected[name] or not tensor.is_floating_point():
                        misshaped.append(f"{hf_name}: {tuple(tensor.shape)} in {file.name}, config expects "
                                         f"{tuple(expected[name])}" if tensor.shape != expected[name] else
                                         f"{hf_name}: {tensor.dtype} in {file.name}, not floating point")
                        misshaped_names.add(name)  # reported as mis-shaped, not also as missing
                        continue
                    if not all_finite(tensor):  # while the tensor is at hand
                        raise CheckpointError(f"{file}: {hf_name} holds NaN or infinite values; the weights are "
                                              f"damaged (or overflowed when saved)")
                    state[name] = tensor.to(dtype) if dtype is not None else tensor
        except SafetensorError as error:  # cut short, not safetensors at all, or a header made to break readers
            raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from None
    missing = [ours_to_hf(name) for name in expected if name not in state and name not in misshaped_names]
    raise_key_problems(path, missing, unexpected, misshaped)
    if stored_head is not None and not torch.equal(stored_head[0].to(state["embed_tokens.weight"]),
                                                    state["embed_tokens.weight"]):
        # A tied head that is stored must equal the embedding; HF transformers would silently untie them.
        raise CheckpointError(f"{path}: tie_word_embeddings is true but lm_head.weight ({stored_head[1]}) differs "
                              f"from model.embed_tokens.weight; set tie_word_embeddings to false to load both")

    model.load_state_dict(state, strict=False, assign=True)  # strictness checked above, with HF names in errors
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model


def save_pretrained(model: Mistral, path, max_shard_bytes: int | None = None, tokenizer_path=None,
                    overwrite: bool = False) -> Path:
    """Write `model` as an HF-format directory that `MistralForCausalLM.from_pretrained` loads.

    With `max_shard_bytes`, weights are split into `model-0000i-of-0000n.safetensors` plus an index, as HF does
    for large models. The directory is published atomically with a manifest (models/files.py), so an interrupted
    save never leaves a half-written checkpoint and load_pretrained verifies it; an existing directory is refused
    unless `overwrite` (then it is replaced only once the new one is complete).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists; refusing to overwrite")
    config = model.config
    state = {}
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        hf_name = ours_to_hf(name)
        if hf_name is None:
            raise CheckpointError(f"{name}: no HF name for this parameter (merge or remove LoRA layers first)")
        state[hf_name] = tensor.detach().contiguous().cpu()

    dtype = next(iter(state.values())).dtype
    hf_config = config.to_hf_dict() | {"dtype": str(dtype).removeprefix("torch."),
                                       "torch_dtype": str(dtype).removeprefix("torch.")}
    with publish_directory(path, overwrite=overwrite) as staging:
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        shards = _split(state, max_shard_bytes)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(staging / SINGLE_FILE), metadata=metadata)
        else:
            weight_map, total = {}, 0
            for i, shard in enumerate(shards, start=1):
                file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(staging / file_name), metadata=metadata)
                for name, tensor in shard.items():
                    weight_map[name] = file_name
                    total += tensor.numel() * tensor.element_size()
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        if tokenizer_path is not None:
            copy_tokenizer(Path(tokenizer_path), staging)
    return path


def copy_tokenizer(tokenizer_path: Path, directory: Path) -> None:
    """Copy a tokenizer file into a model directory under the name load_tokenizer looks for (tokenizer.json and
    tekken.json keep theirs; any other file is a sentencepiece model), with the tokenizer_config.json and
    chat_template.jinja beside it, which carry the chat template, the added tokens and BOS/EOS."""
    name = tokenizer_path.name if tokenizer_path.name in ("tokenizer.json", "tekken.json") else "tokenizer.model"
    shutil.copyfile(tokenizer_path, directory / name)
    for sibling in ("tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_path.parent / sibling).is_file():
            shutil.copyfile(tokenizer_path.parent / sibling, directory / sibling)


def _split(state: dict, max_shard_bytes: int | None) -> list[dict]:
    if max_shard_bytes is None:
        return [state]
    shards, current, size = [], {}, 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    return shards + [current] if current else shards
