"""Generation as small composable functions (after gpt-fast):

    logits_to_probs -> sample_token -> prefill -> decode_one_token -> generate -> sample_completions

`sample_completions` is what sample.py and the experiments call: N completions per text prompt, as Completions.

The sampling methods the paper compares (token temperature; top-k; top-p; min-p) are pure functions over a
`[..., V]` logit tensor. Filters follow HF transformers' order: temperature first, then top-k, top-p, min-p,
each computed on the tempered distribution. Temperature 0 is greedy decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.mistral import KVCache, Mistral


def top_k_filter(logits, k: int):
    """Keep the k largest logits per row (ties at the k-th value kept), -inf elsewhere."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p: float):
    """Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches p (always >= 1)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = cumulative - sorted_logits.softmax(-1) >= p  # mass before this token already reaches p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits, p_base: float):
    """min-p (Nguyen et al. 2024): keep tokens with probability >= p_base * (probability of the top token)."""
    probs = logits.softmax(-1)
    threshold = p_base * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def logits_to_probs(logits, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                    min_p: float | None = None):
    """Sampling distribution [..., V] from raw logits (float32). Temperature must be > 0 here (0 is greedy)."""
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    if min_p is not None:
        logits = min_p_filter(logits, min_p)
    return logits.softmax(-1)


# Below this temperature sampling is greedy: logits / T overflows float32 for T ~ 1e-38 (a NaN distribution),
# and long before that the tempered distribution is the argmax up to ties (logit gaps of 1e-4 become 10 nats).
GREEDY_BELOW = 1e-5


def invert_cdf(probs, uniforms):
    """Index i per row of probs [B, V] (non-negative, any positive total) with cdf[i-1] <= u * total < cdf[i], for
    uniforms [B] in [0, 1): token i is drawn with probability probs[i] / total, a zero-probability token never (its
    interval is empty). The cumulative sum is float64, so the interval of a token of probability 1e-9 in a
    49152-token vocabulary is off by ~1e-12 at most (float32 would be ~1e-5 off, more than such a token's width)."""
    cdf = probs.double().cumsum(-1)  # (B, V)
    total = cdf[:, -1:]  # (B, 1)
    u = uniforms.double()[:, None] * total  # (B, 1), in [0, total]
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # < total even where u * total rounds up
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)  # (B,) the first index with cdf > u


def sample_from_probs(probs, generator=None):
    """One draw per row of probs [B, V], by inverting its CDF with one uniform per row (`invert_cdf`).

    torch.multinomial draws one exponential variate per vocabulary entry (argmax p / q, q ~ Exp(1)): at one thread,
    V = 49152 and 16 rows, SmolLM2's 16 x 128 tokens took 29.6 CPU-s with it and 24.7 with this (eval/bench/
    generate.py, docs/speed.md; HF's `generate` pays the same). One uniform per row and a cumulative sum cost ~1 ms
    a step. The draws follow the same distribution; for a given generator they are other draws than multinomial's."""
    uniforms = torch.rand(probs.shape[0], generator=generator, device=probs.device, dtype=torch.float64)  # (B,)
    return invert_cdf(probs, uniforms)


def sample_token(logits, temperature: float = 1.0, top_k=None, top_p=None, min_p=None, generator=None):
    """One token per row of `logits` [B, V]: argmax at temperature 0 (or below GREEDY_BELOW), else a draw from
    `logits_to_probs`."""
    if temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p, min_p)
    return sample_from_probs(probs, generator)


def prefill(model: Mistral, prompt, cache: KVCache):
    """Run the prompt [B, T] through the model, filling the cache; logits of the last position [B, V]."""
    return model(prompt, cache=cache)[:, -1]


def decode_one_token(model: Mistral, token, cache: KVCache):
    """Feed one token per row [B] at cache.pos; logits of the next position [B, V]."""
    return model(token[:, None], cache=cache)[:, -1]


