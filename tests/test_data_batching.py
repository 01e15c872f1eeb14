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
