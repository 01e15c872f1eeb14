"""Benchmark: the LoRA SPL training step with shared prefixes (models/prefix.py) against the unshared one.

    python eval/bench/prefix.py                       # HH-RLHF-shaped pairs, D = 512, 4 layers, V = 32000, 1 thread
    python eval/bench/prefix.py --group-by-length     # batches of similar lengths (less padding on the unshared side)
    python eval/bench/prefix.py --prompt-median 40    # shorter prompts: less to share
    python eval/bench/prefix.py --common-prefix 200   # every prompt opens with the same 200 tokens (a system
                                                      # prompt, few-shot turns): the prefix tree's case

The step, the same on both sides: the policy's log-probs of every row of a batch of 8 pairs (LoRA r = 16 on all
seven projections, the fused log-prob head), the SPL loss (Eq. 5) against reference log-probs computed beforehand,
backward and gradient clipping (no optimizer update, so both sides see the same weights in every repeat; AdamW's
update is the same small cost on both). Unshared: `model.hidden_states` over the [2B, T] rows prompt + response
(each prompt computed twice). Shared: `models.prefix.shared_prefix_logprobs` (each prompt once, each response
continuing from its keys and values, no padding through the projections and MLPs; the tokens prompts share,
such as a common system prompt, computed once per batch: the prefix tree). Per prompt: the same with each prompt
its own root (`split_shared_prefix(batch, tree=False)`, the shared path before the tree). They run in this process
on the same batches, alternating which goes first in each repeat; the ratios of the medians are what to read (the
machine may be shared).

HH-RLHF shape: the prompt is a multi-turn transcript, on average longer than both responses together. Lengths
are drawn log-normal (prompt median `--prompt-median`, each response median `--response-median`, sigma 0.6,
clipped to [8, 512] and [2, 256]), which with the defaults makes the prompt about 60% of a pair's tokens
(prompt + chosen + rejected; printed). Batches as train.py draws them (random pairs, or with --group-by-length
pairs of similar row length). Printed: the token positions each side runs through the projections and MLPs
(the unshared rows with their padding; the shared side packs real tokens only), and the step times.
"""
import argparse
import statistics
import sys
from pathlib import Path
import time

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from data.batching import PreferenceBatches, collate_grouped  # noqa: E402
from data.tokenization import PreferenceExample  # noqa: E402
from models import Mistral, MistralConfig, add_lora  # noqa: E402
from models.lora import TARGET_NAMES, disable_lora  # noqa: E402
from spl.logprobs import sequence_logprobs  # noqa: E402
from spl.losses import spl_loss  # noqa: E402
from models.prefix import split_shared_prefix  # noqa: E402
from models.lora import output_weight  # noqa: E402
from models.prefix import shared_prefix_hidden_states  # noqa: E402
from spl.step import shared_prefix_logprobs  # noqa: E402

ALPHA, BETA = 0.2, 0.1


def hh_shaped_examples(count, vocab, prompt_median, response_median, seed=0, common_prefix=0):
    """`count` PreferenceExamples of random tokens with log-normal lengths (module docstring), each prompt opening
    with the same `common_prefix` tokens (after BOS) before its own."""
    rng = np.random.default_rng(seed)

    def length(median, low, high):
        return int(np.clip(round(median * np.exp(0.6 * rng.standard_normal())), low, high))

    def ids(n):
        return rng.integers(3, vocab, n).tolist()

    common = ids(common_prefix)
    return [PreferenceExample([1] + common + ids(length(prompt_median, 8, 512) - 1),
                              ids(length(response_median, 2, 256) - 1) + [2],
                              ids(length(response_median, 2, 256) - 1) + [2], 0.75, index=i) for i in range(count)]


def unshared_logprobs(model, batch):
    hidden = model.hidden_states(batch["input_ids"])  # (2B, T, D)
    return sequence_logprobs(hidden, model.lm_head.weight, batch["targets"], batch["loss_mask"], compile=False)


def shared_logprobs(model, batch):
    return shared_prefix_logprobs(model, batch, compile=False)  # (2B,)


def per_prompt_logprobs(model, batch):
    split = split_shared_prefix(batch, tree=False)  # each prompt its own root: no tokens shared across prompts
    return sequence_logprobs(shared_prefix_hidden_states(model, split), output_weight(model),
                             split["continuation_targets"], split["continuation_loss_mask"], compile=False)  # (2B,)


