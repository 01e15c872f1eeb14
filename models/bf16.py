"""bfloat16 weights on a CPU without bfloat16 matrix units: keep the storage, run the products in float32.

A bf16 GEMM is fast where the hardware multiplies bf16 (GPU tensor cores; x86 CPUs with AVX512-BF16 or AMX).
Elsewhere PyTorch's CPU kernels convert element by element inside the product, and the rate collapses: on this
project's AMD EPYC (AVX2 only), one thread, 1024^3 products measured

    float32 (any layout)            ~70 GFLOP/s
    bfloat16  a @ b.T (F.linear)    9.4 GFLOP/s      a @ b  0.9      a.T @ b  14.7
    bfloat16 upcast, float32 GEMM   69 GFLOP/s       (a.float() @ b.float().T).bfloat16()

and bf16 SDPA runs at a quarter of float32's rate. So on such a CPU the products of a bf16 model run here on float32
copies of their operands: the weights are converted per call (D x F elements, against the N x D x F multiply-adds
of the product itself), the result is rounded back to bf16. The values are those of a bf16 GEMM that accumulates in
float32, which is what the bf16 kernels compute, up to the order of the sum (every product of two bf16 numbers is
exact in float32); the tests compare both against the float32 model within bf16's tolerance.

`native_bf16(device)` says which case holds; `SPL_NATIVE_BF16=1` (or `=0`) forces it either way.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F


@functools.cache
def _cpu_has_bf16_units() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 products should run as bf16 on `device` (True but on a CPU without bf16 units)."""
    forced = os.environ.get("SPL_NATIVE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    return device.type != "cpu" or _cpu_has_bf16_units()


def bf16_note(device) -> str:
    """What a bf16 model does on `device`, for train.py's start-up line: nothing to say but on a CPU without bf16
    matrix units."""
    if native_bf16(torch.device(device)):
        return ""
    return " (bfloat16 weights; no bf16 matrix units on this CPU, so products run in float32: models/bf16.py)"


def upcast(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s products go through float32 here: a bf16 tensor where bf16 is not native."""
    return tensor.dtype == torch.bfloat16 and not native_bf16(tensor.device)


def frozen_product(x, weight):
    """x W^T for a frozen W, the value `frozen_linear` computes (no autograd): in float32 where bf16 is not native."""
    if upcast(x):
        return F.linear(x.float(), weight.float()).to(x.dtype)  # (..., out)
    return F.linear(x, weight)


def frozen_input_grad(grad, weight):
    """g W, the input gradient of `frozen_linear` for an upstream gradient g [..., out]: the same rule."""
    if upcast(grad):
        return (grad.float() @ weight.float()).to(grad.dtype)  # (..., in)
    return grad @ weight


class _Float32FrozenLinear(torch.autograd.Function):
    """y = x W^T for bf16 x [..., in] and a frozen bf16 W [out, in], both products in float32, y rounded to bf16.
    Keeps W itself for the backward pass (a parameter: no copy), not its float32 copy:

        dx = (float32(g) @ float32(W)) rounded to bf16
    """

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return frozen_product(x, weight)  # (..., out)

    @staticmethod
    def backward(ctx, grad):  # grad (..., out)
        (weight,) = ctx.saved_tensors
        return frozen_input_grad(grad, weight), None  # (..., in)


def frozen_linear(x, weight):
    """F.linear(x, weight) for a weight that takes no gradient; through float32 where bf16 is not native."""
    if upcast(x) and not weight.requires_grad:
        return _Float32FrozenLinear.apply(x, weight)
    return F.linear(x, weight)


def attention(q, k, v, **kwargs):
    """F.scaled_dot_product_attention, in float32 for bf16 inputs where bf16 is not native (output in q's dtype)."""
    if upcast(q):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)
