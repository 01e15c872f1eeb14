"""The training and sampling paths on the device in SPL_TEST_DEVICE (default cpu), against float64 CPU oracles.

The suite runs these on the CPU like every other test; eval/bench/gpu.py runs them again with
SPL_TEST_DEVICE=cuda (`pytest -m device`), so the CUDA kernels (bf16 GEMMs, SDPA, torch.compile's Triton code)
are checked against the same oracles the first time a GPU is lent. Nothing here is skipped: a device that is
asked for and missing is an error.

Oracles: spl.logprobs.naive_sequence_logprobs in float64 on CPU (values and gradients); the same LoRA SPL step
computed in float64 on CPU; greedy decoding with the KV cache equal to re-running the whole sequence each step.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

from models import add_lora, build_model
from models.generate import generate
from models.lora import TARGET_NAMES
from models.mistral import MistralConfig
from spl.logprobs import naive_sequence_logprobs, sequence_logprobs
from spl.step import Objective, preference_step

pytestmark = pytest.mark.device
DEVICE = torch.device(os.environ.get("SPL_TEST_DEVICE", "cpu"))
CONFIG = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
              rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False)


def _tolerance(dtype):
    return {torch.float32: 2e-4, torch.bfloat16: 3e-2}[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_logprobs_on_device(dtype):
    """sequence_logprobs (chunked, compiled where torch.compile works) on the device equals the naive float64
    definition on CPU: values and the gradients into hidden and weight, relative to their scale."""
    generator = torch.Generator().manual_seed(0)
    B, T, D, V = 3, 40, 64, 500
    hidden = torch.randn(B, T, D, generator=generator, dtype=torch.float64)
    weight = torch.randn(V, D, generator=generator, dtype=torch.float64) / D ** 0.5
    targets = torch.randint(V, (B, T), generator=generator)
    mask = torch.rand(B, T, generator=generator) > 0.3
    g = torch.randn(B, generator=generator, dtype=torch.float64)

    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = naive_sequence_logprobs(h64, w64, targets, mask)
    (expected * g).sum().backward()

    h = hidden.to(DEVICE, dtype).requires_grad_()
    w = weight.to(DEVICE, dtype).requires_grad_()
    got = sequence_logprobs(h, w, targets.to(DEVICE), mask.to(DEVICE), chunk_size=16)
    (got * g.to(DEVICE, got.dtype)).sum().backward()
    tol = _tolerance(dtype)
    scale = float(expected.detach().abs().max())
    assert got.dtype == torch.float32
    assert torch.allclose(got.double().cpu(), expected.detach(), atol=tol * scale, rtol=0)
    for ours, oracle in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert torch.allclose(ours.double().cpu(), oracle, atol=tol * float(oracle.abs().max()), rtol=0)


def _lora_model():
    """A float64 CPU model with LoRA whose B != 0, so the LoRA branch takes part in the forward and gradients."""
    model = build_model(MistralConfig(**CONFIG), dtype=torch.float64, device=torch.device("cpu"), seed=0)
    add_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=list(TARGET_NAMES))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return model


def _batch(device):
    generator = torch.Generator().manual_seed(1)
    rows, T, prompt = 4, 24, 8  # 2 pairs: rows 0, 1 chosen, rows 2, 3 rejected
    input_ids = torch.randint(3, CONFIG["vocab_size"], (rows, T), generator=generator)
    loss_mask = torch.zeros(rows, T, dtype=torch.bool)
    loss_mask[:, prompt:] = True
    targets = torch.roll(input_ids, -1, 1)
    loss_mask[:, -1] = False
    batch = {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask,
             "attention_mask": torch.ones(rows, T, dtype=torch.bool), "chosen_prob": torch.tensor([0.75, 0.6])}
    return {k: v.to(device) for k, v in batch.items()}


def test_lora_spl_step_on_device():
    """One LoRA SPL step (loss, then gradients of every LoRA parameter) on the device in float32 equals the same
    step in float64 on CPU."""
    objective = Objective(loss="spl", alpha=0.2, beta=0.1)
    ref = (torch.tensor([-150.0, -160.0]), torch.tensor([-152.0, -158.0]))
    results = {}
    oracle = _lora_model()
    for device, dtype in ((torch.device("cpu"), torch.float64), (DEVICE, torch.float32)):
        model = copy.deepcopy(oracle).to(device, dtype)
        loss, _, _ = preference_step(model, _batch(device), ref[0].to(device, dtype), ref[1].to(device, dtype),
                                     objective, compile=False)
        loss.backward()
        grads = {n: p.grad.double().cpu() for n, p in model.named_parameters() if p.requires_grad}
        results[device.type, dtype] = (loss.detach().double().cpu(), grads)
    (loss64, grads64), (loss32, grads32) = results.values()
    assert torch.allclose(loss32, loss64, atol=1e-4, rtol=1e-4)
    assert grads64.keys() == grads32.keys() and len(grads64) == 2 * len(TARGET_NAMES) * CONFIG["num_hidden_layers"]
    for name in grads64:
        assert torch.allclose(grads32[name], grads64[name], atol=1e-4 * float(grads64[name].abs().max()) + 1e-7), name


def test_cached_greedy_decoding_on_device():
    """Greedy decoding through the KV cache on the device equals re-running the whole sequence through the
    model at every step (the argmax of the last position's logits), token for token."""
    model = build_model(MistralConfig(**CONFIG), dtype=torch.float32, device=DEVICE, seed=3).eval()
    prompt = [5, 17, 42, 7, 99]
    out = generate(model, prompt, max_new_tokens=12, num_samples=1, temperature=0.0)
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor([sequence], device=DEVICE))[0, -1]
            sequence.append(int(logits.argmax()))
    assert out.tokens[0] == sequence[len(prompt):]
