"""KV-cached decoding, sampling filters and `generate`.

Oracles: the invariant that cached incremental decoding equals one full forward (also across the sliding-window
boundary); HF transformers' greedy `generate` and its logits warpers (`TemperatureLogitsWarper`,
`TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper`); log-probs recomputed from one full forward; and small
examples worked by hand in the docstrings.
"""
import math

import pytest
import torch

from models import KVCache, load_pretrained
from models.generate import generate, logits_to_probs, min_p_filter, sample_token, top_k_filter, top_p_filter

INF = float("inf")


def tokens(batch=2, length=13, vocab=128, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))  # (B, T)


def kept(logits):
    """Boolean mask of the tokens a filter let through."""
    return torch.isfinite(logits)


# --- the KV cache ---

@pytest.mark.parametrize("window", [4, None], ids=["window_4", "full_attention"])
@pytest.mark.parametrize("chunks", [[3] + [1] * 10, [5, 8], [2, 7, 1, 3]],
                         ids=["prefill_then_one_at_a_time", "two_chunks", "uneven_chunks"])
def test_cached_decoding_equals_full_forward(window, chunks, tiny_model):
    """Feeding the sequence in chunks through a KV cache gives, at every position, the logits of one full forward
    (T = 13 runs well past a window of 4, so cached keys fall out of the window mid-sequence)."""
    model = tiny_model(sliding_window=window, num_key_value_heads=1)
    x = tokens()
    with torch.no_grad():
        full = model(x)  # (B, T, V)
        cache = KVCache(model.config, batch_size=2, max_seq_len=13)
        pieces, start = [], 0
        for size in chunks:
            pieces.append(model(x[:, start:start + size], cache=cache))  # (B, size, V)
            start += size
            assert cache.pos == start
    assert sum(chunks) == 13
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cache_reorder_repeats_a_prefilled_prompt(tiny_model):
    """One prompt prefilled once and repeated to three rows (as `generate` does), then three different next tokens:
    each row equals a full forward of its own sequence."""
    model = tiny_model(sliding_window=3)
    prompt = tokens(batch=1, length=6)  # (1, 6)
    next_tokens = torch.tensor([5, 17, 99])  # (3,)
    with torch.no_grad():
        cache = KVCache(model.config, batch_size=1, max_seq_len=8)
        model(prompt, cache=cache)
        cache.reorder(torch.zeros(3, dtype=torch.long))
        step = model(next_tokens[:, None], cache=cache)[:, -1]  # (3, V)
        full = model(torch.cat([prompt.expand(3, -1), next_tokens[:, None]], dim=1))[:, -1]  # (3, V)
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_cache_overflow_is_an_error(tiny_model):
    model = tiny_model()
    cache = KVCache(model.config, batch_size=1, max_seq_len=4)
    with pytest.raises(ValueError, match=r"KV cache overflow: position 5 > max_seq_len 4"):
        model(tokens(batch=1, length=5), cache=cache)


# --- generate ---

@pytest.mark.parametrize("num_samples", [1, 2])
def test_greedy_matches_hf_generate(num_samples, hf_checkpoint):
    """Temperature 0 is greedy decoding: token for token what HF's `generate(do_sample=False)` returns on the same
    checkpoint and prompt ids (prompt of 7 and 16 new tokens, with a window of 5), every sample alike."""
    path, hf_model = hf_checkpoint(sliding_window=5)
    model = load_pretrained(path)
    prompt = tokens(batch=1, length=7, seed=3)[0].tolist()
    out = generate(model, prompt, max_new_tokens=16, num_samples=num_samples, temperature=0, eos_id=2)
    hf_out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                               max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0)  # explicit
    # attention_mask: otherwise HF infers one from pad_token_id and masks the prompt's own 0 tokens
    expected = hf_out[0, len(prompt):].tolist()
    assert len(expected) >= 8  # the comparison covers decoding well past the window
    assert out.tokens == [expected] * num_samples


def _greedy_without_eos(model, prompt, n):
    return generate(model, prompt, max_new_tokens=n, temperature=0).tokens[0]


