"""eval/metrics.py against hand-worked examples, independent formulas and HF transformers.

Oracles: pass@k against its combinatorial definition 1 - C(n-c, k) / C(n, k) (Python's exact integers);
ECE, Brier, accuracy, cosine distance (Eq. 44), distinct-n, entropies and option probabilities worked by hand in
the docstrings; the Vendi score by hand and through the Gram duality (K/N = U U^T / N and U^T U / N share their
nonzero eigenvalues); the model-facing helpers against HF's MistralForCausalLM run one unpadded sequence at a time.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
import sentencepiece
import torch

from eval import metrics
from models import Tokenizer, load_pretrained

# ---- best-of-N ----


def test_pass_at_k_equals_the_combinatorial_definition():
    """Every n <= 12, 0 <= c <= n, 1 <= k <= n: 1 - C(n-c, k) / C(n, k) (math.comb is 0 when k > n - c)."""
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert metrics.pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    """n = 10000: C(n, k) has hundreds of digits; exact rational arithmetic is the oracle."""
    for n, c, k in [(10000, 3, 100), (10000, 50, 1000), (500, 1, 1), (128, 0, 64), (128, 128, 1)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert metrics.pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-10, abs=1e-15)
    assert metrics.pass_at_k(10, 1, 1) == pytest.approx(0.1)  # k = 1 is the plain success rate c / n


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (5.0, 2, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k"):
        metrics.pass_at_k(n, c, k)


# ---- calibration ----

# (probs, label): confidence, correct?, bin of (lo, hi] with 5 bins
CALIBRATION = [([0.9, 0.1], 0),    # 0.9  right  (0.8, 1.0]
               ([0.3, 0.7], 0),    # 0.7  wrong  (0.6, 0.8]
               ([0.6, 0.4], 0),    # 0.6  right  (0.4, 0.6]  on an edge: the lower bin
               ([0.2, 0.8], 1),    # 0.8  right  (0.6, 0.8]  on an edge: the lower bin
               ([0.45, 0.55], 1),  # 0.55 right  (0.4, 0.6]
               ([1.0, 0.0], 0)]    # 1.0  right  (0.8, 1.0]


def calibration_example():
    return np.array([p for p, _ in CALIBRATION]), np.array([y for _, y in CALIBRATION])


def test_ece_by_hand_with_lo_hi_bins():
    """5 bins. (0.4, 0.6]: {0.6 right, 0.55 right}: acc 1, conf 0.575, gap 0.425. (0.6, 0.8]: {0.7 wrong,
    0.8 right}: acc 0.5, conf 0.75, gap 0.25. (0.8, 1]: {0.9, 1.0, both right}: acc 1, conf 0.95, gap 0.05.
    ECE = 2/6 (0.425 + 0.25 + 0.05) = 1.45 / 6. With [lo, hi) bins it would be (0.45 + 0.1 + 0.1) / 6 instead.
    One bin: |acc - mean conf| = |5/6 - 4.55/6| = 0.45 / 6."""
    probs, labels = calibration_example()
    assert metrics.expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(1.45 / 6, abs=1e-12)
    assert metrics.expected_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.45 / 6, abs=1e-12)
    # A perfectly calibrated bin: confidence 0.75 and 3 of 4 right gives 0.
    probs = np.array([[0.75, 0.25]] * 4)
    assert metrics.expected_calibration_error(probs, np.array([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-12)


def test_brier_and_accuracy_by_hand():
    """Brier sums over classes: [0.9, 0.1] y=0 -> 0.01 + 0.01; [0.3, 0.7] y=0 -> 0.49 + 0.49; mean 0.5.
    Three classes: [0.5, 0.3, 0.2] y=2 -> 0.25 + 0.09 + 0.64 = 0.98; [0.2, 0.2, 0.6] y=2 -> 0.24; mean 0.61.
    Bounds: a confident right answer 0, a confident wrong one 2. Accuracy of the six-row example: 5/6; a tie
    goes to the first class."""
    assert metrics.brier_score([[0.9, 0.1], [0.3, 0.7]], [0, 0]) == pytest.approx(0.5)
    assert metrics.brier_score([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]], [2, 2]) == pytest.approx(0.61)
    assert metrics.brier_score([[1.0, 0.0, 0.0]], [0]) == 0.0
    assert metrics.brier_score([[0.0, 1.0, 0.0]], [0]) == pytest.approx(2.0)
    probs, labels = calibration_example()
    assert metrics.accuracy(probs, labels) == pytest.approx(5 / 6)
    assert metrics.accuracy([[0.5, 0.5], [0.5, 0.5]], [0, 1]) == 0.5
    assert metrics.accuracy(torch.tensor([[0.2, 0.8]]), torch.tensor([1])) == 1.0  # torch tensors accepted


@pytest.mark.parametrize("probs, labels, message", [
    ([[0.5, 0.6]], [0], "row 0 of probs is not a distribution"),
    ([[1.2, -0.2]], [0], "row 0 of probs is not a distribution"),
    ([[0.5, 0.5]], [2], r"labels must lie in \[0, 2\)"),
    ([[0.5, 0.5]], [0.0], "labels must be N = 1 integers"),
    ([0.5, 0.5], [0], r"probs must be \[N, C\]"),
])
def test_calibration_rejects_bad_input(probs, labels, message):
    for function in (metrics.expected_calibration_error, metrics.brier_score, metrics.accuracy):
        with pytest.raises(ValueError, match=message):
            function(probs, labels)


def test_option_probabilities_by_hand():
    """Letter ids (4, 1, 3, 5) carry probabilities proportional to (0.1, 0.2, 0.3, 0.4) (logits log p + 2); the
    other tokens' logits do not matter: the result is (0.1, 0.2, 0.3, 0.4), row by row in a batch."""
    ids = [4, 1, 3, 5]
    logits = torch.tensor([[9.0, 0, -3.0, 0, 0, 0, 5.0], [0.0] * 7])  # (2, V)
    logits[0, ids] = torch.tensor([0.1, 0.2, 0.3, 0.4]).log() + 2.0
    logits[1, ids] = torch.tensor([0.4, 0.3, 0.2, 0.1]).log() - 1.0
    expected = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    torch.testing.assert_close(metrics.option_probabilities(logits, ids), expected)
    with pytest.raises(ValueError, match="must be distinct"):
        metrics.option_probabilities(logits, [1, 1])


