"""data.batching: the collated batch contract, and a seeded, length-grouped, resumable batch order.

Oracles: a batch worked out by hand; a per-token loop that scores each response on its own, unpadded,
against the batched `sum(loss_mask * log p(targets))`; and invariants of the order (each epoch a
permutation, same seed same order, a resumed iterator continues exactly where the saved one stopped).
"""
import pytest
import torch

from data.batching import PreferenceBatches, batch_order, collate
from data.tokenization import PreferenceExample

PAD = 99


def test_collate_by_hand():
    """Pair 0: prompt [1,5,6], chosen [7,2], rejected [8,9,2]; pair 1: prompt [1,5], chosen [10,2], rejected [11,2].

    Rows are [1,5,6,7,2], [1,5,10,2], [1,5,6,8,9,2], [1,5,11,2]; T = 6. targets = rows shifted left (pad at the
    end). A row with prompt length P and length L has loss_mask on t = P-1 .. L-2, where targets[t] is a response
    token: row 0 t = 2,3 (targets 7, 2); row 1 t = 1,2 (10, 2); row 2 t = 2,3,4 (8, 9, 2); row 3 t = 1,2 (11, 2).
    """
    examples = [PreferenceExample([1, 5, 6], [7, 2], [8, 9, 2], 0.8, index=4),
                PreferenceExample([1, 5], [10, 2], [11, 2], index=7)]
    batch = collate(examples, PAD)
    P = PAD
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 5, 6, 7, 2, P], [1, 5, 10, 2, P, P],
                                                         [1, 5, 6, 8, 9, 2], [1, 5, 11, 2, P, P]]))
    assert torch.equal(batch["targets"], torch.tensor([[5, 6, 7, 2, P, P], [5, 10, 2, P, P, P],
                                                       [5, 6, 8, 9, 2, P], [5, 11, 2, P, P, P]]))
    assert torch.equal(batch["loss_mask"], torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0],
                                                         [0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0],
                                                              [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]).bool())
    assert torch.equal(batch["chosen_prob"], torch.tensor([0.8, 1.0], dtype=torch.float32))
    assert torch.equal(batch["pair_index"], torch.tensor([4, 7]))
    assert batch["input_ids"].dtype == torch.int64 and batch["targets"].dtype == torch.int64


def random_examples(n, generator, vocab=50):
    examples = []
    for index in range(n):
        lengths = torch.randint(1, 9, (3,), generator=generator).tolist()
        prompt = [1] + torch.randint(3, vocab, (lengths[0],), generator=generator).tolist()
        chosen = torch.randint(3, vocab, (lengths[1],), generator=generator).tolist() + [2]
        rejected = torch.randint(3, vocab, (lengths[2],), generator=generator).tolist() + [2]
        examples.append(PreferenceExample(prompt, chosen, rejected, index=index))
    return examples


def test_masked_sum_equals_per_token_scoring_of_each_response():
    """A bigram-plus-position model, logits[t] = W[token_t] + U[t]. Oracle: score every response token by a
    loop over the unpadded sequence, log_softmax(W[prev] + U[pos])[token]; the batch must give the same [2B]
    log-probs, and the masked targets must be exactly the response ids (EOS included), in order."""
    generator = torch.Generator().manual_seed(0)
    examples = random_examples(5, generator)
    batch = collate(examples, PAD, pad_to_multiple=8)
    T = batch["input_ids"].shape[1]
    assert T % 8 == 0 and T >= max(len(e.prompt_ids) + max(len(e.chosen_ids), len(e.rejected_ids)) for e in examples)
    W = torch.randn(PAD + 1, PAD + 1, generator=generator, dtype=torch.float64)
    U = torch.randn(T, PAD + 1, generator=generator, dtype=torch.float64)
    logits = W[batch["input_ids"]] + U  # [2B, T, V]
    token_logps = torch.log_softmax(logits, -1).gather(-1, batch["targets"].unsqueeze(-1)).squeeze(-1)  # [2B, T]
    batched = (token_logps * batch["loss_mask"]).sum(-1)  # [2B]

    responses = [e.chosen_ids for e in examples] + [e.rejected_ids for e in examples]
    prompts = [e.prompt_ids for e in examples] * 2
    expected = torch.zeros(2 * len(examples), dtype=torch.float64)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        sequence = prompt + response
        for position in range(len(prompt), len(sequence)):
            expected[row] += torch.log_softmax(W[sequence[position - 1]] + U[position - 1], -1)[sequence[position]]
        assert batch["targets"][row][batch["loss_mask"][row]].tolist() == response
        assert batch["attention_mask"][row].sum().item() == len(sequence)
        assert batch["input_ids"][row, len(sequence):].eq(PAD).all()
    torch.testing.assert_close(batched, expected, rtol=0, atol=1e-12)


