"""The paper's metrics: diversity, quality, best-of-N and calibration.

    diversity    pairwise_cosine_distance (Eq. 44), vendi_score, distinct_n, attribute_entropy, unique_fraction
    quality      sequence_nll (the reference model's cross-entropy of samples), reward_scores, validity_rate
    best-of-N    pass_at_k (Chen et al. 2021, the unbiased estimator in its numerically stable form),
                 bootstrap_interval (percentile bootstrap over problems, for error bars)
    calibration  expected_calibration_error, brier_score, accuracy, option_probabilities (Appendix D)

The formulas are pure functions over arrays (numpy or torch) and plain Python values. A few helpers at the end
run a model over token ids (mean-pooled embeddings, NLL, reward scores, multiple-choice letter probabilities);
they batch by right-padding, which a causal decoder never attends to, and pool or read out only real positions.
"""
from __future__ import annotations

import contextlib
import math
from collections import Counter

import numpy as np
import torch

from data.batching import pad_rows
from data.world import validate_story
from spl.step import RewardHead, load_reward_head as spl_load_reward_head, reward_scores as head_scores

# ---- diversity ------------------------------------------------------------------------------------------------


def pairwise_cosine_distance(embeddings) -> torch.Tensor:
    """Expected pairwise cosine distance of the N responses to one prompt (Eq. 44, inner term):

        (1 / N^2) sum_{i, j} 1 - phi_i . phi_j / (|phi_i| |phi_j|)

    over all ordered pairs, i = j included (each contributes 0), as Eq. 44 writes it; the mean over distinct pairs
    only is N / (N - 1) times this. `embeddings` [..., N, D] -> [...] (float64)."""
    x = torch.as_tensor(embeddings).double()  # (..., N, D)
    if x.dim() < 2 or x.shape[-2] == 0:
        raise ValueError(f"pairwise_cosine_distance: expected embeddings [..., N, D] with N >= 1, got {tuple(x.shape)}")
    norms = x.norm(dim=-1, keepdim=True)  # (..., N, 1)
    if bool((norms == 0).any()):
        raise ValueError("pairwise_cosine_distance: an embedding is the zero vector (its cosine is undefined)")
    unit = x / norms
    cosine = unit @ unit.transpose(-1, -2)  # (..., N, N)
    return (1.0 - cosine).mean(dim=(-1, -2))  # Eq. 44


def vendi_score(embeddings) -> float:
    """Vendi score (Friedman & Dieng 2023) with the cosine-similarity kernel K_ij = phi_i . phi_j / (|phi_i| |phi_j|):

        VS = exp(-sum_i lambda_i log lambda_i),   lambda = eigenvalues of K / N   (0 log 0 = 0)

    the exponential of the eigenvalues' entropy: 1 when all N responses are alike, N when they are orthogonal,
    an effective number of distinct responses in between. `embeddings` [N, D]."""
    x = torch.as_tensor(embeddings).double()  # (N, D)
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"vendi_score: expected embeddings [N, D] with N >= 1, got {tuple(x.shape)}")
    norms = x.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("vendi_score: an embedding is the zero vector (its cosine is undefined)")
    unit = x / norms
    kernel = unit @ unit.T  # (N, N), ones on the diagonal
    eigenvalues = torch.linalg.eigvalsh(kernel / x.shape[0]).clamp(min=0.0)  # (N,), sum to 1
    positive = eigenvalues[eigenvalues > 0]
    return math.exp(float(-(positive * positive.log()).sum()))