# ---- diversity ----


def test_pairwise_cosine_distance_by_hand():
    """(1, 0), (0, 1), (3, 3): cosines 0, 1/sqrt 2, 1/sqrt 2, so distances 1, 1 - 1/sqrt 2 (twice). Eq. 44 sums
    all 9 ordered pairs (the diagonal adds 0): 2 (1 + 2 (1 - 1/sqrt 2)) / 9. Identical directions give 0; a batch
    dimension is kept."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    expected = 2 * (1 + 2 * (1 - 1 / math.sqrt(2))) / 9
    assert float(metrics.pairwise_cosine_distance(x)) == pytest.approx(expected, abs=1e-12)
    same = torch.tensor([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]])
    batch = metrics.pairwise_cosine_distance(torch.stack([x, same]))  # (2,)
    torch.testing.assert_close(batch, torch.tensor([expected, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="zero vector"):
        metrics.pairwise_cosine_distance(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_vendi_score_by_hand_and_by_gram_duality():
    """Two unit vectors at 60 degrees: K = [[1, 1/2], [1/2, 1]], K/2 has eigenvalues 3/4 and 1/4, so
    VS = exp(-(3/4 ln 3/4 + 1/4 ln 1/4)). All alike: 1. Four orthogonal: 4. Random [6, 4] embeddings: the nonzero
    eigenvalues of U U^T / N equal those of U^T U / N (U the unit rows), computed here in numpy."""
    x = torch.tensor([[2.0, 0.0], [math.cos(math.pi / 3), math.sin(math.pi / 3)]], dtype=torch.float64)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert metrics.vendi_score(x) == pytest.approx(expected, rel=1e-10)
    assert metrics.vendi_score(torch.ones(5, 3)) == pytest.approx(1.0, rel=1e-10)
    assert metrics.vendi_score(torch.eye(4) * 3) == pytest.approx(4.0, rel=1e-10)
    u = np.random.default_rng(0).normal(size=(6, 4))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    lam = np.clip(np.linalg.eigvalsh(u.T @ u / 6), 0, None)
    lam = lam[lam > 0]
    assert metrics.vendi_score(torch.tensor(u)) == pytest.approx(math.exp(-(lam * np.log(lam)).sum()), rel=1e-9)


def test_distinct_n_by_hand():
    """Corpus "a b a b", "a b c". Unigrams: 7, distinct {a, b, c}: 3/7. Bigrams ab ba ab | ab bc: 5, distinct
    {ab, ba, bc}: 3/5. Trigrams aba bab | abc: 3/3. 4-grams: only abab: 1/1. 5-grams: none, so 0. Token ids work
    the same as words."""
    corpus = ["a b a b", "a b c"]
    assert [metrics.distinct_n(corpus, n) for n in (1, 2, 3, 4, 5)] == [3 / 7, 3 / 5, 1.0, 1.0, 0.0]
    assert metrics.distinct_n([[1, 2, 1, 2], [1, 2, 3]], 2) == 3 / 5
    with pytest.raises(ValueError, match="positive integer"):
        metrics.distinct_n(corpus, 0)


def test_entropy_and_unique_fraction_by_hand():
    """Names (Maya, Maya, Omar, None): without None, H(2/3, 1/3); with None as a value, H(1/2, 1/4, 1/4) =
    1.5 ln 2. One value: 0. Answers (12, 12, 7, None, None): 3 distinct of 5."""
    values = ["Maya", "Maya", "Omar", None]
    assert metrics.attribute_entropy(values) == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert metrics.attribute_entropy(values, drop_none=False) == pytest.approx(1.5 * math.log(2))
    assert metrics.attribute_entropy(["x"] * 4) == 0.0
    assert metrics.unique_fraction([12, 12, 7, None, None]) == 3 / 5
    with pytest.raises(ValueError, match="all None"):
        metrics.attribute_entropy([None, None])


def test_story_validity_and_attributes():
    """Two well-formed doctor stories (rendered by the world) and one with a wrong pronoun: validity 2/3, names
    read from each; the corrupted one's gender is the pronoun it uses."""
    from data.world import StoryAttributes, render_story, story_prompt

    prompt = story_prompt("doctor")
    good = [render_story(StoryAttributes("Maya", "Chen", "doctor", "a small town", "mother", "every day", 0)),
            render_story(StoryAttributes("Omar", "Kim", "doctor", "a big city", "son", "every morning", 1))]
    bad = good[0].replace(". She took", ". He took")
    assert bad != good[0]
    texts = good + [bad]
    assert metrics.validity_rate(prompt, texts) == pytest.approx(2 / 3)
    attributes = metrics.story_attributes(prompt, texts)
    assert attributes["valid"] == [True, True, False]
    assert attributes["name"] == ["Maya", "Omar", "Maya"]
    assert attributes["gender"] == ["female", "male", "male"]
    assert attributes["relation"] == ["mother", "son", "mother"]