def test_generate_stops_at_eos(tiny_model):
    """With eos_id set to the token greedy decoding emits at step k (its first occurrence), greedy output is the
    same prefix cut just after that EOS; sampled rows each end at their first EOS or run to max_new_tokens."""
    model = tiny_model(sliding_window=4)
    prompt = tokens(batch=1, length=5, seed=4)[0].tolist()
    free = _greedy_without_eos(model, prompt, 12)
    assert len(free) == 12
    k = next(i for i in range(2, 12) if free[i] not in free[:i])
    stopped = generate(model, prompt, max_new_tokens=12, temperature=0, eos_id=free[k])
    assert stopped.tokens == [free[: k + 1]]

    first_logits = model(torch.tensor([prompt]))[0, -1]  # (V,)
    eos = int(first_logits.argmax())  # the likeliest first token: some samples stop at once, others do not
    sampled = generate(model, prompt, max_new_tokens=10, num_samples=16, temperature=1.0, top_k=3, eos_id=eos,
                       generator=torch.Generator().manual_seed(0))
    lengths = [len(t) for t in sampled.tokens]
    for row in sampled.tokens:
        assert eos not in row[:-1]
        assert row[-1] == eos or len(row) == 10
    assert min(lengths) < 10 and max(lengths) > 1  # both outcomes occur, so the check above is exercised


@pytest.mark.parametrize("settings", [dict(temperature=0.8, top_p=0.9), dict(temperature=1.3, top_k=20, min_p=0.05),
                                      dict(temperature=0)], ids=["top_p", "top_k_min_p", "greedy"])
def test_generate_logprobs_equal_full_forward(settings, tiny_model):
    """The reported log-prob of each sample is sum_t log softmax(logits_t)[y_t] at temperature 1, unfiltered,
    over the new tokens up to and including EOS: recomputed from one full forward over prompt + completion."""
    model = tiny_model(sliding_window=6, vocab_size=64)
    prompt = tokens(batch=1, length=8, vocab=64, seed=5)[0].tolist()
    out = generate(model, prompt, max_new_tokens=10, num_samples=4, eos_id=3,
                   generator=torch.Generator().manual_seed(1), **settings)
    assert len(out.tokens) == len(out.logprobs) == 4
    for completion, reported in zip(out.tokens, out.logprobs):
        sequence = torch.tensor([prompt + completion])  # (1, T)
        with torch.no_grad():
            logprobs = model(sequence)[0].log_softmax(-1)  # (T, V)
        positions = torch.arange(len(prompt) - 1, sequence.shape[1] - 1)
        expected = logprobs[positions, sequence[0, len(prompt):]].sum().item()
        assert reported == pytest.approx(expected, abs=1e-4)


def test_generate_rejects_bad_arguments(tiny_model):
    model = tiny_model()
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        generate(model, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -1"):
        generate(model, [1, 2], max_new_tokens=3, temperature=-1)


# --- sampling filters, by hand ---

def test_temperature_by_hand():
    """logits (0, ln 2): softmax is (1/3, 2/3). Temperature 0.5 doubles the logits to (0, 2 ln 2) = ln(1, 4):
    (1/5, 4/5). Temperature 2 halves them to ln(1, sqrt 2): (1, sqrt 2) / (1 + sqrt 2)."""
    logits = torch.tensor([0.0, math.log(2.0)])
    torch.testing.assert_close(logits_to_probs(logits), torch.tensor([1 / 3, 2 / 3]))
    torch.testing.assert_close(logits_to_probs(logits, temperature=0.5), torch.tensor([0.2, 0.8]))
    root2 = math.sqrt(2.0)
    torch.testing.assert_close(logits_to_probs(logits, temperature=2.0), torch.tensor([1, root2]) / (1 + root2))


def test_top_k_by_hand():
    """logits (1, 3, 2, 3, 0): the two largest are the tied 3s; k = 3 adds the 2; ties at the k-th value are kept
    (k = 1 keeps both 3s); k beyond V keeps everything. Survivors keep their logits."""
    logits = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.0])
    assert top_k_filter(logits, 2).tolist() == [-INF, 3.0, -INF, 3.0, -INF]
    assert top_k_filter(logits, 3).tolist() == [-INF, 3.0, 2.0, 3.0, -INF]
    assert top_k_filter(logits, 1).tolist() == [-INF, 3.0, -INF, 3.0, -INF]
    assert top_k_filter(logits, 10).tolist() == logits.tolist()


def test_top_p_by_hand():
    """probs (0.05, 0.5, 0.15, 0.3) (logits = log probs, shuffled so that sorting matters). In descending order
    0.5, 0.3, 0.15, 0.05 the mass before each token is 0, 0.5, 0.8, 0.95; a token survives while the mass before
    it is below p: p = 0.75 keeps {0.5, 0.3}; p = 0.85 adds 0.15; p = 0.1 keeps only the top token; p = 1 all."""
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log()
    assert kept(top_p_filter(logits, 0.75)).tolist() == [False, True, False, True]
    assert kept(top_p_filter(logits, 0.85)).tolist() == [False, True, True, True]
    assert kept(top_p_filter(logits, 0.1)).tolist() == [False, True, False, False]
    assert kept(top_p_filter(logits, 1.0)).tolist() == [True] * 4
    torch.testing.assert_close(logits_to_probs(logits, top_p=0.75), torch.tensor([0.0, 0.5, 0.0, 0.3]) / 0.8)


