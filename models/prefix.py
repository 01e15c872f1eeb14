"""Shared-prefix scoring: each prompt of a batch runs through the decoder once (and the tokens several prompts
open with, once for all of them), and its responses continue from its keys and values.

A prompt-grouped batch (data/batching.py) holds R rows `prompt + response` of P distinct prompts; row r belongs
to prompt `response_prompt[r]`, whose length is `prompt_lengths[r]` = L. The row's log-prob needs the hidden
states of positions L - 1, ..., L + n - 2 (position t predicts token t + 1), and in a causal decoder the
hidden state at position t depends on tokens 0..t only. So positions 0..L - 2 (the *prefix*) are identical
in every row of the same prompt, and computing them once per prompt gives the same result as computing them
once per row. Each row splits into

    prefix        tokens 0 .. L - 2 of its prompt            [P, Tp]   once per prompt
    continuation  tokens L - 1 .. len - 1 (last prompt token, response, EOS)   [R, Tr]   once per row

and, in every layer, the continuation's queries attend to the keys and values of its prompt's prefix followed by
its own:

    K_r = [K_prefix[response_prompt[r]], K_continuation[r]]                     (1, nkv, L_r - 1 + n_r, hd)
    allowed(q, k) = 0 <= pos(q) - pos(k) < sliding_window

with absolute positions pos (the continuation of row r starts at L_r - 1, which is also where its RoPE
angles start), so the mask is models/mistral.py's `attention_mask`. Everything else (RMSNorm, GQA, SwiGLU,
LoRA) is the same module code the unshared forward runs.

Backward: each row's keys are a view of its prompt's one prefix computation, so the gradients of every response
of a prompt reach it and sum there, which is what the unshared path computes by summing over the rows'
duplicated prefixes. Log-probs and gradients are therefore equal to the unshared path's up to floating-point
summation order (tests/test_models_prefix.py compares them tensor by tensor in float64).

Prefixes shared across prompts: the same argument one level up. Where several prompts begin with the same
tokens (a system prompt, few-shot turns, or a prompt repeated in several pairs), the hidden states of those
tokens are the same in all of them, so they are computed once too. The batch's distinct prefixes form a radix
tree (`prefix_tree`): each node is a run of tokens shared by every prefix below it, at absolute positions
start .. end - 1, and its queries attend to its ancestors' keys and values followed by its own:

    K_node = [K_root, ..., K_parent, K_own]          (1, nkv, end, hd), under the same mask as above

Nodes are computed level by level (a level's nodes packed together, each on its parent's keys), and each row's
continuation attends to its prompt's node. Identical prompts share a node (a pair batch's prompts each computed
once however many pairs repeat them), and two prompts that agree on their first k tokens compute those k once.
The gradient argument is unchanged: every use of a node's keys and values is a view or copy of its one
computation, so the gradients from all the nodes and rows below it reach it and sum there. Each level adds one
pass through the layers (for the small launches of a short level) and each node a copy of its ancestors' keys
and values per layer; `split_shared_prefix(batch, tree=False)` gives the per-prompt split (each prompt its own
root: the computation before the tree, kept for benchmarks).

Padding: none is computed. A batch's prompt and response lengths vary independently, so any rectangular layout
of them is far from dense (a third or more padding on HH-RLHF-shaped pairs, even with length grouping, which
sorts by the whole row). Norms, projections and MLPs act on each token alone, so they run on the packed real
tokens (`Packing`); attention runs one sequence at a time on its slice of them (its own length, its prefix's
keys: variable-length attention in plain PyTorch, one SDPA call per prompt and per row and layer, which on CPU
costs less than the padded scores it avoids).

What it saves: the prefix's projections, MLPs and attention run P times instead of R times (each pair's prompt
once instead of twice; a group of K responses once instead of K times), nothing runs on padding, and the last
layer computes only keys and values on the prefix (no target is predicted from a prefix position); what it
adds: each row's copy of its prefix's keys and values in every layer (under GQA small beside the hidden
states) and an explicit boolean mask per row. eval/bench/prefix.py measures the step.
LoRA dropout draws its mask per computed token, so with dropout > 0 the two paths sample different masks;
the prefix then shares one draw across its responses (equal in distribution, not token for token).
"""
from __future__ import annotations

import os

import torch
import torch.utils.checkpoint

from models.bf16 import attention  # SDPA, in float32 for bf16 on a CPU without bf16 units
from models.mistral import apply_rope, attention_mask, rope_cos_sin


