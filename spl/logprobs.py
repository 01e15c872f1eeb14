"""Sequence log-probabilities without the [B, T, V] logits: selected, chunked, fused, compiled.

Every preference loss needs log pi(y|x), the sum of the response tokens' log-probabilities (Eq. 5):

    logp[b] = sum_t mask[b, t] * log softmax(hidden[b, t] @ weight.T)[targets[b, t]]

Position t of `hidden` predicts `targets[:, t]` (shift before calling). The naive way materialises
`log_softmax(hidden @ weight.T)`: at Mistral's V = 32000 that is 125 KB per token in float32 and most of a LoRA
step's memory. Here the masked-in tokens are selected first (prompt and padding never reach the projection),
then processed C at a time: one chunk's logits [C, V], their log-sum-exp and the target's logit, in float32.

Gradients, for one token with logits z = W h and p = softmax(z):

    d logp / d h = W^T (onehot(y) - p)          d logp / d W = (onehot(y) - p) h^T

The first does not depend on the upstream gradient except through one scalar per token, so when `weight`
is frozen (a LoRA run's lm_head) the forward pass computes it chunk by chunk and the backward pass is a
scale: no logits are kept and no [V, D] buffer is allocated. When `weight` requires grad, the backward
pass recomputes each chunk's logits from the saved log-sum-exp and accumulates both gradients.

Memory: one float32 [C, V] logits buffer, reused by every chunk and overwritten in place by the softmax's
numerators exp(z - max z) (one exp per logit), is the only vocabulary-sized allocation (C = 256, V = 32000:
33 MB), plus the [N, D] saved gradient. Larger C means faster GEMMs and more memory
(eval/bench/logprobs.py measures both).

The pure per-chunk math after each GEMM is torch.compiled (two fused kernels, the token dimension dynamic,
so varying lengths do not recompile); `compile=False` or the environment variable SPL_NO_COMPILE=1 gives the
eager path, and it is used automatically, with one warning, where compilation is unavailable. bfloat16
inputs: the projection runs in the input dtype (its GEMM accumulates in float32), or on a float32 copy of the weight
on a CPU without bf16 matrix units (models/bf16.py), everything after it in float32; outputs are float32.
"""
import os
import warnings

import torch

from models.bf16 import upcast

DEFAULT_CHUNK_SIZE = 256  # tokens per chunk: [256, 32000] float32 logits are 33 MB (eval/bench/logprobs.py)


def naive_sequence_logprobs(hidden, weight, targets, mask, *, average=False):
    """The readable definition (and the tests' reference): full logits, log_softmax, gather, masked sum.

    hidden [B, T, D], weight [V, D], targets [B, T] (any value where mask is 0), mask [B, T] -> [B].
    Computes in float32, or in float64 for float64 inputs. average=True divides by the number of
    masked-in tokens (0 for a fully masked row).
    """
    mask = mask.bool()
    compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden @ weight.T).to(compute_dtype)  # [B, T, V]: the buffer this module exists to avoid
    logps = logits.log_softmax(dim=-1)  # [B, T, V]
    safe_targets = targets.masked_fill(~mask, 0)  # [B, T]: masked positions may hold -100 or padding
    token_logps = logps.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    token_logps = torch.where(mask, token_logps, 0.0)  # [B, T]
    sequence_logps = token_logps.sum(-1)  # [B]  log pi(y|x), Eq. 5
    if average:
        sequence_logps = sequence_logps / mask.sum(-1).clamp(min=1)  # [B]
    return sequence_logps


# ----------------------------------------------------------------------------------------------------------
# Per-chunk math. The projection of C tokens is one GEMM into a float32 [C, V] buffer; everything after it works
# on that buffer in place (the compiled functions below are one fused kernel each), so a chunk costs one [C, V].

def _chunk_logits(hidden, weight, out):
    """z = W h for one chunk: hidden [C, D], weight [V, D] -> out, a float32 [C, V] buffer reused across chunks
    (a fresh 33 MB tensor per chunk would cost page faults and fragment the heap). GEMMs accumulate in float32.
    A float32 weight with bf16 hidden states is `_gemm_weight`'s copy (a CPU without bf16 units): h is upcast."""
    out = out[: hidden.shape[0]]  # [C, V]: the last chunk may be shorter
    if out.dtype == weight.dtype:
        return torch.mm(hidden.to(weight.dtype), weight.T, out=out)  # [C, V]
    return out.copy_(hidden @ weight.T)  # [C, V]: a bfloat16 GEMM, its output upcast


