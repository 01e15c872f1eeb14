"""spl.logprobs: fused, chunked sequence log-probs against float64 references and closed forms.

Oracles: (1) the naive full-vocabulary `log_softmax(h @ W.T)` in float64 (torch's own log_softmax, gather and
autograd; no chunking, selection or hand-written gradient), (2) a closed form at hidden = 0 derived below,
(3) invariants: compiled equals eager, token log-probs sum to sequence log-probs, no_grad equals grad mode.
"""
import math
import warnings

import pytest
import torch

from spl import logprobs
from spl.logprobs import naive_sequence_logprobs, sequence_logprobs, token_logprobs

B, T, D, V = 4, 7, 16, 37  # V = 37: not a multiple of any chunk or SIMD width; B * T = 28 tokens
CHUNK = 5  # 28 tokens, 20 masked in below: chunks of 5, the last one of 1 or more


def make_batch(seed=0, scale=1.0):
    """float64 hidden [B, T, D] and weight [V, D]; targets [B, T] with -100 where masked; mask [B, T] with
    row 0 full, row 1 fully masked, row 2 a single token, row 3 a prompt then a response then padding."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=generator, dtype=torch.float64) * scale
    weight = torch.randn(V, D, generator=generator, dtype=torch.float64) / math.sqrt(D)
    targets = torch.randint(0, V, (B, T), generator=generator)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[0] = True
    mask[2, 3] = True
    mask[3, 2:6] = True
    targets = targets.masked_fill(~mask, -100)  # out of range where masked: must never be looked up
    return hidden, weight, targets, mask


def assert_relative(actual, expected, rtol, what):
    """|actual - expected| <= rtol * max|expected| elementwise: relative error measured on the tensor's scale."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual.double() - expected).abs().max().item()
    bound = rtol * expected.abs().max().item()
    assert error <= bound, f"{what}: max error {error:.3e} > {bound:.3e}"


def run(fn, hidden, weight, targets, mask, upstream, weight_requires_grad, dtype=torch.float32, **kwargs):
    """fn's output and the gradients of sum(upstream * output) for copies of hidden/weight in `dtype`."""
    hidden = hidden.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_(weight_requires_grad)
    out = fn(hidden, weight, targets, mask, **kwargs)
    (out * upstream).sum().backward()
    return out, hidden.grad, weight.grad


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("weight_requires_grad", [False, True])
def test_eager_matches_float64_reference(average, weight_requires_grad):
    """Values and gradients (hidden; weight when it requires grad) within 1e-5 relative of float64 naive.

    The upstream gradient differs per sequence, as in a preference loss. Shapes include a fully masked row
    (value 0, gradient 0), a one-token row, 20 masked-in tokens in chunks of 5 and V = 37."""
    hidden, weight, targets, mask = make_batch()
    upstream = torch.randn(B, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = run(naive_sequence_logprobs, hidden, weight, targets, mask, upstream, weight_requires_grad,
                   dtype=torch.float64, average=average)
    actual = run(sequence_logprobs, hidden, weight, targets, mask, upstream.float(), weight_requires_grad,
                 average=average, chunk_size=CHUNK, compile=False)
    assert actual[0].dtype == torch.float32
    assert_relative(actual[0], expected[0], 1e-5, "log-probs")
    assert_relative(actual[1], expected[1], 1e-5, "d/d hidden")
    if weight_requires_grad:
        assert_relative(actual[2], expected[2], 1e-5, "d/d weight")
    else:
        assert actual[2] is None  # a frozen head gets no gradient
    assert actual[0][1].item() == 0.0 and actual[1][1].abs().max().item() == 0.0  # the fully masked row
    assert actual[1][~mask].abs().max().item() == 0.0  # prompt and padding get no gradient


def test_closed_form_at_zero_hidden():
    """hidden = 0 makes every logit 0, so softmax is uniform: each token's log-prob is -log V, a row's sum
    is -n_b log V, and d logp / d h = W^T (onehot(y) - 1/V) = W[y] - mean_v W[v]; with upstream g[b] the
    gradient at a masked-in position is g[b] (W[y] - mean W), at a masked-out one 0."""
    _, weight, targets, mask = make_batch()
    hidden = torch.zeros(B, T, D, requires_grad=True)
    weight = weight.float()
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0])
    out = sequence_logprobs(hidden, weight, targets, mask, chunk_size=CHUNK, compile=False)
    (out * upstream).sum().backward()
    expected = -mask.sum(-1).double() * math.log(V)
    assert_relative(out, expected, 1e-6, "uniform log-probs")
    centred = weight.double() - weight.double().mean(0)  # [V, D]  W[v] - mean W
    expected_grad = torch.zeros(B, T, D, dtype=torch.float64)
    expected_grad[mask] = centred[targets[mask]] * upstream.double()[:, None].expand(B, T)[mask][:, None]
    assert_relative(hidden.grad, expected_grad, 1e-6, "uniform d/d hidden")


