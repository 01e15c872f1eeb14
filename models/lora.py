"""Hand-written LoRA (Hu et al., 2021) for the Mistral decoder: the layer, its autograd function, model surgery.

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
activations together). With dropout it runs as that Function on a float32 base too, keeping a one-byte mask where
nn.Dropout and the adapter's linear layer would keep two float32 tensors per target. The MLP's down projection
takes its input as gate and up (`LoRALinear.from_swiglu`, `_SwiGLULoRA`) and recomputes their product in the
backward pass instead of keeping it.
`merge_lora` forms W0 + (alpha / r) B A in float32 and casts once, back to W0's dtype.

Tied embeddings (`tie_word_embeddings: true`, SmolLM2): the head's W0 is the embedding's tensor. LoRA on `lm_head`
adapts the head only, as PEFT does (the embedding lookup keeps W0), and the fused log-probs read `output_weight`,
the merged head, never the embedding. Merging such a head cannot keep the tie: W0 + (alpha / r) B A is no longer the
embedding. `merge_lora` therefore gives the head its own merged weight and sets `tie_word_embeddings` to false, so
the model (and what save_pretrained writes) computes exactly what the adapted one did. PEFT's `merge_and_unload`
instead adds B A into the shared tensor, changing the embedding too (it warns, and recommends untying first:
what is done here); its config stays tied only because the two modules still share that one changed tensor.

The adapter on disk, in PEFT's format, is models/peft.py's (`save_adapter` / `load_adapter`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.bf16 import frozen_input_grad, frozen_linear, frozen_product
from models.checkpoint import CheckpointError, raise_key_problems
from models.mistral import swiglu

TARGET_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The output head is a target too when named (PEFT's `target_modules=[..., "lm_head"]`), never in "all-linear"
# (PEFT's rule). The fused log-probs (spl/logprobs.py) read the head's weight outside its forward: they take
# `output_weight(model)`, the merged W0 + (alpha / r) B A while the branch is on, the base weight otherwise.
HEAD_TARGET = "lm_head"


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
        self.disabled = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        """A ~ kaiming_uniform(a=sqrt(5)) (PEFT's and nn.Linear's default), B = 0: the update B A starts at zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        if self.disabled:
            return frozen_linear(x, self.weight)  # (..., out), base dtype
        keep = self._dropout_mask(x)  # (..., in) bool, or None: no dropout
        if x.dtype == self.lora_A.weight.dtype and keep is None:  # a float32 base: autograd keeps x itself
            flat = x.reshape(-1, self.in_features)  # (N, in)
            u = self.lora_A(flat)  # (N, r)
            # out += scaling * u B^T inside the GEMM (beta = 1): no (N, out) temporaries for the scale and the sum,
            # which at a small D cost as much as the rank-r GEMM itself. In place is safe: F.linear's backward
            # needs x and W, never its output (a fresh 2-D tensor, not a view, whose in-place backward would copy).
            out = F.linear(flat, self.weight).addmm_(u, self.lora_B.weight.T, alpha=self.scaling)  # (N, out)
            return out.view(*x.shape[:-1], self.out_features)
        # A bf16 base, or dropout: the branch as one Function that keeps x (not a float32 copy of it, nor the dropped
        # copy and the float mask nn.Dropout keeps: two [..., in] floats per target) and the one-byte mask.
        update = _LoRABranch.apply(x, self.lora_A.weight, self.lora_B.weight, keep, 1 / (1 - self.dropout_p))
        out = frozen_linear(x, self.weight)  # (..., out), base dtype (float32 GEMMs on a CPU without bf16 units)
        if out.dtype == update.dtype:
            return out.add_(update, alpha=self.scaling)  # in place, as above
        return out + (self.scaling * update).to(out.dtype)

    def from_swiglu(self, gate, up):
        """self(silu(gate) * up): models.mistral.MLP's down projection. With the branch on, through `_SwiGLULoRA`,
        which keeps gate and up (and dropout's one-byte mask) but not their [..., in] product."""
        fusable = not self.disabled and torch.is_grad_enabled() and gate.dtype == up.dtype == self.weight.dtype
        if not fusable:
            return self(swiglu(gate, up))
        return _SwiGLULoRA.apply(gate, up, self.weight, self.lora_A.weight, self.lora_B.weight, self.scaling,
                                 self._dropout_mask(gate), 1 / (1 - self.dropout_p))

    def _dropout_mask(self, x):
        """Dropout's keep mask for the branch's input x, bool (one byte per entry), or None when dropout is off. It is
        the mask F.dropout draws from the same seed (a bool tensor's bernoulli_ takes the same draws)."""
        if not (self.training and self.dropout_p > 0):
            return None
        return torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - self.dropout_p)

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
        x32 = x.to(weight_A.dtype)  # (..., in): float32 (float64 in float64 tests); itself for a float32 x
        if keep is not None:
            x32 = x32 * keep * keep_scale  # dropout
        u = F.linear(x32, weight_A)  # (..., r)
        ctx.keep_scale = keep_scale
        ctx.save_for_backward(x, weight_A, weight_B, keep, u)
        return F.linear(u, weight_B)  # (..., out)

    @staticmethod
    def backward(ctx, grad):  # grad (..., out), float32
        x, weight_A, weight_B, keep, u = ctx.saved_tensors
        grad = grad.to(weight_A.dtype)
        grad_u = grad @ weight_B  # (..., r)
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[2]:
            grad_B = grad.reshape(-1, grad.shape[-1]).T @ u.reshape(-1, u.shape[-1])  # (out, r)
        if ctx.needs_input_grad[1]:
            x32 = x.to(weight_A.dtype)  # (..., in), recomputed
            if keep is not None:
                x32 = x32 * keep * ctx.keep_scale
            grad_A = grad_u.reshape(-1, grad_u.shape[-1]).T @ x32.reshape(-1, x32.shape[-1])  # (r, in)
        if ctx.needs_input_grad[0]:
            grad_x = grad_u @ weight_A  # (..., in)
            if keep is not None:
                grad_x = grad_x * keep * ctx.keep_scale
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_A, grad_B, None, None