def prefix_tree(sequences: list[list[int]], tree: bool = True) -> tuple[list[tuple[int, int, int]], list[int]]:
    """The radix tree of token sequences (module docstring): nodes [(start, end, parent)] in level order (a
    node's parent comes earlier and sits one level up; -1 for a root), each node the tokens start .. end - 1 of
    every sequence below it, and leaf[i], the node where sequences[i] ends. Identical sequences share a leaf;
    each maximal run shared by two or more distinct sequences is one node. Only a root can be empty (start = end =
    0: the sequences disagree on their first token, or one of them is empty). tree=False: no sharing, each
    sequence its own root."""
    if not tree:
        return [(0, len(ids), -1) for ids in sequences], list(range(len(sequences)))
    distinct = sorted(set(map(tuple, sequences)))  # sorted: each node's sequences are a contiguous run
    found = []  # (level, start, end, parent position in found, first sequence, last sequence + 1)
    queue = [(0, 0, len(distinct), -1)]  # (start, lo, hi, parent): the distinct[lo:hi] that agree before `start`
    leaf_of = {}
    for start, lo, hi, parent in queue:  # breadth first: the list grows while it is read
        # sorted, so the first and last sequence of the run share exactly what all of them share
        end = len(os.path.commonprefix([distinct[lo], distinct[hi - 1]]))
        node = len(found)
        found.append((start, end, parent))
        if len(distinct[lo]) == end:  # a sequence that ends here (a prefix of the rest sorts first)
            leaf_of[distinct[lo]] = node
            lo += 1
        while lo < hi:  # children: the runs that agree on the next token
            next_hi = lo + 1
            while next_hi < hi and distinct[next_hi][end] == distinct[lo][end]:
                next_hi += 1
            queue.append((end, lo, next_hi, node))
            lo = next_hi
    return found, [leaf_of[tuple(ids)] for ids in sequences]


def tree_levels(nodes, device) -> list[dict[str, torch.Tensor]]:
    """`prefix_tree`'s nodes by level (roots first), each level's tensors: node [S] (ids in level order),
    start [S], lengths [S] (end - start), parent [S] (a node id; -1 for roots) and ids [S, T] (filled by the
    caller)."""
    level_of = []
    for start, end, parent in nodes:
        level_of.append(0 if parent < 0 else level_of[parent] + 1)
    levels = []
    for level in range(max(level_of, default=-1) + 1):
        members = [n for n, lv in enumerate(level_of) if lv == level]
        levels.append({"node": torch.tensor(members, device=device),
                       "start": torch.tensor([nodes[n][0] for n in members], device=device),
                       "lengths": torch.tensor([nodes[n][1] - nodes[n][0] for n in members], device=device),
                       "parent": torch.tensor([nodes[n][2] for n in members], device=device)})
    return levels


