"""Shared-prefix scoring: each prompt of a batch runs through the decoder once, and its responses continue from
its keys and values.

A prompt-grouped batch (data/batching.py) holds R rows `prompt + response` of P distinct prompts; row r belongs
to prompt `response_prompt[r]`, whose length is `prompt_lengths[r]` = L. The row's log-prob needs the hidden
states of positions L - 1, ..., L + n - 2 (position t predicts token t + 1), and in a causal decoder the
hidden state at position t depends on tokens 0..t only. So positions 0..L - 2 (the *prefix*) are identical
in every row of the same prompt, and computing them once per prompt gives the same result as computing them
once per row. Each row splits into

    prefix        tokens 0 .. L - 2 of its prompt            [P, Tp]   once per prompt
    continuation  tokens L - 1 .. len - 1 (last prompt token, response, EOS)   [R, Tr]   once per row

and, in every layer, the continuation's queries attend to the keys and values of its prompt's prefix (gathered
with `index_select` over P) followed by its own:

    K_r = [K_prefix[response_prompt[r]], K_continuation[r]]                     (R, nkv, Tp + Tr, hd)
    allowed(q, k) = 0 <= pos(q) - pos(k) < sliding_window,  and k is not prefix padding

with absolute positions pos (the continuation of row r starts at L_r - 1, which is also where its RoPE
angles start), so the mask is models/mistral.py's `attention_mask` plus one validity term. Everything else
(RMSNorm, GQA, SwiGLU, LoRA) is the same module code the unshared forward runs.

Backward: `index_select`'s gradient is an index_add over P, so the gradients of every response of a prompt
reach its one prefix computation and sum there, which is what the unshared path computes by summing over the
rows' duplicated prefixes. Log-probs and gradients are therefore equal to the unshared path's up to floating-
point summation order (tests/test_prefix.py compares them tensor by tensor in float64).

What it saves: the prefix's projections, MLPs and attention run P times instead of R times (each pair's
prompt once instead of twice; a group of K responses once instead of K times); what it adds: the
gathered prefix K/V (R copies of nkv x Tp x hd per layer, small beside the hidden states under GQA) and an
explicit boolean mask instead of SDPA's built-in causal one. eval/bench_prefix.py measures the step.
LoRA dropout draws its mask per computed token, so with dropout > 0 the two paths sample different masks;
the prefix then shares one draw across its responses (equal in distribution, not token for token).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from models.mistral import attention_mask, rope_cos_sin
from spl.logprobs import sequence_logprobs


def split_shared_prefix(batch) -> dict[str, torch.Tensor]:
    """The prefix / continuation tensors of a prompt-grouped batch (module docstring), from its fields
    `input_ids`, `targets`, `loss_mask`, `attention_mask` [R, T], `response_prompt` [R], `prompt_lengths` [R].

    Returns prefix_ids [P, Tp] and prefix_lengths [P] (Tp = the longest L - 1; the rest is ignored filler),
    continuation_ids, continuation_targets, continuation_loss_mask [R, Tr] (Tr = the longest len - L + 1; pad
    positions have loss mask 0) and continuation_start [R] = L - 1, the absolute position of each row's
    continuation, plus response_prompt [R]. Raises ValueError if a row's loss mask reaches into its prefix or
    if two rows of one prompt disagree on its tokens.
    """
    input_ids, targets, loss_mask = batch["input_ids"], batch["targets"], batch["loss_mask"].bool()  # (R, T)
    response_prompt, prompt_lengths = batch["response_prompt"].long(), batch["prompt_lengths"].long()  # (R,)
    rows, T = input_ids.shape
    device = input_ids.device
    row_lengths = batch["attention_mask"].long().sum(-1)  # (R,)
    start = prompt_lengths - 1  # (R,) first continuation position: the last prompt token
    if bool((start < 0).any()) or bool((prompt_lengths >= row_lengths + 1).any()):
        raise ValueError("shared prefix: every row needs a prompt of at least one token inside the row")
    positions = torch.arange(T, device=device)  # (T,)
    if bool((loss_mask & (positions[None, :] < start[:, None])).any()):
        raise ValueError("shared prefix: loss_mask covers prompt positions before the last prompt token")

    prompts = int(response_prompt.max()) + 1
    first_row = torch.full((prompts,), rows, device=device).scatter_reduce(
        0, response_prompt, torch.arange(rows, device=device), reduce="amin")  # (P,) a row of each prompt
    if bool((first_row == rows).any()):
        raise ValueError(f"shared prefix: response_prompt skips a prompt index (0..{prompts - 1})")
    prefix_lengths = start[first_row]  # (P,)
    if bool((start != prefix_lengths[response_prompt]).any()):
        raise ValueError("shared prefix: rows of one prompt have different prompt_lengths")
    Tp = int(prefix_lengths.max())
    prefix_ids = input_ids[first_row, :Tp]  # (P, Tp)
    in_prefix = positions[None, :Tp] < start[:, None]  # (R, Tp)
    if bool(((input_ids[:, :Tp] != prefix_ids[response_prompt]) & in_prefix).any()):
        raise ValueError("shared prefix: rows of one prompt have different prompt tokens")

    Tr = int((row_lengths - start).max())
    offsets = torch.arange(Tr, device=device)  # (Tr,)
    index = (start[:, None] + offsets[None, :]).clamp(max=T - 1)  # (R, Tr) row positions of the continuation
    real = offsets[None, :] < (row_lengths - start)[:, None]  # (R, Tr)
    return {
        "prefix_ids": prefix_ids,
        "prefix_lengths": prefix_lengths,
        "continuation_ids": input_ids.gather(1, index),  # (R, Tr)
        "continuation_targets": targets.gather(1, index),  # (R, Tr)
        "continuation_loss_mask": loss_mask.gather(1, index) & real,  # (R, Tr)
        "continuation_start": start,
        "response_prompt": response_prompt,
    }


def _attention_with_past(attn, x, cos, sin, mask, past):
    """models.mistral.Attention.forward with keys and values `past` = (k, v) [B, nkv, Tpast, hd] put before the
    sequence's own (or None). Returns the attention output [B, T, D] and the sequence's own k, v."""
    B, T, _ = x.shape
    q, k, v = attn.project(x, cos, sin)  # (B, nh, T, hd), (B, nkv, T, hd), (B, nkv, T, hd)
    keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
    if mask is None:  # full causal attention with nothing before: SDPA's fused causal kernel
        y = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
    else:
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)  # (B, nh, T, hd)
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, attn.n_heads * attn.head_dim)), k, v


def _block_with_past(block, x, cos, sin, mask, past_k=None, past_v=None):
    """models.mistral.Block.forward, attending to past keys/values too; returns (x, k, v)."""
    past = None if past_k is None else (past_k, past_v)
    attended, k, v = _attention_with_past(block.self_attn, block.input_layernorm(x), cos, sin, mask, past)
    x = x + attended
    return x + block.mlp(block.post_attention_layernorm(x)), k, v


def shared_prefix_hidden_states(model, prefix_ids, prefix_lengths, continuation_ids, continuation_start,
                                response_prompt):
    """Final-norm hidden states [R, Tr, D] of every row's continuation, each prefix computed once.

    prefix_ids [P, Tp] (positions 0..Tp-1; row p is real up to prefix_lengths[p]), continuation_ids [R, Tr]
    at positions continuation_start[r] + 0..Tr-1, response_prompt [R] in 0..P-1. Equal to
    `model.hidden_states(prompt + response)` at those positions (module docstring).
    """
    config = model.config
    window = config.sliding_window
    checkpointing = model.gradient_checkpointing and model.training and torch.is_grad_enabled()
    device = continuation_ids.device

    def run(block, *args):
        if checkpointing:
            return torch.utils.checkpoint.checkpoint(_block_with_past, block, *args, use_reentrant=False)
        return _block_with_past(block, *args)

    # 1. The P prefixes, as models/mistral.py's hidden_states runs them, keeping each layer's keys and values.
    Tp = prefix_ids.shape[1]
    prefix_kv = []
    if Tp > 0:
        x = model.embed_tokens(prefix_ids)  # (P, Tp, D)
        positions = torch.arange(Tp, device=device)  # (Tp,)
        cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta, x.dtype)  # (Tp, hd)
        mask = None if window is None or Tp <= window else attention_mask(positions, positions, window)
        for block in model.layers:
            x, k, v = run(block, x, cos, sin, mask)  # k, v: (P, nkv, Tp, hd)
            prefix_kv.append((k, v))
        # The prefixes' own final hidden states are not needed: no target is predicted from them.

    # 2. The R continuations, attending to their prompt's prefix keys and values and to their own.
    R, Tr = continuation_ids.shape
    x = model.embed_tokens(continuation_ids)  # (R, Tr, D)
    query_positions = continuation_start[:, None] + torch.arange(Tr, device=device)  # (R, Tr)
    cos, sin = rope_cos_sin(query_positions, config.head_dim, config.rope_theta, x.dtype)  # (R, Tr, hd)
    cos, sin = cos[:, None], sin[:, None]  # (R, 1, Tr, hd): broadcast over heads
    prefix_positions = torch.arange(Tp, device=device).expand(R, Tp)  # (R, Tp)
    key_positions = torch.cat([prefix_positions, query_positions], 1)  # (R, Tp + Tr)
    key_real = torch.cat([prefix_positions < continuation_start[:, None],
                          torch.ones(R, Tr, dtype=torch.bool, device=device)], 1)  # (R, Tp + Tr)
    mask = attention_mask(query_positions, key_positions, window) & key_real[:, None, :]  # (R, Tr, Tp + Tr)
    mask = mask[:, None]  # (R, 1, Tr, Tp + Tr): broadcast over heads
    for layer, block in enumerate(model.layers):
        if prefix_kv:
            prefix_k, prefix_v = prefix_kv[layer]  # (P, nkv, Tp, hd)
            past = (prefix_k.index_select(0, response_prompt), prefix_v.index_select(0, response_prompt))  # (R, ...)
        else:  # every prompt is a single token (e.g. BOS): nothing before the continuation
            past = (None, None)
        x, _, _ = run(block, x, cos, sin, mask, *past)  # (R, Tr, D)
    return model.norm(x)


def shared_prefix_logprobs(model, batch, *, average: bool = False, compile=None):
    """Summed (or averaged) log-probs of each row's masked-in targets, [R]: spl.step.policy_logprobs with every
    prompt of the batch computed once."""
    split = split_shared_prefix(batch)
    hidden = shared_prefix_hidden_states(model, split["prefix_ids"], split["prefix_lengths"],
                                         split["continuation_ids"], split["continuation_start"],
                                         split["response_prompt"])  # (R, Tr, D)
    return sequence_logprobs(hidden, model.lm_head.weight, split["continuation_targets"],
                             split["continuation_loss_mask"], average=average, compile=compile)  # (R,)


__all__ = ["split_shared_prefix", "shared_prefix_hidden_states", "shared_prefix_logprobs"]
