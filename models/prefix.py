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

and each row's continuation attends to its prompt's node. Identical prompts share a node (a pair batch's prompts
each computed once however many pairs repeat them), and two prompts that agree on their first k tokens compute
those k once. The gradient argument is unchanged: every use of a node's keys and values is a view or copy of its
one computation, so the gradients from all the nodes and rows below it reach it and sum there. Each node adds a
copy of its ancestors' keys and values per layer; `split_shared_prefix(batch, tree=False)` gives the per-prompt
split (each prompt its own root: the computation before the tree, kept for benchmarks).

One pass: a layer's input is known for every token once the layer below has run, and what a node or row attends
to is its ancestors' keys and values *in the same layer*. So the tree's nodes and the rows' continuations go
through the layers together, packed in one sequence (`Layout`: nodes in level order, then the continuations):
one product per projection over all of their tokens, attention run by run with ancestors first. (Level by
level, each level its own pass through the layers, a 24-token system prompt shared by a batch makes a pass of
24-row products, which a CPU runs at half the rate of a few hundred rows and a GPU at a fraction: docs/speed.md.)

Padding: none is computed. A batch's prompt and response lengths vary independently, so any rectangular layout
of them is far from dense (a third or more padding on HH-RLHF-shaped pairs, even with length grouping, which
sorts by the whole row). Norms, projections and MLPs act on each token alone, so they run on the packed real
tokens; attention runs one sequence at a time on its slice of them (its own length, its prefix's keys:
variable-length attention in plain PyTorch, one SDPA call per node and per row and layer, which on CPU costs less
than the padded scores it avoids).

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
    Norms, projections and MLPs act on each token alone, so they run on packed tokens: no position of padding is
    computed anywhere."""

    def __init__(self, lengths, T: int):
        real = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)
        self.index = real.flatten().nonzero().squeeze(1)  # (N,)
        self.lengths = lengths.tolist()  # [B] Python ints

    def pack(self, padded):
        """[B, T, ...] -> [N, ...]"""
        return padded.flatten(0, 1).index_select(0, self.index)


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


class Layout:
    """Every run of tokens one shared-prefix forward computes, packed in one sequence: the prefixes' tree nodes in
    level order (every node after its parent), then the R continuations. Per run s: `lengths[s]` tokens,
    attending after `parents[s]`'s keys and values (the run of its parent node, for a continuation its prompt's
    node; -1: nothing before it), under `masks[s]` (`sequence_masks`). `ids` [N] and `positions` [N] (absolute)
    are the packed tokens; the first `prefix_tokens` of them are the tree's (`nodes` runs), the rest the
    continuations', `index` the continuations' flat positions in the padded [R, Tr] layout."""

    def __init__(self, split, window: int | None):
        continuation_ids, start = split["continuation_ids"], split["continuation_start"]  # (R, Tr), (R,)
        device = continuation_ids.device
        ids, positions, self.lengths, self.parents, node_run = [], [], [], [], {}
        for level in split["levels"]:
            packing = Packing(level["lengths"], level["ids"].shape[1])
            ids.append(packing.pack(level["ids"]))
            positions.append(packing.pack(level["start"][:, None] + torch.arange(level["ids"].shape[1],
                                                                                 device=device)))
            for node, parent, n in zip(level["node"].tolist(), level["parent"].tolist(), packing.lengths):
                node_run[node] = len(self.lengths)
                self.lengths.append(n)
                self.parents.append(node_run[parent] if parent >= 0 else -1)
        self.nodes, self.prefix_tokens = len(self.lengths), sum(self.lengths)
        Tr = continuation_ids.shape[1]
        packing = Packing(split["continuation_lengths"], Tr)
        ids.append(packing.pack(continuation_ids))
        positions.append(packing.pack(start[:, None] + torch.arange(Tr, device=device)))
        self.index = packing.index  # (Nc,)
        self.lengths += packing.lengths
        self.parents += [node_run[node] for node in split["continuation_node"].tolist()]
        self.ids, self.positions = torch.cat(ids), torch.cat(positions)  # (N,), (N,)
        starts = [int(p[0]) if len(p) else 0 for p in self.positions.split(self.lengths)]
        self.masks = sequence_masks(starts, self.lengths, window, device)


def _tree_attention(q, k, v, layout: Layout, first: int):
    """Attention of runs first, first + 1, ... of `layout` (queries q (1, nh, Nq, hd), their tokens packed),
    every run on its ancestors' keys and values followed by its own (k, v (1, nkv, N, hd): every run's, in
    layout order) -> (Nq, nh * hd), heads concatenated. A node's keys from position 0 are its parent's followed
    by its own, built once per node and layer and read by its children and continuations."""
    full = []  # per node: (keys, values) from position 0 to its end, (1, nkv, end, hd)
    outputs = []
    queries = iter(q.split(layout.lengths[first:], 2))
    for s, (k_s, v_s) in enumerate(zip(k.split(layout.lengths, 2), v.split(layout.lengths, 2))):
        parent = layout.parents[s]
        if parent >= 0 and full[parent][0].shape[2] > 0:
            k_s, v_s = torch.cat([full[parent][0], k_s], 2), torch.cat([full[parent][1], v_s], 2)
        if s < layout.nodes:
            full.append((k_s, v_s))
        if s < first:
            continue
        q_s = next(queries)
        if q_s.shape[2] == 0:  # an empty root (the prompts disagree on their first token)
            continue
        mask = layout.masks[s]
        if mask is None:
            y = attention(q_s, k_s, v_s, is_causal=True, enable_gqa=True)  # (1, nh, n, hd)
        else:
            y = attention(q_s, k_s, v_s, attn_mask=mask, enable_gqa=True)  # (1, nh, n, hd)
        # (n, nh * hd): a view, as SDPA keeps the token-major layout q has from its projection
        outputs.append(y[0].transpose(0, 1).reshape(q_s.shape[2], -1))
    return torch.cat(outputs)  # (Nq, nh * hd), the one copy


def _tree_block(block, x, cos, sin, layout: Layout, last: bool):
    """models.mistral.Block.forward on every packed token x [1, N, D] (RoPE tables cos, sin [N, hd]), each run
    attending to its ancestors before itself (`_tree_attention`). In the last layer only the continuations'
    outputs are read (no target is predicted from a prefix position): the prefix computes its keys and values
    and nothing else, and the block returns the continuations' x [1, Nc, D] only."""
    attn = block.self_attn
    h = block.input_layernorm(x)  # (1, N, D)
    if not last:
        q, k, v = attn.project(h, cos, sin)  # (1, nh, N, hd), (1, nkv, N, hd), (1, nkv, N, hd)
        y = _tree_attention(q, k, v, layout, first=0)  # (N, nh * hd)
    else:
        n = layout.prefix_tokens
        k = attn.k_proj(h).view(1, -1, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (1, nkv, N, hd)
        v = attn.v_proj(h).view(1, -1, attn.n_kv_heads, attn.head_dim).transpose(1, 2)  # (1, nkv, N, hd)
        q = attn.q_proj(h[:, n:]).view(1, -1, attn.n_heads, attn.head_dim).transpose(1, 2)  # (1, nh, Nc, hd)
        q, k = apply_rope(q, cos[n:], sin[n:]), apply_rope(k, cos, sin)
        y = _tree_attention(q, k, v, layout, first=layout.nodes)  # (Nc, nh * hd)
        x = x[:, n:]  # (1, Nc, D)
    x = x + attn.o_proj(y)[None]
    return x + block.mlp(block.post_attention_layernorm(x))


def shared_prefix_hidden_states(model, split):
    """Final-norm hidden states [R, Tr, D] of every row's continuation (zeros at padding), each node of the
    prefixes' tree computed once, nothing computed on padding. `split` is `split_shared_prefix`'s dict. Equal to
    `model.hidden_states(prompt + response)` at those positions (module docstring).

    One pass through the layers for everything: a layer's input is known for every token once the layer before
    has run, and the keys and values a run attends to are its ancestors' in the same layer, so the tree's nodes
    and the continuations go through each layer together (one product per projection over all their tokens),
    only attention running run by run, ancestors first."""
    config = model.config
    checkpointing = model.gradient_checkpointing and model.training and torch.is_grad_enabled()
    layout = Layout(split, config.sliding_window)
    cos, sin = rope_cos_sin(layout.positions, config.head_dim, config.rope_theta,
                            model.embed_tokens.weight.dtype)  # (N, hd)
    x = model.embed_tokens(layout.ids)[None]  # (1, N, D)
    last = len(model.layers) - 1
    for layer, block in enumerate(model.layers):
        if checkpointing:
            x = torch.utils.checkpoint.checkpoint(_tree_block, block, x, cos, sin, layout, layer == last,
                                                  use_reentrant=False)
        else:
            x = _tree_block(block, x, cos, sin, layout, layer == last)
    hidden = model.norm(x)[0]  # (Nc, D)
    R, Tr = split["continuation_ids"].shape
    return hidden.new_zeros(R * Tr, hidden.shape[-1]).index_copy(0, layout.index, hidden).view(R, Tr, -1)


__all__ = ["prefix_tree", "split_shared_prefix", "shared_prefix_hidden_states"]