def distinct_n(sequences, n: int) -> float:
    """Corpus-level distinct-n (Li et al. 2016): unique n-grams / all n-grams, pooled over every sequence.

    A sequence is a list of tokens (ids or words) or a string, which is split on whitespace. Sequences shorter
    than n add no n-grams; a corpus with none at all scores 0 (nothing varied)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"distinct_n: n must be a positive integer, got {n!r}")
    sequences = list(sequences)
    if not sequences:
        raise ValueError("distinct_n: no sequences")
    grams = []
    for sequence in sequences:
        tokens = sequence.split() if isinstance(sequence, str) else list(sequence)
        grams += [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def attribute_entropy(values, drop_none: bool = True) -> float:
    """Shannon entropy in nats of the empirical distribution of extracted attributes (a story's name, gender,
    relation): H = -sum_v f_v log f_v, f_v the fraction of values equal to v. With `drop_none`, values that
    could not be extracted (None) are left out, so aberrations lower validity, not entropy."""
    values = [v for v in values if not (drop_none and v is None)]
    if not values:
        raise ValueError("attribute_entropy: no values" + (" (all None)" if drop_none else ""))
    counts = np.array(list(Counter(values).values()), dtype=np.float64)
    freqs = counts / counts.sum()
    return float(-(freqs * np.log(freqs)).sum())


def unique_fraction(items) -> float:
    """Fraction of distinct items, |set(items)| / len(items): for final answers, the paper's unique-solution
    fraction (Figure 10; 1 - it is the redundant fraction). None counts as one value like any other."""
    items = list(items)
    if not items:
        raise ValueError("unique_fraction: no items")
    return len(set(items)) / len(items)


def story_attributes(prompts, texts) -> dict[str, list]:
    """{"name", "gender", "relation", "valid"} -> one value per text, extracted by the world's `validate_story`
    (None where an attribute is absent). `prompts` is one story prompt or one per text."""
    prompts = [prompts] * len(texts) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(texts):
        raise ValueError(f"story_attributes: {len(prompts)} prompts for {len(texts)} texts")
    checks = [validate_story(prompt, text) for prompt, text in zip(prompts, texts)]
    return {key: [getattr(check, key) for check in checks] for key in ("name", "gender", "relation", "valid")}


def validity_rate(prompts, texts) -> float:
    """Fraction of well-formed stories (the paper's Figure 1 "aberrations" are the rest)."""
    valid = story_attributes(prompts, texts)["valid"]
    if not valid:
        raise ValueError("validity_rate: no texts")
    return sum(valid) / len(valid)


# ---- best-of-N ------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021):

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

    the probability that k samples drawn without replacement from the n include a correct one. The product form
    never forms the huge binomials; it is 1 when n - c < k (every k-subset holds a correct sample)."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise ValueError(f"pass_at_k: {name} must be an integer, got {value!r}")
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def bootstrap_interval(values, level: float = 0.95, resamples: int = 2000, seed: int = 0):
    """Percentile bootstrap interval over problems for the mean of per-problem values (Efron & Tibshirani 1993).

    values [..., P]: one value per problem, e.g. each problem's unbiased pass@k estimate from its n samples;
    every leading row (a setting, or a difference of two settings on the same problems) is resampled with the
    SAME problem indices, so intervals of differences are paired. Each of `resamples` draws picks P problems
    with replacement and takes their mean; the interval is the (1 - level) / 2 and (1 + level) / 2 quantiles of
    those means. -> (low [...], high [...]), float64.

    What it covers: if the P problems are a random sample of a population of problems and each problem's value
    is an unbiased estimate of that problem's pass@k (it is: E[pass_at_k(n, c, k)] = 1 - (1 - p)^k when
    c ~ Binomial(n, p)), the values are i.i.d. with mean theta = E_p[1 - (1 - p)^k], so the interval is for
    theta and includes both the choice of problems and each problem's sampling noise. It does not include the
    training seed's variance (a different policy is a different population). The percentile interval's
    coverage error is O(1 / P) (Hall 1992, Ch. 3): with P = 32 problems of a skewed value, expect a 95% interval
    to cover 92-95% of the time."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"bootstrap_interval: expected values [..., P] with P >= 1 problems, got shape {x.shape}")
    if not 0 < level < 1 or not (isinstance(resamples, int) and resamples >= 1):
        raise ValueError(f"bootstrap_interval: need 0 < level < 1 and resamples >= 1, got {level}, {resamples}")
    problems = x.shape[-1]
    picks = np.random.default_rng(seed).integers(0, problems, size=(resamples, problems))  # (R, P)
    means = x[..., picks].mean(axis=-1)  # (..., R)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=-1)
    return low, high


# ---- calibration ----------------------------------------------------------------------------------------------


def _probs_and_labels(probs, labels, caller: str):
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().cpu()
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu()
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise ValueError(f"{caller}: probs must be [N, C] with N >= 1 and C >= 2, got shape {probs.shape}")
    if labels.shape != (probs.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{caller}: labels must be N = {probs.shape[0]} integers, got shape {labels.shape} "
                         f"of {labels.dtype}")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"{caller}: labels must lie in [0, {probs.shape[1]}), got {labels.min()}..{labels.max()}")
    bad = np.flatnonzero(~np.isfinite(probs).all(1) | (probs < 0).any(1) | (np.abs(probs.sum(1) - 1) > 1e-4))
    if bad.size:
        raise ValueError(f"{caller}: row {bad[0]} of probs is not a distribution (non-negative, summing to 1): "
                         f"{probs[bad[0]].tolist()}")
    return probs, labels


def expected_calibration_error(probs, labels, n_bins: int = 15) -> float:
    """ECE on top-label confidence with n_bins equal-width bins (lo, hi] = ((b-1)/n_bins, b/n_bins]:

        ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|

    conf = max_c p_c of each row, its prediction argmax_c p_c (the first on ties), acc(B) the fraction of the
    bin's predictions that equal the label. `probs` [N, C] rows are distributions, `labels` [N] class indices."""
    probs, labels = _probs_and_labels(probs, labels, "expected_calibration_error")
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"expected_calibration_error: n_bins must be a positive integer, got {n_bins!r}")
    confidence = probs.max(1)  # (N,)
    correct = (probs.argmax(1) == labels).astype(np.float64)  # (N,)
    edges = np.arange(n_bins + 1) / n_bins  # exact b / n_bins, so a confidence of 0.6 falls in (0.4, 0.6]
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def brier_score(probs, labels) -> float:
    """Multi-class Brier score, summed over classes and averaged over rows: (1/N) sum_n sum_c (p_nc - [c = y_n])^2,
    in [0, 2]: 0 for a confident right answer, 2 for a confident wrong one."""
    probs, labels = _probs_and_labels(probs, labels, "brier_score")
    one_hot = np.eye(probs.shape[1])[labels]  # (N, C)
    return float(((probs - one_hot) ** 2).sum(1).mean())