def test_each_epoch_is_a_seeded_permutation():
    lengths = list(range(23))
    first = batch_order(lengths, 5, seed=3, epoch=0)
    assert sorted(i for batch in first for i in batch) == list(range(23))
    assert [len(batch) for batch in first] == [5, 5, 5, 5, 3]
    assert batch_order(lengths, 5, seed=3, epoch=0) == first
    assert batch_order(lengths, 5, seed=4, epoch=0) != first
    assert batch_order(lengths, 5, seed=3, epoch=1) != first
    assert [len(batch) for batch in batch_order(lengths, 5, seed=3, epoch=0, drop_last=True)] == [5, 5, 5, 5]


def test_length_grouping_puts_similar_lengths_together():
    """With one group covering the whole dataset, batches are consecutive runs of the length-sorted pairs:
    ordered by their longest pair, each batch's shortest is at least the next batch's longest."""
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 1000, (40,), generator=generator).tolist()
    batches = batch_order(lengths, 4, seed=0, epoch=0, group_by_length=True, group_batches=10)
    assert sorted(i for batch in batches for i in batch) == list(range(40))
    by_longest = sorted(batches, key=lambda batch: -max(lengths[i] for i in batch))
    for batch, following in zip(by_longest, by_longest[1:]):
        assert min(lengths[i] for i in batch) >= max(lengths[i] for i in following)
    padding = lambda order: sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in order)
    assert padding(batches) < padding(batch_order(lengths, 4, seed=0, epoch=0))


def test_iterator_resumes_exactly_from_its_state():
    """Save the state mid-epoch-2 of an endless iterator; a fresh iterator loaded with it yields the same batches."""
    examples = random_examples(10, torch.Generator().manual_seed(2))
    batches = PreferenceBatches(examples, batch_size=3, pad_id=PAD, seed=7, group_by_length=True)
    assert len(batches) == 4
    first_epoch = [next(batches) for _ in range(4)]
    assert sorted(torch.cat([b["pair_index"] for b in first_epoch]).tolist()) == list(range(10))
    next(batches)
    state = batches.state_dict()
    assert state == {"epoch": 1, "offset": 1, "seed": 7}
    expected = [next(batches) for _ in range(6)]

    resumed = PreferenceBatches(examples, batch_size=3, pad_id=PAD, seed=7, group_by_length=True)
    resumed.load_state_dict(state)
    for want, got in zip(expected, [next(resumed) for _ in range(6)]):
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), key

    replay = PreferenceBatches(examples, batch_size=3, pad_id=PAD, seed=7, group_by_length=True)
    replayed = [next(replay) for _ in range(4)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first_epoch, replayed))


def test_bad_iterator_state_and_arguments():
    examples = random_examples(4, torch.Generator().manual_seed(3))
    batches = PreferenceBatches(examples, batch_size=2, pad_id=PAD, seed=1)
    with pytest.raises(ValueError, match="saved with seed 2, this run uses seed 1"):
        batches.load_state_dict({"epoch": 0, "offset": 0, "seed": 2})
    with pytest.raises(ValueError, match="must have keys epoch, offset, seed"):
        batches.load_state_dict({"epoch": 0, "offset": 0})
    with pytest.raises(ValueError, match="out of range"):
        batches.load_state_dict({"epoch": 0, "offset": 3, "seed": 1})
    with pytest.raises(ValueError, match="leaves no batch"):
        PreferenceBatches(examples, batch_size=5, pad_id=PAD, drop_last=True)
    with pytest.raises(ValueError, match="at least one PreferenceExample"):
        collate([], PAD)