def decode_n_tokens(model: Mistral, logits, cache: KVCache, max_new_tokens: int, sample, eos_id: int | None = None,
                    logprob_dtype=torch.float32):
    """Decode up to `max_new_tokens` tokens per row from the next-token logits [N, V] of a filled cache, drawing
    each with `sample(logits) -> [N]`; a row stops at its first `eos_id`, the batch when every row has.
    Returns new_tokens [N, max_new_tokens] (valid up to lengths), lengths [N] (EOS included) and the rows'
    log-probabilities of their tokens under the model at temperature 1, unfiltered, summed in logprob_dtype [N]."""
    rows, device = logits.shape[0], logits.device
    new_tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, dtype=logprob_dtype, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    lengths = torch.full((rows,), max_new_tokens, device=device)
    for step in range(max_new_tokens):
        token = sample(logits)  # (N,)
        token_logprob = logits.float().log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)  # (N,) float32
        logprobs += torch.where(finished, 0.0, token_logprob).to(logprob_dtype)
        new_tokens[:, step] = token
        if eos_id is not None:
            just_finished = (token == eos_id) & ~finished
            lengths = torch.where(just_finished, step + 1, lengths)
            finished |= just_finished
            if bool(finished.all()):
                break
        if step + 1 < max_new_tokens:
            logits = decode_one_token(model, token, cache)  # (N, V)
    return new_tokens, lengths, logprobs


def decode_until(model: Mistral, logits, cache: KVCache, max_new_tokens: int, sample, eos_id: int | None = None,
                 stop=None, logprob_dtype=torch.float32):
    """`decode_n_tokens` where rows leave the batch as they end: at their first `eos_id`, or where
    `stop(tokens) -> bool [n]`, called after each step with the running rows' tokens so far [n, step + 1],
    says so (e.g. a row that can no longer be one of a few answers). An ended row's cache rows are dropped, so
    each step costs the rows still running. Returns what `decode_n_tokens` does (a stopped row's length counts
    its last token). The draws come from a shrinking batch, so with a seeded generator the samples differ from
    `decode_n_tokens`' (each row's tokens have the same distribution: each is drawn from its own logits)."""
    rows, device = logits.shape[0], logits.device
    new_tokens = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, dtype=logprob_dtype, device=device)
    lengths = torch.full((rows,), max_new_tokens, device=device)
    running = torch.arange(rows, device=device)  # (n,) the batch rows still decoding, in cache order
    for step in range(max_new_tokens):
        token = sample(logits)  # (n,)
        token_logprob = logits.float().log_softmax(-1).gather(-1, token[:, None]).squeeze(-1)  # (n,) float32
        logprobs[running] += token_logprob.to(logprob_dtype)
        new_tokens[running, step] = token
        ended = token == eos_id if eos_id is not None else torch.zeros_like(token, dtype=torch.bool)  # (n,)
        if stop is not None:
            ended |= torch.as_tensor(stop(new_tokens[running, :step + 1]), dtype=torch.bool, device=device)
        lengths[running[ended]] = step + 1
        if bool(ended.all()) or step + 1 == max_new_tokens:
            break
        if bool(ended.any()):
            keep = (~ended).nonzero().squeeze(1)  # (n',)
            running, token = running[keep], token[keep]
            cache.reorder(keep)
        logits = decode_one_token(model, token, cache)  # (n, V)
    return new_tokens, lengths, logprobs


@dataclass
class PromptPrefix:
    """Keys and values of tokens that several prompts open with (a system prompt, few-shot turns), computed once:
    `generate(..., prefix=...)` copies them into the prompt's cache and prefills only the rest. Attention of the
    rest reads the same keys and values a whole prefill would write, so the logits are the same up to float
    rounding (tests/test_models_generate.py)."""
    ids: list[int]
    cache: KVCache  # batch 1, positions 0 .. len(ids) - 1 filled


@torch.no_grad()
def prefill_prefix(model: Mistral, ids: list[int]) -> PromptPrefix:
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    cache = KVCache(model.config, 1, len(ids), dtype=dtype, device=device)
    if ids:
        prefill(model, torch.tensor([ids], dtype=torch.long, device=device), cache)
    return PromptPrefix(list(ids), cache)


def common_prefix(prompts: list[list[int]]) -> list[int]:
    """The longest token prefix of every prompt, short of each prompt's last token (a prompt's own prefill then
    has a token to give the next-token logits)."""
    shortest = min(len(ids) for ids in prompts) - 1
    common = []
    for column in zip(*(ids[:shortest] for ids in prompts)):
        if any(token != column[0] for token in column):
            break
        common.append(column[0])
    return common


@dataclass
class Generation:
    tokens: list[list[int]]  # per sample, the new tokens up to and including EOS (if it came)
    logprobs: list[float]  # per sample, log-probability of those tokens under the model (temperature 1, unfiltered)