def accuracy(probs, labels) -> float:
    """Fraction of rows whose argmax (the first on ties) is the label."""
    probs, labels = _probs_and_labels(probs, labels, "accuracy")
    return float((probs.argmax(1) == labels).mean())


def option_probabilities(logits, option_ids) -> torch.Tensor:
    """Normalised probabilities of the answer options' first tokens (Appendix D):

        p(o) = softmax(logits)[id_o] / sum_o' softmax(logits)[id_o'] = softmax(logits[option_ids])

    `logits` [..., V] of the token after the prompt -> [..., len(option_ids)] (float32)."""
    option_ids = list(option_ids)
    if len(set(option_ids)) != len(option_ids):
        raise ValueError(f"option_probabilities: option token ids must be distinct, got {option_ids}")
    return logits.float()[..., option_ids].softmax(-1)


# ---- helpers that run a model ---------------------------------------------------------------------------------


def _right_padded(sequences, pad_id: int, device):
    """Token lists -> (tokens [B, T] long, mask [B, T] bool): each row left-aligned, padded on the right
    (data.batching.pad_rows, the batches' own padding)."""
    if any(len(s) == 0 for s in sequences):
        raise ValueError("a token sequence is empty")
    tokens, _, _, mask = pad_rows([list(s) for s in sequences], [len(s) for s in sequences], pad_id)
    return tokens.to(device), mask.to(device)