def test_custom_collate_and_length_functions():
    """Other example types (data/sft.py) reuse the order: length_fn drives grouping, collate_fn builds batches."""
    lengths = [5, 50, 6, 49, 7, 48]
    calls = []
    batches = PreferenceBatches(list(range(6)), batch_size=3, pad_id=PAD, seed=0, group_by_length=True,
                                collate_fn=lambda items, pad_id, multiple: calls.append((items, pad_id)) or items,
                                length_fn=lambda i: lengths[i])
    got = sorted(sorted(next(batches)) for _ in range(2))
    assert got == [[0, 2, 4], [1, 3, 5]] and all(pad_id == PAD for _, pad_id in calls)


# -------------------------------------------------------------------------------------------- prompt-grouped batches

from data.batching import PromptGroupedBatches, collate_grouped, prompt_groups, row_values  # noqa: E402


def test_collate_grouped_by_hand():
    """Prompt A = [1,5] with responses a=[7,2], b=[8,2], c=[9,9,2] and all three pairs (a,b), (a,c), (c,b); prompt
    B = [1,6,6] with one pair (d=[7,2], a'=[8,2]); a' has a's tokens but another prompt, so it is its own row.
    Rows (first seen): 0 A+a, 1 A+b, 2 A+c, 3 B+d, 4 B+a' : five rows where `collate` makes eight.
    pair_chosen = [0, 0, 2, 3], pair_rejected = [1, 2, 1, 4]; response_prompt = [0, 0, 0, 1, 1];
    loss_mask as in `collate`: t = P-1 .. L-2."""
    A, B = [1, 5], [1, 6, 6]
    examples = [PreferenceExample(A, [7, 2], [8, 2], 0.6, index=0), PreferenceExample(A, [7, 2], [9, 9, 2], index=1),
                PreferenceExample(A, [9, 9, 2], [8, 2], 0.3, index=2), PreferenceExample(B, [7, 2], [8, 2], index=5)]
    batch = collate_grouped(examples, PAD)
    P = PAD
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 5, 7, 2, P], [1, 5, 8, 2, P], [1, 5, 9, 9, 2],
                                                         [1, 6, 6, 7, 2], [1, 6, 6, 8, 2]]))
    assert torch.equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:]) and (batch["targets"][:, -1] == P).all()
    assert torch.equal(batch["loss_mask"], torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 0, 0], [0, 1, 1, 1, 0],
                                                         [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]], dtype=torch.bool))
    assert torch.equal(batch["attention_mask"], batch["input_ids"] != P)
    assert torch.equal(batch["response_prompt"], torch.tensor([0, 0, 0, 1, 1]))
    assert torch.equal(batch["prompt_lengths"], torch.tensor([2, 2, 2, 3, 3]))
    assert torch.equal(batch["pair_chosen"], torch.tensor([0, 0, 2, 3]))
    assert torch.equal(batch["pair_rejected"], torch.tensor([1, 2, 1, 4]))
    assert torch.equal(batch["chosen_prob"], torch.tensor([0.6, 1.0, 0.3, 1.0]))
    assert torch.equal(batch["pair_index"], torch.tensor([0, 1, 2, 5]))
    ref = row_values(batch, torch.tensor([-1.0, -1.0, -3.0, -4.0]), torch.tensor([-2.0, -3.0, -2.0, -5.0]))
    assert torch.equal(ref, torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]))