def _gemm_weight(weight):
    """The head weight the forward GEMMs read: itself, or a float32 copy of a bf16 one on a CPU without bf16 units
    (models/bf16.py: one conversion per call, V x D, then every chunk's product at float32's rate)."""
    return weight.float() if upcast(weight) else weight


def _softmax_numerators_(logits, targets):
    """-> (logp [C], lse [C], total [C]), overwriting logits z [C, V] with e = exp(z - max z), whose row sums are
    `total`: lse = logsumexp(z) = max z + log total, logp = log softmax(z)[target] = z[target] - lse, and
    softmax(z) = e / total. One exp per logit (logsumexp and then softmax would take two); in place."""
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)  # [C], read before the overwrite
    top = logits.amax(dim=-1)  # [C]
    total = logits.sub_(top[:, None]).exp_().sum(dim=-1)  # [C]  e = exp(z - max z) in logits' buffer
    lse = top + total.log()  # [C]
    return target_logits - lse, lse, total


def _scaled_neg_probs_(logits, lse, scale):
    """Overwrite logits z [C, V] with -scale * softmax(z) = -scale * exp(z - lse), scale [C]. In place."""
    return logits.sub_(lse[:, None]).exp_().mul_(-scale[:, None])  # [C, V]


def _chunk_grad_logits_(logits, lse, targets, scale, compile):
    """Overwrite logits z [C, V] with scale * d logp / d z = scale * (onehot(target) - softmax(z))."""
    minus_probs = _call(_scaled_neg_probs_, compile, logits, lse, scale)  # [C, V]  -scale * p
    return minus_probs.scatter_add_(1, targets[:, None], scale[:, None])  # [C, V]  scale * (onehot - p)


# ----------------------------------------------------------------------------------------------------------
# Compilation: torch.compile the two functions above once each; fall back to eager where that cannot run.

_COMPILED = {}
_compile_failed = False


def _use_compile(compile):
    if compile is not None:
        return bool(compile)
    return os.environ.get("SPL_NO_COMPILE", "0") != "1" and not _compile_failed


def _call(fn, compile, *args):
    """fn(*args) through torch.compile when asked; compile=None falls back to eager if compilation fails."""
    global _compile_failed
    if not _use_compile(compile) or torch.compiler.is_compiling():  # inside an outer compile: just trace fn
        return fn(*args)
    try:
        if fn not in _COMPILED:
            _COMPILED[fn] = torch.compile(fn)
        for tensor in args:  # every argument is [C, ...], and the last chunk's C differs: no recompile
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return _COMPILED[fn](*args)
    except Exception as error:  # a missing C++ compiler, Triton, or an unsupported Python: the eager path
        if compile:
            raise
        _compile_failed = True
        warnings.warn(f"spl.logprobs: torch.compile unavailable ({type(error).__name__}: {error}); "
                      "using the eager path (set SPL_NO_COMPILE=1 to silence)", stacklevel=3)
        return fn(*args)


# ----------------------------------------------------------------------------------------------------------
# The autograd plumbing: eager Python around the chunks. hidden [M, D] holds every position of the batch;
# positions [N] are the masked-in rows, gathered C at a time, so no [N, D] copy and nothing [N, V] exists.

def _logits_buffer(positions, weight, chunk_size):
    """One float32 [C, V] buffer for every chunk's logits (the last, shorter chunk uses its first rows)."""
    return torch.empty(min(chunk_size, positions.shape[0]), weight.shape[0], dtype=torch.float32, device=weight.device)