@contextlib.contextmanager
def _evaluating(model):
    """no_grad and eval mode (no LoRA dropout) for the block, the previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _batches(items, batch_size: int):
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    for start in range(0, len(items), batch_size):
        yield items[start:start + batch_size]


def mean_pooled_hidden_states(model, sequences, batch_size: int = 32, pad_id: int = 0) -> torch.Tensor:
    """The default embedder phi for Eq. 44: the mean of the final-norm hidden states over a sequence's real
    tokens, phi(y) = (1/|y|) sum_t h_t(y). `sequences`: N token lists -> [N, D] float32 (on CPU)."""
    device = model.embed_tokens.weight.device
    out = []
    with _evaluating(model):
        for chunk in _batches(list(sequences), batch_size):
            tokens, mask = _right_padded(chunk, pad_id, device)  # (B, T)
            hidden = model.hidden_states(tokens).float()  # (B, T, D)
            weights = mask.float()[..., None]  # (B, T, 1)
            out.append(((hidden * weights).sum(1) / weights.sum(1)).cpu())  # (B, D)
    return torch.cat(out)


def _as_pairs(prompt_ids, completions):
    completions = list(completions)
    if prompt_ids and isinstance(prompt_ids[0], (int, np.integer)):
        prompt_ids = [prompt_ids] * len(completions)  # one prompt shared by every completion
    prompt_ids = list(prompt_ids)
    if len(prompt_ids) != len(completions):
        raise ValueError(f"{len(prompt_ids)} prompts for {len(completions)} completions")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("a prompt is empty (a chat prompt starts with BOS)")
    return prompt_ids, completions


def sequence_nll(model, prompt_ids, completions, batch_size: int = 32, pad_id: int = 0) -> torch.Tensor:
    """-log pi(y | x) = -sum_t log softmax(logits_t)[y_t] over each completion's tokens (EOS included when
    present), float64 [N] on CPU. Run under `disable_lora(model)` (or on the reference model) this is the
    reference cross-entropy of samples y ~ pi: H(pi, pi_ref) ~ mean over samples; per token, divide the sum by
    the total number of completion tokens. `prompt_ids` is one prompt for all completions or one per completion."""
    prompt_ids, completions = _as_pairs(prompt_ids, completions)
    device = model.embed_tokens.weight.device
    pairs = list(zip(prompt_ids, completions))
    out = []
    with _evaluating(model):
        for chunk in _batches(pairs, batch_size):
            tokens, mask = _right_padded([p + c for p, c in chunk], pad_id, device)  # (B, T)
            targets = torch.zeros_like(mask)  # (B, T): True where a completion token is predicted
            for row, (prompt, completion) in enumerate(chunk):
                targets[row, len(prompt):len(prompt) + len(completion)] = True
            logits = model(tokens[:, :-1])  # (B, T-1, V), float32
            token_logprobs = (logits.gather(-1, tokens[:, 1:, None]).squeeze(-1)
                              - logits.logsumexp(-1))  # (B, T-1): log softmax at the targets only
            token_logprobs = token_logprobs.double().masked_fill(~targets[:, 1:], 0.0)
            out.append(-token_logprobs.sum(-1).cpu())  # (B,)
    return torch.cat(out)


def load_reward_head(directory):
    """(weight [D], bias []) of the scalar reward head that `train.py --loss reward` saves beside its adapter,
    read by spl.step.load_reward_head."""
    head = spl_load_reward_head(directory)
    return head.score.weight.detach().reshape(-1), head.score.bias.detach().reshape(())


def reward_scores(model, weight, bias, prompt_ids, completions, batch_size: int = 32, pad_id: int = 0):
    """Reward model scores r(x, y) = w . h_last + b, h_last the final-norm hidden state at the sequence's last
    token (its EOS, as the reward model was trained), float32 [N] on CPU. The paper's quality metric is the
    mean over samples. `model` carries the reward model's adapter; (weight, bias) from `load_reward_head`.
    Scored by the training step's own scorer (spl.step.RewardHead and reward_scores), on right-padded batches."""
    prompt_ids, completions = _as_pairs(prompt_ids, completions)
    device = model.embed_tokens.weight.device
    head = RewardHead(weight.numel()).to(device)
    with torch.no_grad():
        head.score.weight.copy_(weight.float().reshape(1, -1))  # [1, D]
        head.score.bias.copy_(bias.float().reshape(1))  # [1]
    out = []
    with _evaluating(model):
        for chunk in _batches(list(zip(prompt_ids, completions)), batch_size):
            tokens, mask = _right_padded([p + c for p, c in chunk], pad_id, device)  # (B, T)
            out.append(head_scores(model, head, {"input_ids": tokens, "attention_mask": mask}).cpu())  # (B,)
    return torch.cat(out)


def option_token_ids(tokenizer, letters: str = "ABCD") -> list[int]:
    """The token an assistant turn starting with each letter begins with; each letter must be one token."""
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"option_token_ids: {letter!r} encodes to {len(encoded)} tokens {encoded}, not one")
        ids.append(encoded[0])
    return ids


def multiple_choice_probabilities(model, tokenizer, prompts, letters: str = "ABCD", batch_size: int = 32):
    """For each multiple-choice prompt (Appendix D's format, as a user turn in the chat format), the normalised
    probabilities of the option letters as the first token of the answer: [N, len(letters)] float32 on CPU."""
    option_ids = option_token_ids(tokenizer, letters)
    device = model.embed_tokens.weight.device
    sequences = [tokenizer.encode_prompt([{"role": "user", "content": prompt}]) for prompt in prompts]
    out = []
    with _evaluating(model):
        for chunk in _batches(sequences, batch_size):
            tokens, mask = _right_padded(chunk, tokenizer.pad_id, device)  # (B, T)
            last = mask.long().sum(-1) - 1  # (B,)
            logits = model(tokens)[torch.arange(len(chunk), device=device), last]  # (B, V)
            out.append(option_probabilities(logits, option_ids).cpu())  # (B, options)
    return torch.cat(out)


__all__ = ["pairwise_cosine_distance", "vendi_score", "distinct_n", "attribute_entropy", "unique_fraction",
           "story_attributes", "validity_rate", "pass_at_k", "expected_calibration_error", "brier_score",
           "accuracy", "option_probabilities", "mean_pooled_hidden_states", "sequence_nll", "load_reward_head",
           "reward_scores", "option_token_ids", "multiple_choice_probabilities"]