@torch.no_grad()
def generate(model: Mistral, prompt_ids: list[int], max_new_tokens: int, num_samples: int = 1,
             temperature: float = 1.0, top_k=None, top_p=None, min_p=None, eos_id: int | None = None,
             generator: torch.Generator | None = None, prefix: PromptPrefix | None = None,
             stop=None) -> Generation:
    """`num_samples` continuations of one prompt, batched: the prompt is prefilled once and its cache repeated.
    prefix: keys and values of the prompt's first tokens, computed once for several prompts (`prefill_prefix`;
    used where the prompt opens with them and goes on after). stop: rows leave the batch as they end, at EOS or
    where stop(tokens so far) says so (`decode_until`); without it every row decodes until all have ended."""
    if not prompt_ids:
        raise ValueError("generate: prompt_ids is empty (a chat prompt starts with BOS)")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, dtype=dtype, device=device)
    n = len(prefix.ids) if prefix is not None else 0
    if 0 < n < len(prompt_ids) and prompt_ids[:n] == prefix.ids:
        for layer in range(len(cache.keys)):  # positions 0 .. n - 1 from the shared prefill
            cache.keys[layer][:, :, :n] = prefix.cache.keys[layer][:, :, :n]
            cache.values[layer][:, :, :n] = prefix.cache.values[layer][:, :, :n]
        cache.pos = n
        logits = prefill(model, prompt[:, n:], cache)  # (1, V): only the prompt's own tokens
    else:
        logits = prefill(model, prompt, cache)  # (1, V)
    cache.reorder(torch.zeros(num_samples, dtype=torch.long, device=device))
    logits = logits.expand(num_samples, -1)  # (N, V)

    def draw(x):
        return sample_token(x, temperature, top_k, top_p, min_p, generator)

    if stop is None:
        new_tokens, lengths, logprobs = decode_n_tokens(model, logits, cache, max_new_tokens, draw, eos_id)
    else:
        new_tokens, lengths, logprobs = decode_until(model, logits, cache, max_new_tokens, draw, eos_id, stop)
    tokens = [new_tokens[i, : int(lengths[i])].tolist() for i in range(num_samples)]
    return Generation(tokens=tokens, logprobs=logprobs.tolist())


# ---- text prompts in, completions out (sample.py and the experiments) -----------------------------------------

@dataclass
class Completion:
    prompt: str | list  # the text of a user turn, or a conversation (chat messages ending with the user's turn)
    prompt_index: int
    index: int  # the sample's number within its prompt, 0..N-1
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    eos: bool
    logprob: float  # log pi(token_ids | prompt_ids): the sampling model at temperature 1, unfiltered


def user_prompt_ids(tokenizer, prompt, chat: bool = True) -> list[int]:
    """BOS + enc("[INST] text [/INST]") (a user turn in the tokenizer's chat format), or BOS + enc(text) without
    chat (BOS where the tokenizer adds one: SmolLM2's and Qwen's tokenizer.json do not). A prompt may also be a
    conversation, a list of chat messages ([system] user (assistant user)*, ending with the user's turn): its
    generation prompt in the chat format (Tokenizer.encode_prompt)."""
    if isinstance(prompt, list):
        if not chat:
            raise ValueError("a conversation (a list of messages) needs the chat format")
        return tokenizer.encode_prompt(prompt)
    if chat:
        return tokenizer.encode_prompt([{"role": "user", "content": prompt}])
    return [tokenizer.bos_id] * tokenizer.adds_bos + tokenizer.encode(prompt)


@torch.no_grad()
def sample_completions(model, tokenizer, prompts, num_samples: int = 1, max_new_tokens: int = 128,
                       temperature: float = 1.0, top_k=None, top_p=None, min_p=None, chat: bool = True,
                       generator=None) -> list[Completion]:
    """`num_samples` completions of each prompt (one batch per prompt), in prompt order."""
    completions = []
    for prompt_index, text in enumerate(prompts):
        ids = user_prompt_ids(tokenizer, text, chat)
        out = generate(model, ids, max_new_tokens, num_samples, temperature, top_k, top_p, min_p,
                       eos_id=tokenizer.end_of_turn_id, generator=generator)  # EOS, <|im_end|> in ChatML
        for index, (tokens, logprob) in enumerate(zip(out.tokens, out.logprobs)):
            eos = bool(tokens) and tokens[-1] == tokenizer.end_of_turn_id
            completions.append(Completion(text, prompt_index, index, ids, tokens, tokenizer.decode(tokens), eos,
                                          logprob))
    return completions