def test_extreme_logits_stay_finite_and_exact():
    """Logits spanning hundreds of nats (log-probs near -300, where exp underflows float32) stay finite
    and match float64: the kernel subtracts the log-sum-exp, never takes log of a probability."""
    hidden, weight, targets, mask = make_batch(seed=2, scale=60.0)
    upstream = torch.ones(B, dtype=torch.float64)
    expected = run(naive_sequence_logprobs, hidden, weight, targets, mask, upstream, False, dtype=torch.float64)
    assert expected[0].min().item() < -200  # the case is as extreme as claimed
    actual = run(sequence_logprobs, hidden, weight, targets, mask, upstream.float(), False,
                 chunk_size=CHUNK, compile=False)
    assert torch.isfinite(actual[0]).all() and torch.isfinite(actual[1]).all()
    assert_relative(actual[0], expected[0], 1e-5, "log-probs")
    assert_relative(actual[1], expected[1], 1e-5, "d/d hidden")


def test_token_logprobs_per_position_and_sum():
    """token_logprobs equals float64 log_softmax gathered per position, 0 where masked, with gradients; its
    row sums equal sequence_logprobs (an invariant of the two public functions)."""
    hidden, weight, targets, mask = make_batch()
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def naive_tokens(hidden, weight, targets, mask):  # [B, T], float64 when its inputs are
        logps = (hidden @ weight.T).log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return torch.where(mask, logps, 0.0)

    expected = run(naive_tokens, hidden, weight, targets, mask, upstream, True, dtype=torch.float64)
    actual = run(token_logprobs, hidden, weight, targets, mask, upstream.float(), True, chunk_size=CHUNK, compile=False)
    assert_relative(actual[0], expected[0], 1e-5, "token log-probs")
    assert actual[0][~mask].abs().max().item() == 0.0
    assert_relative(actual[1], expected[1], 1e-5, "d/d hidden")
    assert_relative(actual[2], expected[2], 1e-5, "d/d weight")
    sequence = sequence_logprobs(hidden.float(), weight.float(), targets, mask, chunk_size=CHUNK, compile=False)
    assert_relative(actual[0].detach().sum(-1), sequence.double(), 1e-6, "row sums")


def test_no_grad_matches_grad_mode_and_mask_may_be_integer():
    """Under no_grad (the reference model's pass) the forward-only path gives the same values, no graph;
    a 0/1 integer mask selects the same tokens as the bool mask."""
    hidden, weight, targets, mask = make_batch()
    hidden, weight = hidden.float().requires_grad_(), weight.float()
    with_grad = sequence_logprobs(hidden, weight, targets, mask, chunk_size=CHUNK, compile=False)
    with torch.no_grad():
        without = sequence_logprobs(hidden, weight, targets, mask.long(), chunk_size=CHUNK, compile=False)
    assert without.grad_fn is None
    torch.testing.assert_close(without, with_grad.detach(), rtol=0, atol=0)


def test_retain_graph_backward_twice_accumulates_exactly():
    """The saved per-token gradients are not consumed by backward: a second backward adds the same again."""
    hidden, weight, targets, mask = make_batch()
    hidden = hidden.float().requires_grad_()
    out = sequence_logprobs(hidden, weight.float(), targets, mask, chunk_size=CHUNK, compile=False)
    out.sum().backward(retain_graph=True)
    once = hidden.grad.clone()
    out.sum().backward()
    torch.testing.assert_close(hidden.grad, 2 * once, rtol=0, atol=0)


def test_bfloat16_inputs_float32_accumulation():
    """bfloat16 hidden and weight: float32 log-probs, bfloat16 gradients. Oracle: float64 naive on the same
    bfloat16 values. The only rounding before float32 is the logits' own bfloat16 output (relative 2^-8 per
    logit), so each token's log-prob is within 2 * 2^-8 * max|z| and a sequence within n_b times that."""
    hidden, weight, targets, mask = make_batch()
    hidden16, weight16 = hidden.bfloat16(), weight.bfloat16()
    upstream = torch.ones(B)
    out, grad_hidden, _ = run(sequence_logprobs, hidden16, weight16, targets, mask, upstream, False,
                              dtype=torch.bfloat16, chunk_size=CHUNK, compile=False)
    assert out.dtype == torch.float32 and grad_hidden.dtype == torch.bfloat16
    expected, expected_grad, _ = run(naive_sequence_logprobs, hidden16.double(), weight16.double(), targets, mask,
                                     upstream.double(), False, dtype=torch.float64)
    max_logit = (hidden16.double() @ weight16.double().T).abs().max().item()
    bound = mask.sum(-1).double() * 2 * 2 ** -8 * max_logit + 1e-6  # [B]
    assert ((out.double() - expected).abs() <= bound).all(), (out, expected, bound)
    # softmax inherits the logits' error (~2^-8 max|z| = 0.013 here), then three bfloat16 roundings
    assert_relative(grad_hidden.double(), expected_grad, 0.05, "bfloat16 d/d hidden")


