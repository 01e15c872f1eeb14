"""models/prefix.py: shared-prefix scoring equals scoring every row on its own.

Oracle: the unshared path, `model.hidden_states(prompt + response)` over each whole row followed by the naive
`log_softmax(hidden @ lm_head.T)` gathered at the targets (spl.logprobs.naive_sequence_logprobs), in float64 so
that the only difference left is summation order (~1e-13). Compared tensor by tensor: the log-probs of every
row and the gradient of every parameter (the full model, and a LoRA model's adapters), on small random models
with GQA, sliding windows shorter than the rows, prompts of different lengths (one of a single token) and one
to three responses per prompt.
"""
import pytest
import torch

from models import add_lora
from spl.logprobs import naive_sequence_logprobs
from models.prefix import shared_prefix_hidden_states, split_shared_prefix
from spl.step import shared_prefix_logprobs

TOL = dict(rtol=1e-9, atol=1e-10)  # float64; observed differences ~1e-14


def grouped_batch(prompts, responses, pad_id=0):
    """The agreed prompt-grouped batch (PLAN.md): one right-padded row prompt + response per (prompt index,
    response ids) in `responses`, with response_prompt and prompt_lengths, loss mask on the response's tokens."""
    rows = [prompts[p] + ids for p, ids in responses]
    T = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), T), pad_id)
    attention = torch.zeros(len(rows), T, dtype=torch.bool)
    loss_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for r, ((p, _), row) in enumerate(zip(responses, rows)):
        input_ids[r, :len(row)] = torch.tensor(row)
        attention[r, :len(row)] = True
        loss_mask[r, len(prompts[p]) - 1:len(row) - 1] = True
    targets = torch.full_like(input_ids, pad_id)
    targets[:, :-1] = input_ids[:, 1:]
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask, "attention_mask": attention,
            "response_prompt": torch.tensor([p for p, _ in responses]),
            "prompt_lengths": torch.tensor([len(prompts[p]) for p, _ in responses])}


def random_ids(generator, n, vocab=128):
    return torch.randint(3, vocab, (n,), generator=generator).tolist()


def mixed_batch(seed=0):
    """Four prompts of lengths 9, 1 (BOS only), 6 and 13 with 2, 1, 3 and 2 responses of lengths 1..7, rows in a
    shuffled prompt order: longer than the sliding windows below, so windows cut into prefixes."""
    g = torch.Generator().manual_seed(seed)
    prompts = [[1] + random_ids(g, 8), [1], [1] + random_ids(g, 5), [1] + random_ids(g, 12)]
    responses = [(2, random_ids(g, 3) + [2]), (0, random_ids(g, 6) + [2]), (3, random_ids(g, 2) + [2]),
                 (1, random_ids(g, 4) + [2]), (2, [2]), (0, random_ids(g, 1) + [2]), (2, random_ids(g, 5) + [2]),
                 (3, random_ids(g, 7) + [2])]
    return grouped_batch(prompts, responses)


def shared_logprobs(model, batch):
    """models.prefix's shared hidden states through the same naive float64 head as the oracle (the fused head of
    `shared_prefix_logprobs` works in float32; it is compared at float32 tolerance below)."""
    split = split_shared_prefix(batch)
    hidden = shared_prefix_hidden_states(model, split)  # (R, Tr, D): every prompt computed once
    return naive_sequence_logprobs(hidden, model.lm_head.weight, split["continuation_targets"],
                                   split["continuation_loss_mask"])  # (R,)


def unshared_logprobs(model, batch):
    hidden = model.hidden_states(batch["input_ids"])  # (R, T, D): every row's prompt computed again
    return naive_sequence_logprobs(hidden, model.lm_head.weight, batch["targets"], batch["loss_mask"])  # (R,)


def logprobs_and_grads(score, model, batch, weights):
    """Log-probs [R] and the gradient of sum_r weights[r] * logp[r] for every trainable parameter."""
    model.zero_grad(set_to_none=True)
    logps = score(model, batch)
    (logps * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_as_unshared(model, batch, seed=0):
    weights = torch.randn(batch["input_ids"].shape[0], generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64)  # distinct per row: a wrong row-to-gradient routing shows
    shared, shared_grads = logprobs_and_grads(shared_logprobs, model, batch, weights)
    unshared, unshared_grads = logprobs_and_grads(unshared_logprobs, model, batch, weights)
    torch.testing.assert_close(shared, unshared, **TOL)
    assert shared_grads.keys() == unshared_grads.keys() and shared_grads
    for name, grad in unshared_grads.items():
        assert grad.abs().max() > 0, name  # every parameter is reached, so equality below means something
        torch.testing.assert_close(shared_grads[name], grad, **TOL, msg=name)


ARCHITECTURES = {
    "gqa_window_3": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=3),
    "multi_query_window_1": dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=1),
    "full_attention_mha": dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=None),
    "tied_window_7_head_dim_16": dict(tie_word_embeddings=True, sliding_window=7, head_dim=16),
}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_full_model_logprobs_and_every_gradient_equal_the_unshared_path(tiny_model, architecture):
    model = tiny_model(seed=1, dtype=torch.float64, **ARCHITECTURES[architecture])
    for p in model.parameters():
        p.requires_grad_(True)
    assert_same_as_unshared(model, mixed_batch())


