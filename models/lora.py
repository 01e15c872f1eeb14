"""Hand-written LoRA (Hu et al., 2021) for the Mistral decoder, with adapters in PEFT's on-disk format.

A target linear layer x -> W0 x becomes

    x -> W0 x + (lora_alpha / r) * B A dropout(x),    A: [r, in], B: [out, r]

with W0 frozen, A Kaiming-uniform (as PEFT initialises it) and B zero, so at step 0 the model is exactly the base
model. Setting a layer's `disabled` flag drops the LoRA term, so the same module also computes the frozen reference
policy that DPO and SPL need (`with disable_lora(model): ref_logits = model(tokens)`), as torchtune's
`disable_adapter` does.

`LoRALinear` holds the base `weight` itself (torchtune's layout), so `layers.0.self_attn.q_proj.weight` keeps its
name and the base checkpoint loads into a LoRA model unchanged; the adapter lives in `...q_proj.lora_A.weight` and
`...q_proj.lora_B.weight`, the names PEFT uses once it drops its adapter name "default".

Numerics: the LoRA parameters (and so their gradients and optimizer state) are float32 whatever the base weight's
dtype. The branch casts its input to float32, computes B A x in float32, and casts the scaled result to the base
output's dtype before the sum, which is what PEFT does on a bf16 base (it keeps adapters in float32 by default).
On such a base the branch runs as one autograd Function (`_LoRABranch`) that keeps the bf16 input for the backward
pass rather than a float32 copy per target (see there: at Mistral-7B's shape those copies weigh as much as all other
activations together).
`merge_lora` forms W0 + (alpha / r) B A in float32 and casts once, back to W0's dtype.

On disk (`save_adapter` / `load_adapter`): `adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<HF module name>.lora_{A,B}.weight`, where the HF module name comes from `models/checkpoint.py`'s
name table and `base_model.model.` is the path PEFT's wrappers put around the HF model
(PeftModelForCausalLM.base_model -> LoraModel.model -> MistralForCausalLM).
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from models.checkpoint import CheckpointError, ours_to_hf, raise_key_problems
from models.files import IntegrityError, publish_directory, verify_directory

TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel) .model (the HF model)


class AdapterError(CheckpointError):
    """An adapter directory or config that cannot be saved or loaded as it is; the message says which and why."""


class LoRALinear(nn.Module):
    """x -> W0 x + (alpha / r) * B A dropout(x), with W0 [out, in] frozen, A [r, in] and B [out, r] trainable.

    `weight` is the base layer's weight, reused (not copied) and frozen. A and B are float32 `nn.Linear`s
    without bias, named `lora_A` / `lora_B` like PEFT's; dropout acts on the LoRA branch only.
    """

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.rank, self.alpha, self.dropout_p = rank, alpha, dropout
        self.scaling = alpha / rank
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        self.weight.requires_grad_(False)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=weight.device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        """A ~ kaiming_uniform(a=sqrt(5)) (PEFT's and nn.Linear's default), B = 0: the update B A starts at zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        out = F.linear(x, self.weight)  # (..., out), base dtype
        if self.disabled:
            return out
        if x.dtype == self.lora_A.weight.dtype:  # a float32 base: nothing to cast, autograd keeps x itself
            update = self.lora_B(self.lora_A(self.lora_dropout(x)))  # (..., r) -> (..., out), float32
        else:  # a bf16 base: the same float32 math, keeping x (not a float32 copy of it) for the backward pass
            keep = None
            if self.training and self.dropout_p > 0:
                keep = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - self.dropout_p)  # (..., in)
            update = _LoRABranch.apply(x, self.lora_A.weight, self.lora_B.weight, keep, 1 / (1 - self.dropout_p))
        return out + (self.scaling * update).to(out.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W0 + (alpha / r) B A, summed in float32 and cast back to W0's dtype ([out, in])."""
        delta = self.lora_B.weight @ self.lora_A.weight  # (out, r) @ (r, in) -> (out, in), float32
        return (self.weight.float() + self.scaling * delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.dropout_p}, disabled={self.disabled}")


class _LoRABranch(torch.autograd.Function):
    """update = B A dropout(float32(x)) for x in a lower precision: x [..., in], A [r, in], B [out, r], keep None or
    a bool [..., in] dropout mask (kept entries scaled by keep_scale = 1 / (1 - p)) -> float32 [..., out].

    A's gradient needs the layer's input. Written through autograd, `lora_A(x.float())` keeps a float32 copy of
    it for every target: q, k and v each their own copy of the same input, gate and up too. At Mistral-7B's shape
    (8 x 1024 tokens) that is ~1.2 GB per layer, ~39 GB over 32 layers, as much as every other activation
    together. This Function keeps x itself (bf16, one tensor shared by the targets that read it: ~0.4 GB per
    layer), the mask (one byte per element) and u = A x [..., r], and redoes the cast in the backward pass:

        dB = g^T u,   du = g B,   dA = du^T dropout(float32(x)),   dx = dropout'(du A)   (g = d loss / d update)
    """

    @staticmethod
    def forward(ctx, x, weight_A, weight_B, keep, keep_scale):
        x32 = x.float()  # (..., in)
        if keep is not None:
            x32 = x32 * keep * keep_scale  # dropout
        u = F.linear(x32, weight_A)  # (..., r)
        ctx.keep_scale = keep_scale
        ctx.save_for_backward(x, weight_A, weight_B, keep, u)
        return F.linear(u, weight_B)  # (..., out)

    @staticmethod
    def backward(ctx, grad):  # grad (..., out), float32
        x, weight_A, weight_B, keep, u = ctx.saved_tensors
        grad = grad.float()
        grad_u = grad @ weight_B  # (..., r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[2]:
            grad_B = grad.reshape(-1, grad.shape[-1]).T @ u.reshape(-1, u.shape[-1])  # (out, r)
        if ctx.needs_input_grad[1]:
            x32 = x.float()  # (..., in), recomputed
            if keep is not None:
                x32 = x32 * keep * ctx.keep_scale
            grad_A = grad_u.reshape(-1, grad_u.shape[-1]).T @ x32.reshape(-1, x32.shape[-1])  # (r, in)
        if ctx.needs_input_grad[0]:
            grad_x = grad_u @ weight_A  # (..., in)
            if keep is not None:
                grad_x = grad_x * keep * ctx.keep_scale
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_A, grad_B, None, None


def _resolve_targets(targets) -> tuple[str, ...]:
    """Canonical target tuple from 'all-linear' (PEFT's spelling: every linear layer but the output head), one
    name, or a sequence of names."""
    if isinstance(targets, str):
        targets = TARGET_NAMES if targets == "all-linear" else (targets,)
    targets = tuple(targets)
    unknown = sorted({t for t in targets if t not in TARGET_NAMES})
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; valid targets are {list(TARGET_NAMES)} or 'all-linear'")
    if not targets:
        raise ValueError(f"no LoRA targets given; choose from {list(TARGET_NAMES)} or 'all-linear'")
    return tuple(t for t in TARGET_NAMES if t in targets)  # canonical order, duplicates dropped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} in module order, e.g. {"layers.0.self_attn.q_proj": ...}."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def add_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets=("q_proj", "v_proj")):
    """Replace every linear layer named in `targets` by a LoRALinear (in place), freeze every other parameter
    (embeddings, norms, lm_head, base weights) and return the model. Only A and B then require grad."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"add_lora: rank must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"add_lora: alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"add_lora: dropout must be in [0, 1), got {dropout!r}")
    targets = _resolve_targets(targets)
    if lora_modules(model):
        raise ValueError("add_lora: the model already has LoRA layers (merge_lora or load a fresh model first)")
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets]
    if not chosen:
        raise ValueError(f"add_lora: no linear layer named {list(targets)} found in the model")
    for name, module in chosen:
        if module.bias is not None:
            raise ValueError(f"add_lora: {name} has a bias; LoRALinear wraps bias-free layers only")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name, module in chosen:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lora = LoRALinear(module.weight, rank, alpha, dropout).train(module.training)  # keep train/eval mode
        setattr(parent, child_name, lora)
    return model


@contextlib.contextmanager
def disable_lora(model: nn.Module):
    """Turn every LoRA branch off for the block, so the model computes its base (reference) policy; each layer's
    previous `disabled` flag is restored on exit, also when the block raises."""
    modules = list(lora_modules(model).values())
    if not modules:
        raise ValueError("disable_lora: the model has no LoRA layers (call add_lora or load_adapter first)")
    previous = [module.disabled for module in modules]
    try:
        for module in modules:
            module.disabled = True
        yield model
    finally:
        for module, flag in zip(modules, previous):
            module.disabled = flag


def merge_lora(model: nn.Module):
    """Fold W0 + (alpha / r) B A into each base weight and put a plain bias-free nn.Linear in place of every
    LoRALinear, so `save_pretrained` writes an ordinary HF checkpoint. The merged weights stay frozen (as W0 was);
    returns the model."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("merge_lora: the model has no LoRA layers")
    disabled = [name for name, module in modules.items() if module.disabled]
    if disabled:
        raise ValueError(f"merge_lora: LoRA is disabled on {disabled[0]} (inside disable_lora?); merge outside it")
    for name, module in modules.items():
        linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")  # no throwaway init
        with torch.no_grad():
            linear.weight = nn.Parameter(module.merged_weight(), requires_grad=False)  # base dtype and device
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, linear.train(module.training))
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (A and B of every LoRA layer), for the optimizer."""
    return [p for module in lora_modules(model).values() for p in (module.lora_A.weight, module.lora_B.weight)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{"layers.0.self_attn.q_proj.lora_A.weight": A, ...}: the adapter alone, for checkpoints (detached)."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{name}.lora_A.weight"] = module.lora_A.weight.detach()
        state[f"{name}.lora_B.weight"] = module.lora_B.weight.detach()
    return state


def load_lora_state_dict(model: nn.Module, state: dict, source: str = "state dict", rename=lambda name: name):
    """Copy `state` ({rename(our name): tensor}, our names as in lora_state_dict) into the model's LoRA parameters,
    cast to their dtype (float32); raise listing every missing, unexpected or mis-shaped key (as named in `state`).
    Nothing is copied unless every key checks out."""
    expected = {rename(f"{name}.lora_{ab}.weight"): getattr(module, f"lora_{ab}").weight
                for name, module in lora_modules(model).items() for ab in ("A", "B")}
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    misshaped = [f"{name}: {tuple(state[name].shape)}, model expects {tuple(p.shape)}"
                 for name, p in expected.items() if name in state and state[name].shape != p.shape]
    raise_key_problems(source, missing, unexpected, misshaped, error=AdapterError)
    with torch.no_grad():
        for name, parameter in expected.items():
            parameter.copy_(state[name])
    return model


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
    return rank, alpha, dropout, _resolve_targets({name.rsplit(".", 1)[-1] for name in modules})


def save_adapter(model: nn.Module, directory, base_model_name_or_path: str | None = None, overwrite: bool = False):
    """Write the adapter as PEFT does: `adapter_config.json` + `adapter_model.safetensors` (float32 A and B).

    Published atomically with a manifest (models/files.py), so an interrupted save leaves no half-written adapter
    and load_adapter verifies it; an existing directory is refused unless `overwrite=True`. Returns its Path.
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
    return directory


def _read_adapter_config(directory: Path) -> tuple[int, float, float, tuple[str, ...]]:
    """(r, lora_alpha, lora_dropout, targets) from adapter_config.json; PEFT options this LoRA does not implement
    are refused rather than ignored (they would change what the adapter computes)."""
    path = directory / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path}: no such file (is {directory} a PEFT adapter directory?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
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
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise AdapterError(f"{path}: r must be a positive integer, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise AdapterError(f"{path}: lora_alpha must be a positive number, got {alpha!r}")
    target_modules = config["target_modules"]
    if isinstance(target_modules, str) and target_modules != "all-linear":
        raise AdapterError(f"{path}: target_modules {target_modules!r} is a regular expression; only a list of "
                           f"names from {list(TARGET_NAMES)} or 'all-linear' is supported")
    try:
        targets = _resolve_targets(target_modules)
    except ValueError as error:
        raise AdapterError(f"{path}: target_modules: {error}") from None
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    return rank, alpha, dropout, targets


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


__all__ = ["LoRALinear", "AdapterError", "TARGET_NAMES", "add_lora", "disable_lora", "merge_lora", "lora_modules",
           "lora_parameters", "lora_state_dict", "load_lora_state_dict", "save_adapter", "load_adapter"]