def grouped_examples(num_prompts, generator, vocab=50):
    """Prompts with K = 2..5 random distinct responses each and all K(K-1)/2 pairs (random orientation and soft
    label), the pairs of all prompts shuffled together as a data file would hold them."""
    examples = []
    for _ in range(num_prompts):
        prompt = [1] + torch.randint(3, vocab, (int(torch.randint(1, 6, (1,), generator=generator)),),
                                     generator=generator).tolist()
        k = int(torch.randint(2, 6, (1,), generator=generator))
        responses = set()
        while len(responses) < k:
            n = int(torch.randint(1, 6, (1,), generator=generator))
            responses.add(tuple(torch.randint(3, vocab, (n,), generator=generator).tolist()) + (2,))
        responses = sorted(responses)
        for i in range(k):
            for j in range(i + 1, k):
                pair = [list(responses[i]), list(responses[j])]
                if torch.rand(1, generator=generator) < 0.5:
                    pair.reverse()
                examples.append((prompt, *pair, float(torch.rand(1, generator=generator))))
    order = torch.randperm(len(examples), generator=generator).tolist()
    return [PreferenceExample(*examples[i], index=n) for n, i in enumerate(order)]


def test_grouped_rows_are_each_distinct_response_once_and_pairs_index_them():
    """Oracle: the set of distinct (prompt, response) of the examples. R equals its size (sum over prompts of K,
    not 2B); each pair's rows, unpadded, are exactly prompt + chosen and prompt + rejected of that example, and
    response_prompt / prompt_lengths name the row's own prompt."""
    examples = grouped_examples(6, torch.Generator().manual_seed(0))
    batch = collate_grouped(examples, PAD)
    distinct = {(tuple(e.prompt_ids), tuple(r)) for e in examples for r in (e.chosen_ids, e.rejected_ids)}
    assert batch["input_ids"].shape[0] == len(distinct) < 2 * len(examples)
    prompts = [tuple(examples[group[0]].prompt_ids) for group in prompt_groups(examples)]
    unpadded = lambda row: batch["input_ids"][row][batch["attention_mask"][row]].tolist()
    for b, e in enumerate(examples):
        for rows, response in ((batch["pair_chosen"], e.chosen_ids), (batch["pair_rejected"], e.rejected_ids)):
            row = int(rows[b])
            assert unpadded(row) == e.prompt_ids + response
            assert prompts[int(batch["response_prompt"][row])] == tuple(e.prompt_ids)
            assert int(batch["prompt_lengths"][row]) == len(e.prompt_ids)
    rows = [tuple(unpadded(r)) for r in range(batch["input_ids"].shape[0])]
    assert len(set(rows)) == len(rows)