SIDES = {"unshared": unshared_logprobs, "per prompt": per_prompt_logprobs, "shared": shared_logprobs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=8, help="pairs per batch")
    p.add_argument("--batches", type=int, default=4, help="distinct batches, each stepped once per repeat and side")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-median", type=int, default=110)
    p.add_argument("--response-median", type=int, default=36)
    p.add_argument("--common-prefix", type=int, default=0, help="tokens every prompt opens with (after BOS)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--group-by-length", action="store_true", help="batches of similar lengths (train.py's option)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    heads = args.dim // 64
    config = MistralConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.dim * 7 // 2,
                           num_hidden_layers=args.layers, num_attention_heads=heads,
                           num_key_value_heads=max(1, heads // 4), head_dim=64, rms_norm_eps=1e-5, rope_theta=1e4,
                           sliding_window=4096, tie_word_embeddings=False, max_position_embeddings=32768)
    model = add_lora(Mistral(config).init_weights(), 16, 16.0, 0.0, TARGET_NAMES).train()
    trainable = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    examples = hh_shaped_examples(args.pairs * args.batches, args.vocab, args.prompt_median, args.response_median,
                                  common_prefix=args.common_prefix)
    order = PreferenceBatches(examples, args.pairs, 0, seed=0, group_by_length=args.group_by_length,
                              collate_fn=collate_grouped)
    batches = [next(order) for _ in range(args.batches)]  # rows prompt + chosen, prompt + rejected per pair
    prompt_tokens = sum(len(e.prompt_ids) for e in examples)
    pair_tokens = sum(len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples)
    unshared_positions = sum(b["input_ids"].numel() for b in batches)  # padding included
    unshared_real = sum(int(b["attention_mask"].sum()) for b in batches)
    splits = [split_shared_prefix(b) for b in batches]
    per_prompt_positions = sum(int(s["prefix_lengths"].sum() + s["continuation_lengths"].sum()) for s in splits)
    shared_positions = sum(sum(int(level["lengths"].sum()) for level in s["levels"])
                           + int(s["continuation_lengths"].sum()) for s in splits)  # the prefix tree's nodes, once
    with torch.no_grad(), disable_lora(model):
        references = [unshared_logprobs(model, b) for b in batches]  # (2B,) each, LoRA off

    def step(score, batch, reference):
        logps = score(model, batch)  # (2B,)
        chosen, rejected = batch["pair_chosen"], batch["pair_rejected"]
        losses, _, _ = spl_loss(logps[chosen], logps[rejected], reference[chosen], reference[rejected], ALPHA, BETA,
                                chosen_prob=batch["chosen_prob"])  # Eq. 5
        loss = losses.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.zero_grad(set_to_none=True)  # no optimizer.step(): both sides see the same weights every time
        return loss.detach()

    # Both sides on the first batch: the same loss (B = 0, so the policy is the reference: Eq. 5 at step 0).
    first = {name: float(step(score, batches[0], references[0])) for name, score in SIDES.items()}
    times = {name: [] for name in SIDES}
    for repeat in range(args.repeats):
        order = list(SIDES) if repeat % 2 == 0 else list(SIDES)[::-1]
        for name in order:
            score = SIDES[name]
            start = time.perf_counter()
            for batch, reference in zip(batches, references):
                step(score, batch, reference)
            times[name].append((time.perf_counter() - start) / len(batches))
    unshared_s, shared_s = statistics.median(times["unshared"]), statistics.median(times["shared"])
    per_prompt_s = statistics.median(times["per prompt"])
    print(f"model D={args.dim} layers={args.layers} V={args.vocab} LoRA r=16 all-linear; {args.pairs} pairs per "
          f"batch, {args.batches} batches, {args.repeats} alternating repeats, {torch.get_num_threads()} thread(s), "
          f"CPU float32")
    print(f"pairs: prompt {prompt_tokens / pair_tokens:.0%} of a pair's tokens (prompt + chosen + rejected); "
          f"token positions through the projections and MLPs per step: unshared {unshared_positions / len(batches):.0f} "
          f"({1 - unshared_real / unshared_positions:.0%} of them padding), shared {shared_positions / len(batches):.0f} "
          f"(no padding) ({shared_positions / unshared_positions:.2f}x), per prompt "
          f"{per_prompt_positions / len(batches):.0f} ({per_prompt_positions / unshared_positions:.2f}x)")
    print(f"first loss: unshared {first['unshared']:.6f}, shared {first['shared']:.6f}, "
          f"per prompt {first['per prompt']:.6f}")
    print(f"step time (median): unshared {unshared_s * 1000:.0f} ms, shared {shared_s * 1000:.0f} ms, "
          f"per prompt {per_prompt_s * 1000:.0f} ms")
    print(f"shared / unshared: {shared_s / unshared_s:.2f}x (target <= 0.75x); shared / per prompt: "
          f"{shared_s / per_prompt_s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