class _SwiGLULoRA(torch.autograd.Function):
    """out = W0 p + s B A dropout(p) with p = silu(gate) * up: the MLP's SwiGLU and its LoRA down projection in one
    Function. gate, up [..., F] and W0 [D, F] (frozen) in the base's dtype; A [r, F], B [D, r] float32 (the
    adapter's); s = alpha / r; keep None or dropout's bool mask [..., F], kept entries scaled by keep_scale =
    1 / (1 - dropout).

    Written as `down_proj(swiglu(gate, up))`, autograd keeps gate and up (SwiGLU's backward) and also the product p
    (A's gradient reads the branch's input; with dropout on a float32 base, the dropped copy and a float mask as
    well). p is silu(gate) * up, one elementwise pass from what is kept anyway, so this Function keeps gate, up, the
    mask and u = A dropout(p) [..., r], and recomputes p in the backward pass: at SmolLM2's shape 9% less saved
    activation memory (docs/speed.md), at Mistral-7B's one [N, 14336] tensor per layer. With g = dL/dout:

        g_p = g W0 + dropout'(s (g B) A)      dA = s (g B)^T dropout(p)      dB = s g^T u
        d gate = silu_backward(g_p * up, gate)            d up = g_p * silu(gate)

    the branch in float32 as LoRALinear computes it (p upcast; its input gradient rounded to the base's dtype), the
    frozen product as models/bf16.py runs it. Forward values are those of the unfused modules (the same kernels in
    the same order, the same dropout mask for a seed); gradients differ by summation order
    (tests/test_models_lora.py).
    """

    @staticmethod
    def forward(ctx, gate, up, weight, weight_A, weight_B, scaling, keep, keep_scale):
        p = F.silu(gate) * up  # (..., F), base dtype
        flat = p.reshape(-1, p.shape[-1])  # (N, F)
        branch_in = flat.to(weight_A.dtype)  # float32 (itself on a float32 base)
        if keep is not None:
            branch_in = branch_in * keep.reshape(flat.shape) * keep_scale  # dropout(p)
        u = F.linear(branch_in, weight_A)  # (N, r)
        if flat.dtype == weight_A.dtype:  # as LoRALinear.forward on a float32 base
            out = F.linear(flat, weight).addmm_(u, weight_B.T, alpha=scaling)  # (N, D)
        else:  # as LoRALinear.forward on a bf16 base
            out = frozen_product(flat, weight) + (scaling * F.linear(u, weight_B)).to(flat.dtype)  # (N, D)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        ctx.save_for_backward(gate, up, weight, weight_A, weight_B, u, keep)
        return out.view(*p.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):  # grad (..., D), base dtype
        gate, up, weight, weight_A, weight_B, u, keep = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # (N, D)
        g32 = g.to(weight_A.dtype)  # (N, D) the branch's upstream gradient, float32
        gB = (g32 @ weight_B).mul_(ctx.scaling)  # (N, r)  s g B
        silu = F.silu(gate).reshape(-1, gate.shape[-1])  # (N, F), recomputed, base dtype
        up, mask = up.reshape(silu.shape), None if keep is None else keep.reshape(silu.shape)
        grad_A = grad_B = grad_gate = grad_up = None
        if ctx.needs_input_grad[3]:
            branch_in = (silu * up).to(weight_A.dtype)  # p, recomputed
            if mask is not None:
                branch_in = branch_in.mul_(mask).mul_(ctx.keep_scale)  # dropout(p)
            grad_A = gB.T @ branch_in  # (r, F)
        if ctx.needs_input_grad[4]:
            grad_B = (g32.T @ u).mul_(ctx.scaling)  # (D, r)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            if mask is None and g.dtype == weight_A.dtype:
                grad_p = (g @ weight).addmm_(gB, weight_A)  # (N, F)  g W0 + s (g B) A, one GEMM's sum
            else:
                branch = gB @ weight_A  # (N, F) float32
                if mask is not None:
                    branch = branch.mul_(mask).mul_(ctx.keep_scale)
                grad_p = frozen_input_grad(g, weight).add_(branch.to(g.dtype))
            if ctx.needs_input_grad[0]:
                grad_gate = torch.ops.aten.silu_backward(grad_p * up, gate.reshape(silu.shape)).view(gate.shape)
            if ctx.needs_input_grad[1]:
                grad_up = grad_p.mul_(silu).view(gate.shape)  # in place: grad_p is not read again
        return grad_gate, grad_up, None, grad_A, grad_B, None, None, None


