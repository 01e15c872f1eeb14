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
point summation order (tests/test_spl_prefix.py compares them tensor by tensor in float64).

Padding: prefixes and continuations are each right-padded to their longest, and a batch's prompt and response
lengths vary independently, so those layouts are far from dense (a third or more padding on HH-RLHF-shaped
pairs, even with length grouping, which sorts by the whole row). Only attention needs the padded layout, so
everything else runs on the packed real tokens (`Packing`): the norms, the seven projections and the MLP never
see a pad position, and attention enters and leaves the [B, heads, T, hd] layout by an index_copy and an
index_select per layer. Plain SDPA then computes the padded scores, masked (a varlen kernel would skip them,
but CPU PyTorch has none; at D = 512 and a few hundred tokens they are a small part of a layer's FLOPs).

What it saves: the prefix's projections, MLPs and attention run P times instead of R times (each pair's
prompt once instead of twice; a group of K responses once instead of K times), and no projection or MLP runs
on padding; what it adds: the gathered prefix K/V (R copies of nkv x Tp x hd per layer, small beside the
hidden states under GQA), the pad/unpad copies, and an explicit boolean mask instead of SDPA's built-in causal
one. eval/bench_prefix.py measures the step.
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
    positions have loss mask 0), continuation_lengths [R] (its real tokens) and continuation_start [R] = L - 1,
    the absolute position of each row's continuation, plus response_prompt [R]. Raises ValueError if a row's loss mask reaches into its prefix or
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
        "continuation_lengths": row_lengths - start,  # (R,) real tokens of each continuation
        "continuation_start": start,
        "response_prompt": response_prompt,
    }


class Packing:
    """The real tokens of a right-padded [B, T] layout, in order: `index` [N] of their flat positions in B * T.

    Norms, projections and MLPs act on each token alone, so they run on the N packed tokens [1, N, D] and never on
    padding; only attention needs the [B, heads, T, hd] layout, which `pad` and `unpad` enter and leave (an
    index_copy and an index_select, whose backward passes are each other)."""

    def __init__(self, lengths, T: int):
        self.B, self.T = lengths.shape[0], T
        real = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)
        self.index = real.flatten().nonzero().squeeze(1)  # (N,)

    def pack(self, padded):
        """[B, T, ...] -> [N, ...]"""
        return padded.flatten(0, 1).index_select(0, self.index)

    def pad(self, t):
        """Heads of packed tokens (1, h, N, hd) -> (B, h, T, hd), zeros at padding."""
        _, heads, _, head_dim = t.shape
        flat = t.new_zeros(self.B * self.T, heads, head_dim).index_copy(0, self.index, t[0].transpose(0, 1))
        return flat.view(self.B, self.T, heads, head_dim).transpose(1, 2)

    def unpad(self, y):
        """(B, h, T, hd) -> (N, h * hd): the packed tokens' attention outputs, heads concatenated."""
        return y.transpose(1, 2).reshape(self.B * self.T, -1).index_select(0, self.index)


def _packed_block(block, x, cos, sin, packing, mask, past_k=None, past_v=None):
    """models.mistral.Block.forward on packed tokens x [1, N, D] with RoPE tables cos, sin [N, hd], attending (in
    the padded layout) to keys and values past_k, past_v [B, nkv, Tpast, hd] before the sequence's own.
    Returns x [1, N, D] and the sequence's own k, v [B, nkv, T, hd]."""
    attn = block.self_attn
    q, k, v = attn.project(block.input_layernorm(x), cos, sin)  # (1, nh, N, hd), (1, nkv, N, hd), (1, nkv, N, hd)
    q, k, v = packing.pad(q), packing.pad(k), packing.pad(v)  # (B, nh, T, hd), (B, nkv, T, hd), (B, nkv, T, hd)
    keys, values = (k, v) if past_k is None else (torch.cat([past_k, k], 2), torch.cat([past_v, v], 2))
    if mask is None:  # full causal attention with nothing before: SDPA's fused causal kernel
        y = F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)
    else:
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)  # (B, nh, T, hd)
    x = x + attn.o_proj(packing.unpad(y))[None]  # (1, N, D)
    return x + block.mlp(block.post_attention_layernorm(x)), k, v