def split_shared_prefix(batch, tree: bool = True) -> dict:
    """The prefix / continuation tensors of a prompt-grouped batch (module docstring), from its fields
    `input_ids`, `targets`, `loss_mask`, `attention_mask` [R, T], `response_prompt` [R], `prompt_lengths` [R].

    Returns prefix_ids [P, Tp] and prefix_lengths [P] (Tp = the longest L - 1; the rest is ignored filler),
    levels (the prefixes' radix tree, `tree_levels`, each level with its ids [S, T]; tree=False: one level, each
    prompt its own node), continuation_node [R] (the node of the row's prompt), continuation_ids,
    continuation_targets, continuation_loss_mask [R, Tr] (Tr = the longest len - L + 1; pad positions have loss
    mask 0), continuation_lengths [R] (its real tokens) and continuation_start [R] = L - 1, the absolute position
    of each row's continuation, plus response_prompt [R]. Raises ValueError if a row's loss mask reaches into its
    prefix or if two rows of one prompt disagree on its tokens.
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

    sequences = [ids[:n].tolist() for ids, n in zip(prefix_ids, prefix_lengths.tolist())]
    nodes, leaf = prefix_tree(sequences, tree)
    levels = tree_levels(nodes, device)
    owner = [0] * len(nodes)  # a prompt whose prefix contains the node: its tokens are the node's
    for p in reversed(range(prompts)):
        node = leaf[p]
        while node >= 0:
            owner[node] = p
            node = nodes[node][2]
    for level in levels:
        width = int(level["lengths"].max())
        index = (level["start"][:, None] + torch.arange(width, device=device)[None, :]).clamp(max=max(Tp - 1, 0))
        level["ids"] = prefix_ids[torch.tensor([owner[n] for n in level["node"].tolist()], device=device)].gather(
            1, index) if Tp > 0 else prefix_ids.new_zeros(len(level["node"]), 0)  # (S, width)

    Tr = int((row_lengths - start).max())
    offsets = torch.arange(Tr, device=device)  # (Tr,)
    index = (start[:, None] + offsets[None, :]).clamp(max=T - 1)  # (R, Tr) row positions of the continuation
    real = offsets[None, :] < (row_lengths - start)[:, None]  # (R, Tr)
    return {
        "prefix_ids": prefix_ids,
        "prefix_lengths": prefix_lengths,
        "levels": levels,
        "continuation_node": torch.tensor(leaf, device=device)[response_prompt],  # (R,)
        "continuation_ids": input_ids.gather(1, index),  # (R, Tr)
        "continuation_targets": targets.gather(1, index),  # (R, Tr)
        "continuation_loss_mask": loss_mask.gather(1, index) & real,  # (R, Tr)
        "continuation_lengths": row_lengths - start,  # (R,) real tokens of each continuation
        "continuation_start": start,
        "response_prompt": response_prompt,
    }


class Packing:
    """The real tokens of a right-padded [B, T] layout, in order: `index` [N] of their flat positions in B * T, and
    `lengths`, each sequence's count of them (so sequence b is the slice of packed tokens after sequences 0..b-1).

    Norms, projections and MLPs act on each token alone, so they run on the N packed tokens [1, N, D]; attention
    runs sequence by sequence on slices of them (`split`): no position of padding is computed anywhere."""

    def __init__(self, lengths, T: int):
        self.B, self.T = lengths.shape[0], T
        real = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)
        self.index = real.flatten().nonzero().squeeze(1)  # (N,)
        self.lengths = lengths.tolist()  # [B] Python ints

    def pack(self, padded):
        """[B, T, ...] -> [N, ...]"""
        return padded.flatten(0, 1).index_select(0, self.index)

    def split(self, t):
        """Heads of packed tokens (1, h, N, hd) -> B views (1, h, n_b, hd), one per sequence."""
        return t.split(self.lengths, dim=2)


def sequence_masks(starts: list[int], lengths: list[int], window: int | None, device) -> list:
    """Each sequence's attention mask: its n queries sit at positions start .. start + n - 1 and see the keys at
    0 .. start + n - 1 (its prefix's `start`, then its own): bool [n, start + n] from models/mistral.py's
    `attention_mask`, or None where that is plain causal attention (nothing before it and no window shorter than
    it), which SDPA computes with its fused causal kernel."""
    masks = []
    for start, n in zip(starts, lengths):
        if start == 0 and (window is None or n <= window):
            masks.append(None)
        else:
            masks.append(attention_mask(torch.arange(start, start + n, device=device),
                                        torch.arange(start + n, device=device), window))  # (n, start + n)
    return masks


def _attention(q, k, v, packing, masks, past=None):
    """Attention of every sequence on its own slice of the packed tokens, q (1, nh, N, hd), k, v (1, nkv, N, hd)
    -> (N, nh * hd), heads concatenated. Sequence b attends to past[0][b], past[1][b] (its prefix's keys and
    values, (1, nkv, start_b, hd) each; no past, or None for b: none) followed by its own, under masks[b]
    (`sequence_masks`)."""
    outputs = []
    for b, (q_b, k_b, v_b) in enumerate(zip(packing.split(q), packing.split(k), packing.split(v))):
        if q_b.shape[2] == 0:  # an empty sequence (a one-token prompt has no prefix)
            continue
        if past is not None and past[0][b] is not None:
            k_b, v_b = torch.cat([past[0][b], k_b], 2), torch.cat([past[1][b], v_b], 2)  # (1, nkv, start + n, hd)
        if masks[b] is None:
            y = attention(q_b, k_b, v_b, is_causal=True, enable_gqa=True)  # (1, nh, n, hd)
        else:
            y = attention(q_b, k_b, v_b, attn_mask=masks[b], enable_gqa=True)  # (1, nh, n, hd)
        outputs.append(y)
    y = torch.cat(outputs, 2)  # (1, nh, N, hd)
    return y[0].transpose(0, 1).reshape(y.shape[2], -1)  # (N, nh * hd)


def _packed_block(block, x, cos, sin, packing, masks, past=None):
    """models.mistral.Block.forward on packed tokens x [1, N, D] with RoPE tables cos, sin [N, hd], each sequence
    attending to its `past` keys and values (`_attention`) before its own. Returns x [1, N, D] and the packed
    tokens' own k, v (1, nkv, N, hd)."""
    attn = block.self_attn
    q, k, v = attn.project(block.input_layernorm(x), cos, sin)  # (1, nh, N, hd), (1, nkv, N, hd), (1, nkv, N, hd)
    x = x + attn.o_proj(_attention(q, k, v, packing, masks, past))[None]  # (1, N, D)
    return x + block.mlp(block.post_attention_layernorm(x)), k, v


def _packed_keys_values(block, x, cos, sin):
    """Only the keys and values of a block's input x [1, N, D] (the last layer's prefix: the continuations read
    them, and nothing reads its queries, attention output or MLP): k, v (1, nkv, N, hd), RoPE applied to k,
    the values `_packed_block` returns."""
    attn = block.self_attn
    h = block.input_layernorm(x)  # (1, N, D)
    k = attn.k_proj(h).view(1, -1, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (1, nkv, N, hd)
    v = attn.v_proj(h).view(1, -1, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (1, nkv, N, hd)
    return apply_rope(k, cos, sin), v


def shared_prefix_hidden_states(model, split):
    """Final-norm hidden states [R, Tr, D] of every row's continuation (zeros at padding), each node of the
    prefixes' tree computed once, nothing computed on padding. `split` is `split_shared_prefix`'s dict. Equal to
    `model.hidden_states(prompt + response)` at those positions (module docstring)."""
    config = model.config
    checkpointing = model.gradient_checkpointing and model.training and torch.is_grad_enabled()
    continuation_ids, start = split["continuation_ids"], split["continuation_start"]  # (R, Tr), (R,)
    device = continuation_ids.device
    last = len(model.layers) - 1

    def run(function, block, *args):
        if checkpointing:
            return torch.utils.checkpoint.checkpoint(function, block, *args, use_reentrant=False)
        return function(block, *args)

    def rope(positions):  # (N,) -> cos, sin (N, hd)
        return rope_cos_sin(positions, config.head_dim, config.rope_theta, model.embed_tokens.weight.dtype)

    def pasts(layer, nodes):  # the keys and values before each sequence: (keys, values), a view or None each
        return ([None if kv[n] is None else kv[n][layer][0] for n in nodes],
                [None if kv[n] is None else kv[n][layer][1] for n in nodes])

    # 1. The prefixes' tree, level by level: each node from its start, on its ancestors' keys and values, keeping
    # per layer its own after theirs (kv[node][layer] = (keys, values), each (1, nkv, end, hd); None: empty).
    kv = [None] * sum(len(level["node"]) for level in split["levels"])
    for level in split["levels"]:
        lengths = level["lengths"]
        if int(lengths.sum()) == 0:
            continue  # an empty root: nothing before its children
        S, T = level["ids"].shape
        nodes, parents = level["node"].tolist(), level["parent"].tolist()
        packing = Packing(lengths, T)
        cos, sin = rope(packing.pack(level["start"][:, None] + torch.arange(T, device=device)))  # (N, hd)
        masks = sequence_masks(level["start"].tolist(), packing.lengths, config.sliding_window, device)
        x = model.embed_tokens(packing.pack(level["ids"]))[None]  # (1, N, D)
        own = []  # per layer: (keys, values), each S views (1, nkv, n_s, hd)
        for layer, block in enumerate(model.layers):
            past = pasts(layer, parents) if parents[0] >= 0 else None  # a level's nodes: all roots or none
            if layer < last:
                x, k, v = run(_packed_block, block, x, cos, sin, packing, masks, past)  # k, v: (1, nkv, N, hd)
            else:
                # No target is predicted from a prefix position, so its last layer's output is never read: only
                # that layer's keys and values are (its queries, attention, o_proj and MLP are skipped).
                k, v = run(_packed_keys_values, block, x, cos, sin)
            own.append((packing.split(k), packing.split(v)))
        for s, node in enumerate(nodes):
            if packing.lengths[s] == 0:
                continue
            kv[node] = [(k[s], v[s]) if parents[s] < 0 or kv[parents[s]] is None else
                        (torch.cat([kv[parents[s]][layer][0], k[s]], 2), torch.cat([kv[parents[s]][layer][1], v[s]], 2))
                        for layer, (k, v) in enumerate(own)]  # (1, nkv, end, hd) each

    # 2. The R continuations, each attending to its prompt's node's keys and values and then to its own.
    R, Tr = continuation_ids.shape
    packing = Packing(split["continuation_lengths"], Tr)
    cos, sin = rope(packing.pack(start[:, None] + torch.arange(Tr, device=device)))  # (Nc, hd)
    masks = sequence_masks(start.tolist(), packing.lengths, config.sliding_window, device)
    node_of_row = split["continuation_node"].tolist()
    x = model.embed_tokens(packing.pack(continuation_ids))[None]  # (1, Nc, D)
    for layer, block in enumerate(model.layers):
        x, _, _ = run(_packed_block, block, x, cos, sin, packing, masks, pasts(layer, node_of_row))  # (1, Nc, D)
    hidden = model.norm(x)[0]  # (Nc, D)
    return hidden.new_zeros(R * Tr, hidden.shape[-1]).index_copy(0, packing.index, hidden).view(R, Tr, -1)


__all__ = ["prefix_tree", "split_shared_prefix", "shared_prefix_hidden_states"]