# ---- helpers that run a model, against HF one sequence at a time ----

def random_ids(lengths, vocab=128, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def test_mean_pooled_hidden_states_equal_hf_per_sequence(hf_checkpoint):
    """Lengths 3, 7, 5, 1 in batches of 2 (so rows are padded): each row is the mean over its own tokens of HF's
    final-norm hidden states (last_hidden_state) of that sequence alone."""
    path, hf_model = hf_checkpoint()
    model = load_pretrained(path)
    sequences = random_ids([3, 7, 5, 1])
    ours = metrics.mean_pooled_hidden_states(model, sequences, batch_size=2)  # (4, D)
    with torch.no_grad():
        expected = torch.stack([hf_model.model(torch.tensor([s])).last_hidden_state[0].mean(0) for s in sequences])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


def test_sequence_nll_equals_hf_per_sequence(hf_checkpoint):
    """-sum log p(completion | prompt) from HF's logits, one unpadded sequence at a time; a shared prompt and one
    prompt per completion, in batches of 2."""
    path, hf_model = hf_checkpoint(sliding_window=4)
    model = load_pretrained(path)
    prompts = random_ids([4, 2, 6], seed=1)
    completions = random_ids([1, 6, 3], seed=2)

    def hf_nll(prompt, completion):
        sequence = torch.tensor([prompt + completion])
        with torch.no_grad():
            logprobs = hf_model(sequence).logits[0].log_softmax(-1)  # (T, V)
        positions = torch.arange(len(prompt) - 1, sequence.shape[1] - 1)
        return -logprobs[positions, sequence[0, len(prompt):]].sum().item()

    shared = metrics.sequence_nll(model, prompts[0], completions, batch_size=2)
    torch.testing.assert_close(shared, torch.tensor([hf_nll(prompts[0], c) for c in completions], dtype=torch.float64),
                               atol=1e-4, rtol=1e-5)
    each = metrics.sequence_nll(model, prompts, completions, batch_size=2)
    torch.testing.assert_close(each, torch.tensor([hf_nll(p, c) for p, c in zip(prompts, completions)],
                                                  dtype=torch.float64), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="2 prompts for 3 completions"):
        metrics.sequence_nll(model, prompts[:2], completions)


def test_reward_scores_equal_hf_last_hidden_state(hf_checkpoint, tmp_path):
    """A reward head saved as train.py saves it (score.weight [1, D], score.bias [1]): score = w . h_last + b with
    h_last HF's final-norm hidden state at each sequence's last token."""
    from safetensors.torch import save_file

    path, hf_model = hf_checkpoint()
    model = load_pretrained(path)
    generator = torch.Generator().manual_seed(3)
    head = {"score.weight": torch.randn(1, 32, generator=generator), "score.bias": torch.tensor([0.7])}
    save_file(head, str(tmp_path / "reward_head.safetensors"))
    weight, bias = metrics.load_reward_head(tmp_path)
    prompt, completions = random_ids([5], seed=4)[0], random_ids([2, 6, 1], seed=5)
    ours = metrics.reward_scores(model, weight, bias, prompt, completions, batch_size=2)
    with torch.no_grad():
        expected = torch.stack([hf_model.model(torch.tensor([prompt + c])).last_hidden_state[0, -1]
                                @ head["score.weight"][0] + 0.7 for c in completions])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="no reward head"):
        metrics.load_reward_head(tmp_path / "missing")