def test_compiled_equals_eager_without_recompiling_for_new_lengths():
    """torch.compile'd chunks give the eager values and gradients (frozen and trainable head, and the
    no_grad path); new sequence lengths (other last-chunk sizes) reuse the compiled graphs."""
    hidden, weight, targets, mask = make_batch()
    upstream = torch.randn(B, generator=torch.Generator().manual_seed(4))
    for weight_requires_grad in (False, True):
        eager = run(sequence_logprobs, hidden, weight, targets, mask, upstream, weight_requires_grad,
                    chunk_size=CHUNK, compile=False)
        compiled = run(sequence_logprobs, hidden, weight, targets, mask, upstream, weight_requires_grad,
                       chunk_size=CHUNK, compile=True)
        for name, a, b in zip(("log-probs", "d/d hidden", "d/d weight"), compiled, eager):
            if b is not None:
                assert_relative(a, b.double(), 1e-5, f"compiled {name}")
    with torch.no_grad():
        compiled = sequence_logprobs(hidden.float(), weight.float(), targets, mask, chunk_size=CHUNK, compile=True)
    assert_relative(compiled, eager[0].detach().double(), 1e-5, "compiled no_grad log-probs")
    from torch._dynamo.utils import counters  # here: importing torch._dynamo takes ~1.7 s
    graphs = counters["stats"]["unique_graphs"]
    for length in (6, 9):  # 24 and 36 tokens in chunks of 8: chunk sizes 8 and 4, not seen before
        full = torch.ones(B, length, dtype=torch.bool)
        generator = torch.Generator().manual_seed(length)
        new_hidden = torch.randn(B, length, D, generator=generator)
        new_targets = torch.randint(0, V, (B, length), generator=generator)
        out = sequence_logprobs(new_hidden, weight.float(), new_targets, full, chunk_size=CHUNK + 3, compile=True)
        reference = naive_sequence_logprobs(new_hidden.double(), weight, new_targets, full)
        assert_relative(out, reference, 1e-5, f"compiled log-probs at T = {length}")
    assert counters["stats"]["unique_graphs"] == graphs, "a new sequence length recompiled the chunk kernels"


def test_compile_failure_falls_back_to_eager_once(monkeypatch):
    """compile=None: if the compiler fails, warn once and give the eager result; compile=True re-raises;
    SPL_NO_COMPILE=1 never tries the compiler."""
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    hidden, weight, targets, mask = make_batch()
    hidden, weight = hidden.float(), weight.float()
    eager = sequence_logprobs(hidden, weight, targets, mask, chunk_size=CHUNK, compile=False)
    broken_kernels = {logprobs._softmax_numerators_: broken, logprobs._scaled_neg_probs_: broken}
    monkeypatch.setattr(logprobs, "_COMPILED", broken_kernels)
    monkeypatch.setattr(logprobs, "_compile_failed", False)
    monkeypatch.setenv("SPL_NO_COMPILE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the environment variable: no attempt, no warning
        torch.testing.assert_close(sequence_logprobs(hidden, weight, targets, mask, chunk_size=CHUNK), eager)
    monkeypatch.delenv("SPL_NO_COMPILE")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        sequence_logprobs(hidden, weight, targets, mask, chunk_size=CHUNK, compile=True)
    with pytest.warns(UserWarning, match="torch.compile unavailable"):
        fallback = sequence_logprobs(hidden, weight, targets, mask, chunk_size=CHUNK)
    torch.testing.assert_close(fallback, eager)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call goes straight to eager
        torch.testing.assert_close(sequence_logprobs(hidden, weight, targets, mask, chunk_size=CHUNK), eager)


@pytest.mark.parametrize("change, message", [
    (lambda h, w, t, m: (h[0], w, t, m), "hidden must be \\[B, T, D\\]"),
    (lambda h, w, t, m: (h, w[:, :-1], t, m), "weight must be \\[V, D\\] with D = 16"),
    (lambda h, w, t, m: (h, w.double(), t, m), "share one floating dtype"),
    (lambda h, w, t, m: (h, w, t[:, :-1], m), "targets and mask must be \\[B, T\\]"),
    (lambda h, w, t, m: (h, w, t.int(), m), "targets must be int64"),
    (lambda h, w, t, m: (h, w, t, m.long() * 2), "mask must be bool or hold only 0 and 1"),
    (lambda h, w, t, m: (h, w, t.masked_fill(m, V), m), "targets\\[0, 0\\] = 37 is masked in but outside"),
])
def test_bad_input_raises_a_clear_error(change, message):
    """Each malformed input raises a one-line ValueError naming what is wrong (and where, for a token)."""
    hidden, weight, targets, mask = make_batch()
    args = change(hidden.float(), weight.float(), targets, mask)
    with pytest.raises(ValueError, match=message):
        sequence_logprobs(*args, compile=False)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        sequence_logprobs(hidden.float(), weight.float(), targets, mask, chunk_size=0, compile=False)