def shared_prefix_hidden_states(model, split):
    """Final-norm hidden states [R, Tr, D] of every row's continuation (zeros at padding), each prefix computed
    once, no norm, projection or MLP computed on padding. `split` is `split_shared_prefix`'s dict. Equal to
    `model.hidden_states(prompt + response)` at those positions (module docstring)."""
    config = model.config
    window = config.sliding_window
    checkpointing = model.gradient_checkpointing and model.training and torch.is_grad_enabled()
    prefix_ids, continuation_ids = split["prefix_ids"], split["continuation_ids"]  # (P, Tp), (R, Tr)
    start, response_prompt = split["continuation_start"], split["response_prompt"]  # (R,), (R,)
    device = continuation_ids.device

    def run(block, *args):
        if checkpointing:
            return torch.utils.checkpoint.checkpoint(_packed_block, block, *args, use_reentrant=False)
        return _packed_block(block, *args)

    def rope(positions):  # (N,) -> cos, sin (N, hd)
        return rope_cos_sin(positions, config.head_dim, config.rope_theta, model.embed_tokens.weight.dtype)

    # 1. The P prefixes, as models/mistral.py's hidden_states runs them, keeping each layer's keys and values.
    P, Tp = prefix_ids.shape
    prefix_kv = []
    if Tp > 0:
        packing = Packing(split["prefix_lengths"], Tp)
        positions = torch.arange(Tp, device=device)  # (Tp,)
        cos, sin = rope(packing.pack(positions.expand(P, Tp)))  # (Np, hd)
        mask = None if window is None or Tp <= window else attention_mask(positions, positions, window)  # (Tp, Tp)
        x = model.embed_tokens(packing.pack(prefix_ids))[None]  # (1, Np, D)
        for block in model.layers:
            x, k, v = run(block, x, cos, sin, packing, mask)  # k, v: (P, nkv, Tp, hd)
            prefix_kv.append((k, v))
        # The prefixes' own final hidden states are not needed: no target is predicted from them.

    # 2. The R continuations, attending to their prompt's prefix keys and values and to their own.
    R, Tr = continuation_ids.shape
    packing = Packing(split["continuation_lengths"], Tr)
    query_positions = start[:, None] + torch.arange(Tr, device=device)  # (R, Tr)
    cos, sin = rope(packing.pack(query_positions))  # (Nc, hd)
    prefix_positions = torch.arange(Tp, device=device).expand(R, Tp)  # (R, Tp)
    key_positions = torch.cat([prefix_positions, query_positions], 1)  # (R, Tp + Tr)
    key_real = torch.cat([prefix_positions < start[:, None],
                          torch.ones(R, Tr, dtype=torch.bool, device=device)], 1)  # (R, Tp + Tr)
    mask = attention_mask(query_positions, key_positions, window) & key_real[:, None, :]  # (R, Tr, Tp + Tr)
    mask = mask[:, None]  # (R, 1, Tr, Tp + Tr): broadcast over heads
    x = model.embed_tokens(packing.pack(continuation_ids))[None]  # (1, Nc, D)
    for layer, block in enumerate(model.layers):
        if prefix_kv:
            prefix_k, prefix_v = prefix_kv[layer]  # (P, nkv, Tp, hd)
            past = (prefix_k.index_select(0, response_prompt), prefix_v.index_select(0, response_prompt))  # (R, ...)
        else:  # every prompt is a single token (e.g. BOS): nothing before the continuation
            past = (None, None)
        x, _, _ = run(block, x, cos, sin, packing, mask, *past)  # (1, Nc, D)
    hidden = model.norm(x)[0]  # (Nc, D)
    return hidden.new_zeros(R * Tr, hidden.shape[-1]).index_copy(0, packing.index, hidden).view(R, Tr, -1)


def shared_prefix_logprobs(model, batch, *, average: bool = False, compile=None):
    """Summed (or averaged) log-probs of each row's masked-in targets, [R]: spl.step.policy_logprobs with every
    prompt of the batch computed once."""
    split = split_shared_prefix(batch)
    hidden = shared_prefix_hidden_states(model, split)  # (R, Tr, D)
    return sequence_logprobs(hidden, model.lm_head.weight, split["continuation_targets"],
                             split["continuation_loss_mask"], average=average, compile=compile)  # (R,)


__all__ = ["split_shared_prefix", "shared_prefix_hidden_states", "shared_prefix_logprobs"]