def test_min_p_by_hand():
    """probs (0.5, 0.3, 0.15, 0.05): min-p keeps tokens with p >= p_base * 0.5. p_base = 0.2 -> threshold 0.1
    keeps the first three; p_base = 0.5 -> 0.25 keeps two; p_base = 1 keeps only the top token."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log() + 7.0  # a shift of all logits changes nothing
    assert kept(min_p_filter(logits, 0.2)).tolist() == [True, True, True, False]
    assert kept(min_p_filter(logits, 0.5)).tolist() == [True, True, False, False]
    assert kept(min_p_filter(logits, 1.0)).tolist() == [True, False, False, False]


def test_temperature_is_applied_before_top_p():
    """probs (0.7, 0.2, 0.1): top-p 0.6 at temperature 1 keeps only the first token (0.7 >= 0.6). At temperature
    3 the probs flatten to (0.7, 0.2, 0.1)^(1/3) / Z = (0.888, 0.585, 0.464) / 1.937 = (0.458, 0.302, 0.240), and
    top-p 0.6 keeps two tokens, renormalised to (0.888, 0.585) / 1.473. Filtering first would keep one token."""
    logits = torch.tensor([0.7, 0.2, 0.1]).log()
    torch.testing.assert_close(logits_to_probs(logits, temperature=1.0, top_p=0.6), torch.tensor([1.0, 0.0, 0.0]))
    flat = torch.tensor([0.7, 0.2, 0.1]) ** (1 / 3)
    expected = torch.tensor([flat[0], flat[1], 0.0]) / (flat[0] + flat[1])
    torch.testing.assert_close(logits_to_probs(logits, temperature=3.0, top_p=0.6), expected)


def test_sample_token_draws_from_the_filtered_distribution():
    """Temperature 0 is argmax. Otherwise draws follow logits_to_probs: with probs (0.5, 0.3, 0.15, 0.05) and
    top-k 3 the frequencies are (0.5, 0.3, 0.15) / 0.95 and the last token never appears; with 40000 draws each
    frequency is within 5 standard errors (sqrt(p(1-p)/n) <= 0.0025) of its probability."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    rows = logits.expand(40000, -1)  # (n, V)
    assert sample_token(torch.tensor([[0.0, 2.0, 1.0], [3.0, 2.0, 1.0]]), temperature=0).tolist() == [1, 0]
    draws = sample_token(rows, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))  # (n,)
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert frequencies[3] == 0
    assert (frequencies - expected).abs().max() < 5 * 0.0025


# --- sampling filters, against HF's warpers on random logits ---

@pytest.fixture
def random_logits():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(64, 100, generator=generator) * 3.0  # (B, V): peaked and flat rows alike


@pytest.mark.parametrize("name, value", [("top_k", 1), ("top_k", 7), ("top_p", 0.3), ("top_p", 0.9),
                                         ("min_p", 0.05), ("min_p", 0.3)])
def test_filters_match_hf_warpers(name, value, random_logits):
    """Each filter keeps exactly the set of tokens HF's warper keeps, and leaves survivors' logits unchanged."""
    from transformers.generation import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    ours = {"top_k": top_k_filter, "top_p": top_p_filter, "min_p": min_p_filter}[name](random_logits, value)
    warper = {"top_k": TopKLogitsWarper, "top_p": TopPLogitsWarper, "min_p": MinPLogitsWarper}[name](value)
    theirs = warper(None, random_logits.clone())
    assert torch.equal(kept(ours), kept(theirs))
    assert 0 < kept(ours).sum() < kept(ours).numel()  # the filter does remove something, and keeps something
    assert torch.equal(ours[kept(ours)], random_logits[kept(ours)])


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_logits_to_probs_matches_hf_processor_chain(temperature, random_logits):
    """All four together, in HF's order (temperature, top-k, top-p, min-p), give HF's distribution."""
    from transformers.generation import (LogitsProcessorList, MinPLogitsWarper, TemperatureLogitsWarper,
                                         TopKLogitsWarper, TopPLogitsWarper)

    chain = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopKLogitsWarper(20),
                                 TopPLogitsWarper(0.9), MinPLogitsWarper(0.02)])
    theirs = chain(None, random_logits.clone()).softmax(-1)  # (B, V)
    ours = logits_to_probs(random_logits, temperature, top_k=20, top_p=0.9, min_p=0.02)  # (B, V)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits_to_probs(random_logits, temperature),
                               TemperatureLogitsWarper(temperature)(None, random_logits.clone()).softmax(-1))