@torch.no_grad()  # as autograd.Function.forward runs: one grad mode, so the compiled chunks never recompile
def _forward_only(hidden, weight, positions, targets, chunk_size, compile):
    """log-probs [N] of the tokens at `positions` of hidden [M, D], no gradient: one GEMM per chunk."""
    token_logps = torch.empty(positions.shape[0], dtype=torch.float32, device=hidden.device)  # [N]
    logits_buffer = _logits_buffer(positions, weight, chunk_size)  # [C, V]
    weight = _gemm_weight(weight)  # [V, D]
    for start in range(0, positions.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        logits = _chunk_logits(hidden.index_select(0, positions[chunk]), weight, logits_buffer)  # [C, V]
        token_logps[chunk] = _call(_softmax_numerators_, compile, logits, targets[chunk])[0]
    return token_logps


class _FusedTokenLogprobs(torch.autograd.Function):
    """hidden [M, D], weight [V, D], positions [N] (rows of hidden), targets [N] -> log-probs [N] float32."""

    @staticmethod
    def forward(ctx, hidden, weight, positions, targets, chunk_size, compile):
        num_tokens = positions.shape[0]
        hidden_needs_grad, weight_needs_grad = ctx.needs_input_grad[:2]
        precompute = hidden_needs_grad and not weight_needs_grad  # the frozen-head (LoRA) case
        token_logps = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)  # [N]
        lse = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)  # [N]
        token_grads = hidden.new_empty(num_tokens, hidden.shape[1]) if precompute else None  # [N, D] d logp/d h
        logits_buffer = _logits_buffer(positions, weight, chunk_size)  # [C, V]
        saved_weight, weight = weight, _gemm_weight(weight)  # [V, D]: float32 GEMMs where bf16 is not native
        for start in range(0, num_tokens, chunk_size):
            chunk = slice(start, start + chunk_size)
            logits = _chunk_logits(hidden.index_select(0, positions[chunk]), weight, logits_buffer)  # [C, V]
            token_logps[chunk], lse[chunk], total = _call(_softmax_numerators_, compile, logits, targets[chunk])
            if precompute:  # d logp / d h = W^T (onehot - p) = W[target] - (e @ W) / total: the only GEMM the
                # backward pass would need, on e = exp(z - max z) as it lies in the buffer (p = e / total)
                accumulate = torch.promote_types(weight.dtype, torch.float32)  # bfloat16's GEMM output: float32
                expected = (logits.to(weight.dtype) @ weight).to(accumulate) / total[:, None]  # [C, D]  p @ W
                token_grads[chunk] = weight.index_select(0, targets[chunk]).to(accumulate) - expected  # [C, D]
        ctx.chunk_size, ctx.compile, ctx.num_rows = chunk_size, compile, hidden.shape[0]
        if precompute:
            ctx.save_for_backward(positions, token_grads)
        else:
            ctx.save_for_backward(hidden, saved_weight, positions, targets, lse)
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps):  # grad_token_logps [N]
        hidden_needs_grad, weight_needs_grad = ctx.needs_input_grad[:2]
        grad_token_logps = grad_token_logps.float().contiguous()  # [N]  (sum()'s backward gives a stride-0 view)
        if not weight_needs_grad:  # d loss / d h_n = grad_token_logps[n] * (d logp_n / d h_n), precomputed
            positions, token_grads = ctx.saved_tensors
            row_scale = grad_token_logps.new_zeros(ctx.num_rows).index_copy_(0, positions, grad_token_logps)  # [M]
            grad_hidden = token_grads.new_zeros(ctx.num_rows, token_grads.shape[1])  # [M, D]
            grad_hidden.index_copy_(0, positions, token_grads).mul_(row_scale[:, None])  # [M, D]
            return grad_hidden, None, None, None, None, None
        hidden, weight, positions, targets, lse = ctx.saved_tensors
        grad_hidden = torch.zeros_like(hidden) if hidden_needs_grad else None  # [M, D]
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # [V, D]
        logits_buffer = _logits_buffer(positions, weight, ctx.chunk_size)  # [C, V]
        forward_weight = _gemm_weight(weight)  # [V, D]: the logits as the forward pass computed them
        for start in range(0, positions.shape[0], ctx.chunk_size):  # recompute each chunk's logits
            chunk = slice(start, start + ctx.chunk_size)
            hidden_chunk = hidden.index_select(0, positions[chunk])  # [C, D]
            logits = _chunk_logits(hidden_chunk, forward_weight, logits_buffer)  # [C, V]
            grad_logits = _chunk_grad_logits_(logits, lse[chunk], targets[chunk], grad_token_logps[chunk],
                                              ctx.compile).to(weight.dtype)  # [C, V]  g * (onehot - p)
            if hidden_needs_grad:
                grad_hidden.index_copy_(0, positions[chunk], grad_logits @ weight)  # [C, D] into [M, D]
            if grad_weight.dtype == weight.dtype:
                grad_weight.addmm_(grad_logits.T, hidden_chunk)  # [V, D] += [V, C] @ [C, D]
            else:
                grad_weight += (grad_logits.T @ hidden_chunk).float()  # [V, D], float32 accumulation
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Public functions.

