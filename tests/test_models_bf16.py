"""models/bf16.py: bf16 weights with float32 products on a CPU without bf16 matrix units.

Oracles: the float32 model on the same (bf16-rounded) weights, for the loss and every LoRA gradient of one SPL step
within bf16's tolerance; PyTorch's own bf16 kernels (SPL_NATIVE_BF16=1) within the same tolerance; the saved
tensors of the frozen linear (the bf16 weight itself, no float32 copy); exact float32 products for a case whose
sum is exact.
"""
import pytest
import torch

from eval.bench.step import Shape, make_batch
from models import Mistral, add_lora
from models.bf16 import frozen_linear, native_bf16
from models.lora import TARGET_NAMES
from spl.step import Objective, preference_step, reference_logprobs

SHAPE = Shape(dim=64, layers=2, ffn=96, heads=4, kv_heads=2, vocab=300, rank=4, pairs=2, seq=24, prompt=6)


def spl_step(dtype, native: str, monkeypatch):
    """Loss and LoRA gradients of one SPL step of the same random model in `dtype` (weights rounded to bf16 first,
    so float32 computes on the very weights bf16 holds)."""
    monkeypatch.setenv("SPL_NATIVE_BF16", native)
    torch.manual_seed(0)
    model = Mistral(SHAPE.config()).init_weights(std=0.1, generator=torch.Generator().manual_seed(0))
    model = model.to(torch.bfloat16).to(dtype)
    model = add_lora(model, SHAPE.rank, 8.0, 0.0, TARGET_NAMES)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B != 0, so every LoRA gradient depends on the products under test
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    batch = make_batch(SHAPE, torch.device("cpu"))
    ref_chosen, ref_rejected = reference_logprobs(model, batch, compile=False)
    loss, _, _ = preference_step(model, batch, ref_chosen, ref_rejected, Objective("spl", 0.2, 0.1), compile=False)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def relative(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_float32_products_match_float32_and_native_bf16(monkeypatch):
    """The fallback (SPL_NATIVE_BF16=0) and PyTorch's bf16 kernels (=1) both agree with float32 within bf16's
    tolerance (2^-8 relative per rounding; observed, both ways: 4e-3 on the loss, 2.6e-2 on the worst gradient)."""
    loss32, grads32 = spl_step(torch.float32, "0", monkeypatch)
    for native in ("0", "1"):
        loss, grads = spl_step(torch.bfloat16, native, monkeypatch)
        assert abs(loss.item() - loss32.item()) <= 1e-2 * abs(loss32.item()), native
        assert grads.keys() == grads32.keys()
        for name in grads:
            assert grads[name].dtype == torch.float32  # LoRA stays float32
            assert relative(grads[name], grads32[name]) < 5e-2, (native, name)


def test_frozen_linear_keeps_the_bf16_weight_and_rounds_like_bf16(monkeypatch):
    """Products of small integers are exact in every dtype, so the float32 path equals the bf16 kernel bit for bit;
    the backward pass keeps the bf16 weight itself (no float32 copy) and gives its exact input gradient."""
    monkeypatch.setenv("SPL_NATIVE_BF16", "0")
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(-4, 5, (5, 16), generator=generator).to(torch.bfloat16).requires_grad_()
    weight = torch.randint(-4, 5, (8, 16), generator=generator).to(torch.bfloat16)
    y = frozen_linear(x, weight)
    assert y.dtype == torch.bfloat16 and torch.equal(y, torch.nn.functional.linear(x.detach(), weight))
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].dtype == torch.bfloat16 and saved[0].data_ptr() == weight.data_ptr()
    grad = torch.randint(-4, 5, (5, 8), generator=generator).to(torch.bfloat16)
    y.backward(grad)
    assert torch.equal(x.grad, grad @ weight)


@pytest.mark.parametrize("forced, expected", [("0", False), ("1", True)])
def test_native_bf16_can_be_forced(monkeypatch, forced, expected):
    monkeypatch.setenv("SPL_NATIVE_BF16", forced)
    assert native_bf16(torch.device("cpu")) is expected


def test_start_up_line_says_what_bf16_does_on_this_cpu(monkeypatch):
    """Invariant: train.py's summary line names the float32 products exactly when models/bf16.py takes that path
    (`native_bf16` false), and says nothing for float32 runs or bf16 kernels."""
    import torch

    from models.bf16 import native_bf16
    from spl.config import describe, parse_args
    cpu = torch.device("cpu")
    for forced in ("0", "1"):
        monkeypatch.setenv("SPL_NATIVE_BF16", forced)
        line = describe(parse_args(["--dtype", "bfloat16"]), 2e6, {}, 10, 30, 1, cpu)
        assert ("products run in float32" in line) == (not native_bf16(cpu)) == (forced == "0")
        assert "products run in float32" not in describe(parse_args([]), 2e6, {}, 10, 30, 1, cpu)


@pytest.mark.parametrize("native", ["0", "1"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_swiglu_down_projection_on_a_bf16_base_equals_the_unfused_modules(monkeypatch, native, dropout):
    """models/lora.py's `_SwiGLULoRA` on a bf16 base, float32 products here (0) and PyTorch's bf16 kernels (1): the
    output bit for bit equal to `down_proj(swiglu(gate, up))` (the same kernels in the same order, the same dropout
    mask for a seed); the gradients of gate, up, A and B equal to the unfused modules' within 1e-3 of each tensor's
    norm (sums in another order, rounded to bf16: observed equal); and the [N, F] product not kept."""
    from models.lora import LoRALinear
    from models.mistral import swiglu

    monkeypatch.setenv("SPL_NATIVE_BF16", native)
    torch.manual_seed(0)
    N, F_, D = 20, 96, 64
    layer = LoRALinear((torch.randn(D, F_) * 0.1).bfloat16(), rank=4, alpha=8.0, dropout=dropout).train()
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.1)
    gate = torch.randn(N, F_).bfloat16().requires_grad_()
    up = torch.randn(N, F_).bfloat16().requires_grad_()
    g = torch.randn(N, D).bfloat16()
    results = []
    for fused in (True, False):
        gate.grad = up.grad = None
        layer.zero_grad(set_to_none=True)
        kept = []
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((t.dtype, t.numel())) or t, lambda t: t):
            out = layer.from_swiglu(gate, up) if fused else layer(swiglu(gate, up))
        (out.float() * g.float()).sum().backward()
        assert kept.count((torch.bfloat16, N * F_)) == (2 if fused else 3)
        results.append([out.detach(), gate.grad, up.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad])
    assert out.dtype == torch.bfloat16 and torch.equal(results[0][0], results[1][0])
    for name, got, want in zip(("gate", "up", "A", "B"), results[0][1:], results[1][1:]):
        assert got.dtype == want.dtype and relative(got, want) < 1e-3, (name, relative(got, want))