def test_invert_cdf_by_hand():
    """probs (0.1, 0, 0.3, 0.6) have the CDF intervals [0, 0.1) -> 0, empty -> 1, [0.1, 0.4) -> 2, [0.4, 1) -> 3;
    an unnormalised row (x 2) scales u by its total. Uniforms on both sides of each boundary land as derived, the
    zero-probability token never, and u just below 1 stays inside the last interval."""
    from models.generate import invert_cdf

    probs = torch.tensor([0.1, 0.0, 0.3, 0.6], dtype=torch.float64)
    uniforms = torch.tensor([0.0, 0.0999, 0.1001, 0.3999, 0.4001, 1 - 2 ** -53], dtype=torch.float64)
    expected = [0, 0, 2, 2, 3, 3]
    assert invert_cdf(probs.expand(6, -1), uniforms).tolist() == expected
    assert invert_cdf((2 * probs).float().expand(6, -1), uniforms).tolist() == expected
    last_zero = torch.tensor([[0.5, 0.5, 0.0]])  # u * total rounding up to the total must not select the zero tail
    assert invert_cdf(last_zero, torch.tensor([1 - 2 ** -53], dtype=torch.float64)).tolist() == [1]


# --- a prefix shared by several prompts; rows that leave the batch as they end ---

def test_generate_from_a_shared_prefix_equals_generate_from_the_whole_prompt(tiny_model):
    """Two prompts opening with the same 9 tokens (past a sliding window of 4): generate with their common prefix
    prefilled once (`prefill_prefix`) gives the tokens and log-probs of generate on the whole prompt (oracle: the
    plain path, itself checked above against HF), greedy and sampled with the same seed."""
    from models.generate import common_prefix, prefill_prefix

    model = tiny_model(sliding_window=4, num_key_value_heads=1)
    shared = tokens(batch=1, length=9, seed=3)[0].tolist()
    prompts = [shared + [7, 8, 9], shared + [11]]
    assert common_prefix(prompts) == shared and common_prefix([[1, 2], [1, 2]]) == [1]
    prefix = prefill_prefix(model, common_prefix(prompts))
    for ids in prompts:
        for temperature, samples in ((0.0, 1), (1.0, 5)):
            plain = generate(model, ids, 6, samples, temperature, generator=torch.Generator().manual_seed(1))
            cached = generate(model, ids, 6, samples, temperature, generator=torch.Generator().manual_seed(1),
                              prefix=prefix)
            assert cached.tokens == plain.tokens
            torch.testing.assert_close(torch.tensor(cached.logprobs), torch.tensor(plain.logprobs), atol=1e-5, rtol=0)


def test_rows_that_end_leave_the_batch_and_keep_their_own_tokens(tiny_model):
    """decode_until (generate with stop): 64 samples at temperature 1 where a row ends at EOS (token 3) or when
    stop says so (its tokens so far sum past 600). Invariants per row: it ends exactly at the first position where
    one of the two holds (or at max_new_tokens), and its log-prob equals the one recomputed from one full forward
    of prompt + its tokens (so every row kept reading its own cache rows as others were dropped)."""
    model = tiny_model(sliding_window=5, num_key_value_heads=1)
    prompt = tokens(batch=1, length=7, seed=4)[0].tolist()
    out = generate(model, prompt, 8, 64, 1.0, eos_id=3, generator=torch.Generator().manual_seed(0),
                   stop=lambda so_far: so_far.sum(1) > 600)
    lengths = {len(t) for t in out.tokens}
    assert len(lengths) > 2  # rows really ended at different steps
    with torch.no_grad():
        for row, logprob in zip(out.tokens, out.logprobs):
            ended = [i for i in range(len(row)) if row[i] == 3 or sum(row[:i + 1]) > 600]
            assert len(row) == (ended[0] + 1 if ended else 8)
            ids = torch.tensor([prompt + row])
            logps = model(ids)[0, len(prompt) - 1:-1].log_softmax(-1)  # (n, V)
            expected = logps.gather(1, torch.tensor(row)[:, None]).sum()
            assert logprob == pytest.approx(float(expected), abs=1e-4)