def _select_tokens(name, hidden, weight, targets, mask, chunk_size):
    """Validate, then -> (rows [N], cols [N], targets [N]) of the masked-in tokens."""
    if hidden.dim() != 3:
        raise ValueError(f"{name}: hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{name}: weight must be [V, D] with D = {hidden.shape[2]} (hidden's last dim), "
                         f"got shape {tuple(weight.shape)}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"{name}: hidden and weight must share one floating dtype, "
                         f"got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device or targets.device != hidden.device or mask.device != hidden.device:
        raise ValueError(f"{name}: hidden, weight, targets and mask must be on one device, got {hidden.device}, "
                         f"{weight.device}, {targets.device} and {mask.device}")
    if targets.shape != hidden.shape[:2] or mask.shape != hidden.shape[:2]:
        raise ValueError(f"{name}: targets and mask must be [B, T] = {tuple(hidden.shape[:2])}, "
                         f"got {tuple(targets.shape)} and {tuple(mask.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"{name}: targets must be int64 token ids, got {targets.dtype}")
    if mask.dtype != torch.bool and ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"{name}: mask must be bool or hold only 0 and 1")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")
    rows, cols = mask.bool().nonzero(as_tuple=True)  # [N], [N]: prompt and padding drop out here
    selected_targets = targets[rows, cols]  # [N]
    if selected_targets.numel() and (selected_targets.min() < 0 or selected_targets.max() >= weight.shape[0]):
        bad = ((selected_targets < 0) | (selected_targets >= weight.shape[0])).nonzero()[0, 0]
        raise ValueError(f"{name}: targets[{rows[bad].item()}, {cols[bad].item()}] = {selected_targets[bad].item()} "
                         f"is masked in but outside the vocabulary [0, {weight.shape[0]})")
    return rows, cols, selected_targets


def _token_logprobs(hidden, weight, rows, cols, targets, chunk_size, compile):
    """[N] float32 log-probs of the tokens at (rows, cols) of hidden [B, T, D], with autograd when wanted."""
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [B * T, D], a view when hidden is contiguous
    positions = rows * hidden.shape[1] + cols  # [N]
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedTokenLogprobs.apply(flat_hidden, weight, positions, targets, chunk_size, compile)
    return _forward_only(flat_hidden, weight, positions, targets, chunk_size, compile)


def sequence_logprobs(hidden, weight, targets, mask, *, average=False, chunk_size=DEFAULT_CHUNK_SIZE, compile=None):
    """log pi(y|x) per sequence (Eq. 5): sum_t mask[b, t] * log softmax(hidden[b, t] @ weight.T)[targets[b, t]].

    hidden [B, T, D] (position t predicts targets[:, t]), weight [V, D], targets [B, T] int64, mask [B, T]
    bool or 0/1 -> [B] float32. average=True divides by the number of masked-in tokens (length-normalised,
    as SimPO and IPO use it); a fully masked row gives 0 either way. compile=None: torch.compile unless
    SPL_NO_COMPILE=1 or it is unavailable; False: eager; True: compile or raise. Never builds [B, T, V].
    """
    rows, cols, selected_targets = _select_tokens("sequence_logprobs", hidden, weight, targets, mask, chunk_size)
    token_logps = _token_logprobs(hidden, weight, rows, cols, selected_targets, chunk_size, compile)  # [N]
    sequence_logps = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [B]
    sequence_logps = sequence_logps.index_add(0, rows, token_logps)  # [B]
    if average:
        lengths = torch.zeros_like(sequence_logps).index_add(0, rows, torch.ones_like(token_logps))  # [B]
        sequence_logps = sequence_logps / lengths.clamp(min=1)  # [B]
    return sequence_logps


def token_logprobs(hidden, weight, targets, mask, *, chunk_size=DEFAULT_CHUNK_SIZE, compile=None):
    """Per-token log softmax(hidden[b, t] @ weight.T)[targets[b, t]] -> [B, T] float32, 0 where mask is 0.

    For evaluation (calibration, per-token diagnostics); differentiable like sequence_logprobs.
    """
    rows, cols, selected_targets = _select_tokens("token_logprobs", hidden, weight, targets, mask, chunk_size)
    token_logps = _token_logprobs(hidden, weight, rows, cols, selected_targets, chunk_size, compile)  # [N]
    out = torch.zeros(hidden.shape[:2], dtype=torch.float32, device=hidden.device)  # [B, T]
    return out.index_put((rows, cols), token_logps)  # [B, T]
