"""Many samples of one prompt, fast on a CPU: the best-of-N experiment's sampler.

`models.generate.generate` is exact and simple; for the best-of-N experiment (about 200,000 samples of a 1M-parameter
model on one thread) two of its costs dominate and are removed here without changing the distribution sampled:

- `torch.multinomial` over [N, V] took 30% of a step (a profile of 128 rows, V = 2000). The Gumbel-max trick
  draws the same distribution: argmax_i (log q_i - log E_i) with E_i ~ Exponential(1) i.i.d. picks i with
  probability q_i / sum_j q_j (as in gpt-fast's `multinomial_sample_one_no_sync`, which divides q by E).
- a finished row (EOS drawn) was still run through the model until the longest row ended. Here finished rows leave
  the batch (the KV cache keeps the rest, `KVCache.reorder`), so the cost is the tokens sampled, not N times
  the longest sample. A row's draws depend only on its own logits and its own exponentials, so dropping
  others does not change its distribution (the random stream differs from `generate`'s, as any reordering would).

Token temperature T divides the logits before the draw (Eq. 6), as in `models.generate.logits_to_probs`.
"""
from __future__ import annotations

import torch

from models.generate import user_prompt_ids
from models.mistral import KVCache

COMPACT_EVERY = 4  # steps between removals of finished rows (each removal copies the cache)


def gumbel_max_sample(logits, temperature: float, generator=None):
    """One index per row of logits [B, V] from softmax(logits / T): argmax(log softmax(logits / T) - log E),
    E ~ Exp(1) (see the module docstring). -> [B] long."""
    if temperature <= 0:
        raise ValueError(f"gumbel_max_sample: temperature must be > 0, got {temperature}")
    log_q = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B, V]
    exponentials = torch.empty_like(log_q).exponential_(1.0, generator=generator)  # [B, V]
    return (log_q - torch.log(exponentials)).argmax(dim=-1)  # [B]


@torch.no_grad()
def sample_texts(model, tokenizer, prompt: str, num_samples: int, max_new_tokens: int, temperature: float = 1.0,
                 generator=None) -> list[str]:
    """`num_samples` completions of one chat prompt (the tokenizer's user turn, as `sample_completions` with
    chat=True), decoded, each up to its end-of-turn token (left out) or max_new_tokens."""
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(f"sample_texts: need num_samples >= 1 and max_new_tokens >= 1, got {num_samples}, "
                         f"{max_new_tokens}")
    eos = tokenizer.end_of_turn_id
    ids = user_prompt_ids(tokenizer, prompt, chat=True)
    device = model.embed_tokens.weight.device
    cache = KVCache(model.config, 1, len(ids) + max_new_tokens, dtype=model.embed_tokens.weight.dtype, device=device)
    logits = model(torch.tensor([ids], device=device), cache=cache)[:, -1]  # [1, V]
    cache.reorder(torch.zeros(num_samples, dtype=torch.long, device=device))
    logits = logits.expand(num_samples, -1)  # [N, V]
    rows = torch.arange(num_samples, device=device)  # [B] which sample each live row is
    tokens = torch.zeros(num_samples, max_new_tokens, dtype=torch.long, device=device)  # [N, max_new_tokens]
    lengths = torch.full((num_samples,), max_new_tokens, dtype=torch.long, device=device)  # [N]
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)  # [B] finished live rows
    for step in range(max_new_tokens):
        token = gumbel_max_sample(logits, temperature, generator)  # [B]
        tokens[rows, step] = token
        ended = (token == eos) & ~done
        lengths[rows[ended]] = step  # the text stops before the end-of-turn token
        done |= ended
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        if step % COMPACT_EVERY == COMPACT_EVERY - 1 and bool(done.any()):
            keep = (~done).nonzero().squeeze(-1)  # [B']
            cache.reorder(keep)
            rows, token, done = rows[keep], token[keep], done[keep]
        logits = model(token[:, None], cache=cache)[:, -1]  # [B, V]
    return [tokenizer.decode(tokens[i, : int(lengths[i])].tolist()) for i in range(num_samples)]
