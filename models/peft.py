"""LoRA adapters in PEFT's on-disk format, so an adapter trained here loads into HF transformers + peft or vLLM.

    adapter/
      adapter_config.json        peft_type LORA, r, lora_alpha, lora_dropout, target_modules, ...
      adapter_model.safetensors  float32 A and B, keys base_model.model.<HF module name>.lora_{A,B}.weight
      manifest.json              sizes and sha256 (models/files.py); PEFT ignores it, load_adapter verifies it

The HF module name comes from models/checkpoint.py's name table, and `base_model.model.` is the path PEFT's
wrappers put around the HF model (PeftModelForCausalLM.base_model -> LoraModel.model -> MistralForCausalLM).
The layer and the model surgery are models/lora.py's; this file only maps them to and from disk. Options of
PEFT's config that would change what the adapter computes (DoRA, rsLoRA, per-layer ranks, ...) are refused,
never ignored. An adapter written by PEFT has no manifest and loads unverified.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.checkpoint import ours_to_hf
from models.fields import MAX_DIMENSION, number, read_json_object, show
from models.files import IntegrityError, publish_directory, verify_directory
from models.lora import (TARGET_NAMES, AdapterError, add_lora, load_lora_state_dict, lora_modules, lora_state_dict,
                         max_rank, resolve_targets)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel) .model (the HF model)


def _peft_key(lora_name: str) -> str:
    """Our "layers.0.self_attn.q_proj.lora_A.weight" -> PEFT's
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", via the base weight's HF name."""
    module_name, _, lora_leaf = lora_name.rpartition(".lora_")  # "layers.0.self_attn.q_proj", "A.weight"
    hf_weight = ours_to_hf(f"{module_name}.weight")  # "model.layers.0.self_attn.q_proj.weight"
    if hf_weight is None:
        raise AdapterError(f"{module_name}: no HF name for this layer in models/checkpoint.py's table")
    return f"{PEFT_PREFIX}{hf_weight.removesuffix('.weight')}.lora_{lora_leaf}"


def _adapter_settings(model: nn.Module) -> tuple[int, float, float, tuple[str, ...]]:
    """(r, lora_alpha, lora_dropout, targets) shared by every LoRA layer; PEFT's format has one of each."""
    modules = lora_modules(model)
    if not modules:
        raise AdapterError("the model has no LoRA layers (call add_lora first)")
    settings = {(m.rank, m.alpha, m.dropout_p) for m in modules.values()}
    if len(settings) > 1:
        raise AdapterError(f"LoRA layers disagree on (rank, alpha, dropout): {sorted(settings)}; "
                           "PEFT's adapter format holds one of each")
    rank, alpha, dropout = settings.pop()
    return rank, alpha, dropout, resolve_targets({name.rsplit(".", 1)[-1] for name in modules})


def save_adapter(model: nn.Module, directory, base_model_name_or_path: str | None = None, overwrite: bool = False,
                 extra_tensors: dict | None = None):
    """Write the adapter as PEFT does: `adapter_config.json` + `adapter_model.safetensors` (float32 A and B).

    Published atomically with a manifest (models/files.py), so an interrupted save leaves no half-written adapter
    and load_adapter verifies it; an existing directory is refused unless `overwrite=True`. extra_tensors:
    {file name: {tensor name: tensor}} written beside it in the same publish (train.py's reward head), so they
    are covered by the manifest too. Returns its Path.
    """
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise AdapterError(f"{directory}: already exists; pass overwrite=True to replace it")
    if directory.exists() and not directory.is_dir():
        raise AdapterError(f"{directory}: exists and is not a directory")
    rank, alpha, dropout, targets = _adapter_settings(model)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": rank, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": list(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
    }
    tensors = {_peft_key(name): tensor.float().contiguous().cpu() for name, tensor in lora_state_dict(model).items()}

    with publish_directory(directory, overwrite=overwrite) as staging:  # the old one stays until the new is whole
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        for file_name, extra in (extra_tensors or {}).items():
            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(staging / file_name))
    return directory