def resolve_targets(targets) -> tuple[str, ...]:
    """Canonical target tuple from 'all-linear' (PEFT's spelling: every linear layer but the output head), one
    name, or a sequence of names."""
    if isinstance(targets, str):
        targets = TARGET_NAMES if targets == "all-linear" else (targets,)
    targets = tuple(targets)
    valid = (*TARGET_NAMES, HEAD_TARGET)
    unknown = sorted({t for t in targets if t not in valid})
    if unknown:
        raise ValueError(f"unknown LoRA target(s) {unknown}; valid targets are {list(valid)} or 'all-linear'")
    if not targets:
        raise ValueError(f"no LoRA targets given; choose from {list(valid)} or 'all-linear'")
    return tuple(t for t in valid if t in targets)  # canonical order, duplicates dropped


def check_head_dropout(targets, dropout, targets_name: str = "target", dropout_name: str = "dropout") -> None:
    """The one rule for the output head: LoRA on lm_head needs dropout 0, since the fused log-probs use its merged
    weight (`output_weight`), which has no dropout. ValueError naming the options as the caller calls them
    (train.py's --lora-targets / --lora-dropout, add_lora's target / dropout)."""
    if HEAD_TARGET in targets and dropout:
        raise ValueError(f"{targets_name} {HEAD_TARGET} needs {dropout_name} 0 (the fused log-probs use its merged "
                         f"weight, which has no dropout), got {dropout!r}")


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
    targets = resolve_targets(targets)
    check_head_dropout(targets, dropout, "add_lora: target", "dropout")
    if lora_modules(model):
        raise ValueError("add_lora: the model already has LoRA layers (merge_lora or load a fresh model first)")
    bound, layer = max_rank(model, targets)
    if bound and rank > bound:
        raise ValueError(f"add_lora: rank {rank} exceeds min(in, out) = {bound} of {layer}")
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


def max_rank(model: nn.Module, targets) -> tuple[int, str]:
    """(the largest useful LoRA rank for `targets`, the layer that bounds it): B A has rank at most
    min(in, out) of each target, so a larger rank adds parameters and memory but no capacity."""
    targets = resolve_targets(targets)
    bounds = [(min(module.weight.shape), name) for name, module in model.named_modules()
              if name.rsplit(".", 1)[-1] in targets and hasattr(module, "weight") and module.weight.dim() == 2]
    return min(bounds) if bounds else (0, "")


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
    returns the model. A tied head that was a target is untied (the module docstring says why)."""
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
    config = getattr(model, "config", None)
    if HEAD_TARGET in modules and getattr(config, "tie_word_embeddings", False):
        model.config = dataclasses.replace(config, tie_word_embeddings=False)  # the head has its own weight now
    return model


def output_weight(model: nn.Module) -> torch.Tensor:
    """The output head's weight [V, D] as the model's forward applies it: W0 + (alpha / r) B A (differentiable in A
    and B) when the head is a LoRA target and its branch is on, else the head's own weight."""
    head = model.lm_head
    if isinstance(head, LoRALinear) and not head.disabled:
        return head.merged_weight()  # (V, D) base dtype
    return head.weight


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


__all__ = ["LoRALinear", "AdapterError", "TARGET_NAMES", "HEAD_TARGET", "output_weight", "check_head_dropout", "resolve_targets", "add_lora", "disable_lora", "merge_lora",
           "lora_modules", "lora_parameters", "lora_state_dict", "load_lora_state_dict"]