@pytest.mark.parametrize("batch", ["mixed", "few_shot"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_equal_the_unshared_path(tiny_model, checkpointing, batch):
    """LoRA on all seven projections with B moved off zero; with gradient checkpointing (train mode) too; on
    prompts of their own (mixed_batch) and on prompts sharing a few-shot opening (few_shot_batch: the tree)."""
    model = tiny_model(seed=2, dtype=torch.float64, sliding_window=4)
    add_lora(model, rank=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    model.double()
    model.gradient_checkpointing = checkpointing
    model.train(checkpointing)
    assert_same_as_unshared(model, mixed_batch(seed=3) if batch == "mixed" else few_shot_batch(seed=4), seed=1)


def test_pairs_whose_prompts_are_all_one_token(tiny_model):
    """No prefix at all (Tp = 0): every row is its own continuation."""
    model = tiny_model(seed=3, dtype=torch.float64, sliding_window=2)
    g = torch.Generator().manual_seed(5)
    batch = grouped_batch([[1], [1]], [(0, random_ids(g, 4) + [2]), (1, random_ids(g, 2) + [2]), (0, [2])])
    assert split_shared_prefix(batch)["prefix_ids"].shape == (2, 0)
    assert_same_as_unshared(model, batch)


def test_split_computes_each_prompt_once_and_each_response_token_once():
    """Invariant: prefix tokens = sum over prompts of (L - 1); real continuation tokens = sum over rows of the
    response length + 1; and every row is its prefix followed by its continuation."""
    batch = mixed_batch()
    split = split_shared_prefix(batch)
    assert split["prefix_ids"].shape == (4, 12) and split["prefix_lengths"].tolist() == [8, 0, 5, 12]
    lengths = batch["attention_mask"].sum(-1)
    for r in range(len(lengths)):
        p, start = int(batch["response_prompt"][r]), int(split["continuation_start"][r])
        real = int(lengths[r]) - start
        row = torch.cat([split["prefix_ids"][p, :start], split["continuation_ids"][r, :real]])
        assert row.tolist() == batch["input_ids"][r, :lengths[r]].tolist()
        assert split["continuation_loss_mask"][r].sum() == batch["loss_mask"][r].sum()


def distinct_prefixes(batch):
    """The set of distinct non-empty token prefixes of the batch's prompts' prefixes (tokens 0 .. L - 2): the
    positions a trie of them holds, each computed once by the tree."""
    prefixes = set()
    for ids, n in zip(batch["input_ids"].tolist(), batch["prompt_lengths"].tolist()):
        prefixes.update(tuple(ids[:k]) for k in range(1, n))
    return prefixes


def mlp_token_counts(model, batch, **split_options):
    """Tokens seen by each MLP call (forward hooks), in call order, for one shared-prefix forward."""
    seen = []
    hooks = [block.mlp.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[:-1].numel()))
             for block in model.layers]
    with torch.no_grad():
        split = split_shared_prefix(batch, **split_options)
        shared_prefix_hidden_states(model, split)
    for hook in hooks:
        hook.remove()
    return seen


def test_every_real_token_goes_through_the_mlp_once_and_no_padding_does(tiny_model):
    """Invariant (counted with forward hooks): one pass through the layers, every layer's MLP called once; it
    sees each distinct prefix position once (the trie of the prompts' prefixes: in mixed_batch three prompts share
    their BOS, so 8 + 5 + 12 - 2 positions) and the rows' continuations (len - L + 1 each) in every layer but the
    last, whose prefix output nothing reads (only the continuations there); tree=False runs each prompt's prefix
    once (8 + 0 + 5 + 12). Either way fewer than the R x T positions of the unshared forward, and no pad
    position."""
    model = tiny_model(seed=5, sliding_window=4)
    batch = mixed_batch()
    prompt_lengths = {int(p): int(n) for p, n in zip(batch["response_prompt"], batch["prompt_lengths"])}
    continuation_tokens = int((batch["attention_mask"].sum(-1) - batch["prompt_lengths"] + 1).sum())
    layers = len(model.layers)
    assert layers >= 2
    seen = mlp_token_counts(model, batch)
    assert len(distinct_prefixes(batch)) == 23
    assert seen == [23 + continuation_tokens] * (layers - 1) + [continuation_tokens]
    per_prompt = mlp_token_counts(model, batch, tree=False)
    assert per_prompt == [sum(n - 1 for n in prompt_lengths.values()) + continuation_tokens] * (layers - 1) + [
        continuation_tokens]
    assert sum(seen) < sum(per_prompt) < batch["input_ids"].numel() * layers
    batch = few_shot_batch()  # a shared few-shot opening, a repeated prompt (as in a reference pass's pairs)
    seen = mlp_token_counts(model, batch)
    # the opening once, then each question's tokens but its last (the continuation's first) once: 14 + 4 + 8 + 2;
    # the repeated prompt and the two prompts inside others add nothing
    continuation_tokens = int((batch["attention_mask"].sum(-1) - batch["prompt_lengths"] + 1).sum())
    assert len(distinct_prefixes(batch)) == 14 + 4 + 8 + 2
    assert seen == [14 + 4 + 8 + 2 + continuation_tokens] * (layers - 1) + [continuation_tokens]


def few_shot_batch(seed=0):
    """Prompts as a few-shot job and a pair batch make them: a shared 14-token system/few-shot prefix, then a
    question; prompts 0 and 3 identical (one prompt in two pairs), prompt 4 a prefix of prompt 1 plus one token,
    prompt 5 only the shared prefix's first 6 tokens; rows in a shuffled prompt order. Long enough for the
    sliding windows below to cut into the shared part."""
    g = torch.Generator().manual_seed(seed)
    shared = [1] + random_ids(g, 13)
    questions = [random_ids(g, 5), random_ids(g, 9), random_ids(g, 3)]
    prompts = [shared + questions[0], shared + questions[1], shared + questions[2], shared + questions[0],
               shared + questions[1][:4], shared[:6]]
    responses = [(3, random_ids(g, 2) + [2]), (0, random_ids(g, 4) + [2]), (5, random_ids(g, 3) + [2]),
                 (1, [2]), (2, random_ids(g, 6) + [2]), (4, random_ids(g, 2) + [2]), (0, random_ids(g, 1) + [2]),
                 (3, random_ids(g, 5) + [2]), (1, random_ids(g, 3) + [2])]
    return grouped_batch(prompts, responses)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_shared_prompt_prefixes_full_model_equal_the_unshared_path(tiny_model, architecture):
    """Prompts that share a few-shot prefix, repeat, or are prefixes of each other: log-probs and every
    parameter's gradient equal the unshared path's in float64 (the tree's levels: the shared part, the
    questions, the continuations)."""
    model = tiny_model(seed=6, dtype=torch.float64, **ARCHITECTURES[architecture])
    for p in model.parameters():
        p.requires_grad_(True)
    batch = few_shot_batch()
    assert len(split_shared_prefix(batch)["levels"]) >= 3
    assert_same_as_unshared(model, batch, seed=2)


def test_prefix_tree_holds_each_distinct_prefix_once_and_rebuilds_every_sequence():
    """Invariants of the radix tree on random sequences over a 3-token alphabet (many shared runs, duplicates,
    empty ones): the nodes from a sequence's leaf to its root cover its positions exactly, each node starting
    where its parent ends, and every sequence through a node has the same tokens there; the nodes' tokens total
    the number of distinct non-empty prefixes (the uncompressed trie's nodes, counted with a set); only a root is
    empty; parents come earlier."""
    from models.prefix import prefix_tree

    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        sequences = [torch.randint(0, 3, (int(torch.randint(0, 7, (1,), generator=g)),), generator=g).tolist()
                     for _ in range(int(torch.randint(1, 12, (1,), generator=g)))]
        sequences += sequences[:2]  # duplicates
        nodes, leaf = prefix_tree(sequences)
        tokens_at = {}  # node -> the tokens of every sequence through it at its positions
        for ids, node in zip(sequences, leaf):
            path = []
            while node >= 0:
                start, end, parent = nodes[node]
                assert parent < node and (parent < 0 or nodes[parent][1] == start) and (end > start or parent < 0)
                path = list(range(start, end)) + path
                tokens_at.setdefault(node, set()).add(tuple(ids[start:end]))
                node = parent
            assert path == list(range(len(ids)))  # the nodes' spans cover the sequence exactly
        distinct = {tuple(ids[:k]) for ids in sequences for k in range(1, len(ids) + 1)}
        assert sum(end - start for start, end, _ in nodes) == len(distinct)
        assert all(len(tokens) == 1 for tokens in tokens_at.values())
        assert len(set(map(tuple, sequences))) == len(set(leaf))  # identical sequences, and only they, share a leaf


@pytest.mark.parametrize("compile", [False, True])
def test_fused_logprobs_and_lora_gradients_agree_eager_and_compiled(tiny_model, compile):
    """`shared_prefix_logprobs` (the fused float32 head, eager and under torch.compile as train.py --compile runs
    it) against the unshared float32 path: log-probs and LoRA gradients at float32 tolerance (gradients O(10),
    summed in another order: differences ~5e-6, so atol is 1e-5 of each tensor's largest entry)."""
    model = tiny_model(seed=4, sliding_window=5)
    add_lora(model, rank=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    batch = mixed_batch(seed=7)
    weights = torch.linspace(-1, 1, batch["input_ids"].shape[0])
    shared, shared_grads = logprobs_and_grads(
        lambda m, b: shared_prefix_logprobs(m, b, compile=compile), model, batch, weights)
    unshared, unshared_grads = logprobs_and_grads(unshared_logprobs, model, batch, weights)
    torch.testing.assert_close(shared, unshared, rtol=1e-5, atol=1e-5)
    for name, grad in unshared_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max(), msg=name)


def test_bad_batches_are_refused():
    batch = mixed_batch()
    wrong_prompt = {**batch, "input_ids": batch["input_ids"].clone()}
    wrong_prompt["input_ids"][5, 3] += 1  # row 5 belongs to prompt 0, like row 1
    with pytest.raises(ValueError, match="different prompt tokens"):
        split_shared_prefix(wrong_prompt)
    into_prompt = {**batch, "loss_mask": batch["loss_mask"].clone()}
    into_prompt["loss_mask"][0, 2] = True
    with pytest.raises(ValueError, match="loss_mask covers prompt positions"):
        split_shared_prefix(into_prompt)
    wrong_length = {**batch, "prompt_lengths": batch["prompt_lengths"].clone()}
    wrong_length["prompt_lengths"][1] -= 1
    with pytest.raises(ValueError, match="different prompt_lengths"):
        split_shared_prefix(wrong_length)


def test_bench_prefix_smoke(capsys):
    """eval/bench/prefix.py end to end on a tiny model whose prompts share 12 opening tokens: the three sides'
    first loss agree (B = 0, the same batch), and the tree computes fewer positions than each prompt on its own,
    which computes fewer than the unshared rows."""
    from eval.bench import prefix as bench_prefix

    bench_prefix.main(["--dim", "64", "--layers", "1", "--vocab", "200", "--pairs", "2", "--batches", "1",
                       "--repeats", "1", "--prompt-median", "20", "--response-median", "6", "--common-prefix", "12"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("first loss"))
    unshared, shared, per_prompt = (float(part.split()[-1]) for part in line.split(":", 1)[1].split(","))
    assert abs(unshared - shared) <= 1e-5 * abs(unshared) and abs(unshared - per_prompt) <= 1e-5 * abs(unshared)
    line = next(line for line in out.splitlines() if line.startswith("pairs:"))
    shared_ratio, per_prompt_ratio = (float(part.split(")")[0].rstrip("x")) for part in line.split("(")[-2:])
    assert shared_ratio < per_prompt_ratio < 1


def test_train_py_with_and_without_shared_prefix_trains_the_same_adapter(tiny_run, tmp_path):
    """train.py end to end (6 steps, reference pass included): the default (shared prefixes) and
    --no-shared-prefix log the same metrics and write the same adapter, up to float32 rounding."""
    import json

    from safetensors.torch import load_file

    import train

    def run(out, *extra):
        argv = ["--model", str(tiny_run["model"]), "--data", str(tiny_run["data"]), "--out", str(out), "--steps", "6",
                "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "2", "--lora-rank", "4", "--lora-alpha", "8",
                "--lora-dropout", "0", "--no-progress", "--no-plot", "--max-length", "40", "--max-prompt-length", "24",
                *extra]
        assert train.main(argv) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return records, load_file(str(out / "adapter" / "adapter_model.safetensors"))

    shared, shared_adapter = run(tmp_path / "shared")
    unshared, unshared_adapter = run(tmp_path / "unshared", "--no-shared-prefix")
    assert json.loads((tmp_path / "unshared" / "config.json").read_text())["shared_prefix"] is False
    assert len(shared) == len(unshared) == 6
    for a, b in zip(shared, unshared):
        for key in ("loss", "margin", "logps_chosen", "logps_rejected", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
    assert shared_adapter.keys() == unshared_adapter.keys()
    for name, tensor in unshared_adapter.items():
        torch.testing.assert_close(shared_adapter[name], tensor, rtol=1e-3, atol=1e-5, msg=name)
    assert any(t.abs().max() > 0 for name, t in shared_adapter.items() if "lora_B" in name)  # it trained