def _adapter_config_json(directory) -> tuple[Path, dict]:
    """(path, the JSON object) of a directory's adapter_config.json, read by the checked reader (models/fields.py);
    AdapterError in one line if it is not one."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{path}: no such file (is {directory} a PEFT adapter directory?)")
    return path, read_json_object(path, AdapterError)


def _read_adapter_config(directory: Path) -> tuple[int, float, float, tuple[str, ...]]:
    """(r, lora_alpha, lora_dropout, targets) from adapter_config.json; PEFT options this LoRA does not implement
    are refused rather than ignored (they would change what the adapter computes)."""
    path, config = _adapter_config_json(directory)
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are supported")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise AdapterError(f'{path}: missing key "{key}"')
    # Options that change what the adapter computes; a value other than off/empty is refused, not ignored.
    for key in ("use_dora", "use_rslora", "fan_in_fan_out", "bias", "lora_bias", "modules_to_save",
                "layers_to_transform", "rank_pattern", "alpha_pattern", "exclude_modules", "target_parameters",
                "layer_replication", "trainable_token_indices", "use_qalora", "alora_invocation_tokens"):
        value = config.get(key)
        if value not in (None, False, "none", [], {}):
            raise AdapterError(f"{path}: {key}={value!r} is not supported by this LoRA")
    rank, alpha = config["r"], config["lora_alpha"]
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 < rank <= MAX_DIMENSION:
        raise AdapterError(f"{path}: r must be a positive integer, got {show(rank)}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < math.inf:
        raise AdapterError(f"{path}: lora_alpha must be a positive number, got {show(alpha)}")
    target_modules = config["target_modules"]
    if not isinstance(target_modules, (str, list)) or \
            (isinstance(target_modules, list) and not all(isinstance(t, str) for t in target_modules)):
        raise AdapterError(f"{path}: target_modules must be a list of names or 'all-linear', got "
                           f"{show(target_modules)}")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        raise AdapterError(f"{path}: target_modules {target_modules!r} is a regular expression; only a list of "
                           f"names from {list(TARGET_NAMES)} or 'all-linear' is supported")
    try:
        targets = resolve_targets(target_modules)
    except ValueError as error:
        raise AdapterError(f"{path}: target_modules: {error}") from None
    dropout = number(config, "lora_dropout", path, AdapterError, default=0.0, low=0.0, high=0.999999)
    return rank, alpha, float(dropout), targets


def adapter_base_model(directory) -> Path:
    """The base model an adapter was trained on: its adapter_config.json's base_model_name_or_path, when that is a
    model directory here (train.py writes the path it trained from); AdapterError in one line otherwise (a hub id,
    a path from another machine, none at all: then the model must be named)."""
    path, config = _adapter_config_json(directory)
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not (Path(base) / "config.json").is_file():
        raise AdapterError(f"{path}: base_model_name_or_path {base!r} is not a model directory here; pass --model "
                           f"DIR (the model the adapter was trained on)")
    return Path(base)


def load_adapter(model: nn.Module, directory):
    """Load a PEFT LoRA adapter (ours or PEFT's) into `model` and return it. A model without LoRA gets it
    (add_lora with the config's r, lora_alpha, lora_dropout, target_modules); a model with LoRA must match the
    config's r, lora_alpha and targets. Every missing, unexpected or mis-shaped key is an error; when one is
    raised after add_lora, the model keeps fresh LoRA layers (B = 0, so it still computes the base model)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"{directory}: no such adapter directory")
    try:  # ours carry a manifest: a file cut short or altered is named before it is parsed (PEFT's have none)
        verify_directory(directory, required=False)
    except IntegrityError as error:
        raise AdapterError(str(error)) from None
    rank, alpha, dropout, targets = _read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        found = sorted(p.name for p in directory.glob("adapter_model.*"))
        hint = f" (found {', '.join(found)}: only safetensors is read)" if found else ""
        raise AdapterError(f"{directory}: missing {ADAPTER_WEIGHTS}{hint}")
    bound, layer = max_rank(model, targets)
    if bound and rank > bound:
        raise AdapterError(f"{directory / ADAPTER_CONFIG}: r {rank} exceeds min(in, out) = {bound} of {layer}: "
                           f"an adapter for another model?")
    if lora_modules(model):
        have_rank, have_alpha, _, have_targets = _adapter_settings(model)
        if (have_rank, have_alpha, have_targets) != (rank, alpha, targets):
            raise AdapterError(
                f"{directory / ADAPTER_CONFIG}: adapter has r={rank}, lora_alpha={alpha}, targets={list(targets)} "
                f"but the model's LoRA has r={have_rank}, alpha={have_alpha}, targets={list(have_targets)}")
    else:
        add_lora(model, rank, alpha, dropout, targets)

    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            state = {key: f.get_tensor(key) for key in f.keys()}  # PEFT's key names
    except SafetensorError as error:
        raise AdapterError(f"{weights}: not a readable safetensors file ({error})") from None
    return load_lora_state_dict(model, state, source=str(weights), rename=_peft_key)


__all__ = ["save_adapter", "load_adapter", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX"]