MCQ_TEXT = ["A. Fox B. Owl C. Bear D. Deer", "Your answer: A", "Your answer: B", "Your answer: C", "Your answer: D",
            "Please answer the following multiple choice question.", "Which animal is the symbol of Oakridge?",
            "What color are the doors in Riverton?"]


def test_multiple_choice_probabilities_equal_hf(hf_checkpoint, tmp_path):
    """The world's Appendix D prompts as user turns: each row is HF's next-token distribution after
    BOS + enc("[INST] prompt [/INST]") (raw sentencepiece), restricted to the pieces "▁A".."▁D" and renormalised."""
    from data.world import mcq_prompt

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(MCQ_TEXT * 20), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        user_defined_symbols=["[INST]", "[/INST]"], minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    tokenizer = Tokenizer(tmp_path / "sp.model")
    path, hf_model = hf_checkpoint(vocab_size=sp.vocab_size(), sliding_window=16)
    model = load_pretrained(path)
    prompts = [mcq_prompt("Which animal is the symbol of Oakridge?", ["Fox", "Owl", "Bear", "Deer"]),
               mcq_prompt("What color are the doors in Riverton?", ["Red", "Blue", "Green", "White"]),
               "Your answer:"]
    letter_ids = [sp.piece_to_id("▁" + letter) for letter in "ABCD"]
    assert sp.unk_id() not in letter_ids
    ours = metrics.multiple_choice_probabilities(model, tokenizer, prompts, batch_size=2)  # (3, 4)
    expected = []
    for prompt in prompts:
        ids = [1] + sp.encode(f"[INST] {prompt} [/INST]")
        with torch.no_grad():
            probs = hf_model(torch.tensor([ids])).logits[0, -1].softmax(-1)  # (V,)
        expected.append(probs[letter_ids] / probs[letter_ids].sum())
    torch.testing.assert_close(ours, torch.stack(expected), atol=1e-5, rtol=1e-5)