def test_grouped_loss_and_gradients_equal_the_pair_path_at_anchor_zero(tiny_model):
    """A tiny Mistral scores the same pairs two ways: `collate` (2B rows) and `collate_grouped` (R distinct rows);
    SPL's per-pair losses and the gradients of their mean with respect to every weight must agree (float64
    losses to 1e-10; gradients to 1e-6 of their largest entry, the fused kernel's logit buffer being float32):
    grouping changes what is computed once, not what is computed."""
    from spl.logprobs import sequence_logprobs
    from spl.losses import anchored_spl_loss, spl_loss

    model = tiny_model(dtype=torch.float64, vocab_size=128)
    examples = grouped_examples(3, torch.Generator().manual_seed(1), vocab=100)
    generator, per_sequence = torch.Generator().manual_seed(2), {}
    reference = lambda *ids: per_sequence.setdefault(tuple(ids[0] + ids[1]),
                                                     -20 * torch.rand(1, generator=generator, dtype=torch.float64))
    ref = torch.cat([torch.cat([reference(e.prompt_ids, e.chosen_ids), reference(e.prompt_ids, e.rejected_ids)])
                     for e in examples]).view(-1, 2)  # [B, 2] cached reference log-probs: one value per sequence

    def logps(batch):
        hidden = model.hidden_states(batch["input_ids"])  # [rows, T, D]
        return sequence_logprobs(hidden, model.lm_head.weight, batch["targets"], batch["loss_mask"], compile=False)

    def losses_and_grads(loss_fn):
        model.zero_grad(set_to_none=True)
        losses = loss_fn()
        losses.mean().backward()
        return losses.detach(), [p.grad.clone() for p in model.parameters()]

    pairs = collate(examples, PAD)
    B = len(examples)

    def pair_path():
        rows = logps(pairs)  # [2B]
        return spl_loss(rows[:B], rows[B:], ref[:, 0], ref[:, 1], 0.2, 0.1, pairs["chosen_prob"].double())[0]

    grouped = collate_grouped(examples, PAD)

    def grouped_path():
        ref_rows = row_values(grouped, ref[:, 0], ref[:, 1])
        return anchored_spl_loss(logps(grouped), ref_rows, grouped["pair_chosen"], grouped["pair_rejected"],
                                 grouped["response_prompt"], 0.2, 0.1, 0.0, grouped["chosen_prob"].double())[0]

    want_losses, want_grads = losses_and_grads(pair_path)
    got_losses, got_grads = losses_and_grads(grouped_path)
    assert grouped["input_ids"].shape[0] < pairs["input_ids"].shape[0]
    torch.testing.assert_close(got_losses, want_losses, rtol=0, atol=1e-10)
    for got, want in zip(got_grads, want_grads):  # the fused kernel's [C, V] buffer is float32: 1e-6 relative
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_grouped_batches_hold_whole_prompts_and_resume_exactly():
    """Every batch holds all pairs of each prompt it touches; an epoch visits every pair once; a fresh iterator
    loaded with a mid-epoch-2 state yields the very batches the original yields next."""
    examples = grouped_examples(7, torch.Generator().manual_seed(3))
    groups = {tuple(examples[g[0]].prompt_ids): len(g) for g in prompt_groups(examples)}
    batches = PromptGroupedBatches(examples, prompts_per_batch=2, pad_id=PAD, seed=4, group_by_length=True)
    assert len(batches) == 4
    epoch = [next(batches) for _ in range(4)]
    assert sorted(torch.cat([b["pair_index"] for b in epoch]).tolist()) == list(range(len(examples)))
    for batch in epoch:
        by_prompt = {}
        for i in batch["pair_index"].tolist():
            by_prompt[tuple(examples[i].prompt_ids)] = by_prompt.get(tuple(examples[i].prompt_ids), 0) + 1
        assert all(groups[prompt] == count for prompt, count in by_prompt.items()) and len(by_prompt) <= 2
    next(batches)
    state = batches.state_dict()
    assert state == {"epoch": 1, "offset": 1, "seed": 4}
    expected = [next(batches) for _ in range(5)]
    resumed = PromptGroupedBatches(examples, prompts_per_batch=2, pad_id=PAD, seed=4, group_by_length=True)
    resumed.load_state_dict(state)
    for want, got in zip(expected, [next(resumed) for _ in range(5)]):
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    with pytest.raises(ValueError, match="prompts_per_batch must be >= 1"):
        PromptGroupedBatches(examples, prompts_per_batch=0, pad_id=PAD)


def test_grouped_shares_split_by_whole_prompts():
    """torchrun's shares of one global batch: contiguous runs of whole prompts, together exactly the batch's
    pairs, ceil(P / world_size) prompts each (empty shares at the end when P < world_size)."""
    examples = grouped_examples(5, torch.Generator().manual_seed(5))
    order = PromptGroupedBatches(examples, prompts_per_batch=5, pad_id=PAD, seed=0).epoch_order(0)[0]
    batch_examples = [examples[i] for i in order]
    for world_size in (1, 2, 3, 7):
        shares = PromptGroupedBatches.shares(batch_examples, world_size)
        assert len(shares) == world_size
        assert [e.index for share in shares for e in share] == [e.index for e in batch_examples]
        share_prompts = [{tuple(e.prompt_ids) for e in share} for share in shares]
        assert all(not (a & b) for i, a in enumerate(share_prompts) for b in share_prompts[i + 1:])
        assert [len(p) for p in share_prompts] == [min(-(-5 // world_size), max(0, 5 - r * -(-5 // world_size)))
                                                   for r in range(world_size)]
