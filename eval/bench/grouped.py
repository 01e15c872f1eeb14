"""Benchmark: the LoRA SPL training step on prompt-grouped batches against the pair batches, on the world's pairs.

    python eval/bench/grouped.py                     # the world's opinion pairs, 8 prompts a batch, 1 thread
    python eval/bench/grouped.py --prompts 30        # every prompt in one batch

The world's default data (`data/world/opinion_pairs_soft.jsonl`) hold every unordered pair of each question's
3-5 options: a question with K options has K(K-1)/2 pairs, which the pair batch (`data.batching.collate`) scores
as K(K-1) rows (each option K - 1 times) and the grouped batch (`collate_grouped`) as K rows. The step, the same on
both sides: the policy's log-probs of the batch's rows (the world's model, LoRA r = 16 on all seven projections,
the fused log-prob head), SPL (Eq. 5) over the same pairs against the same reference log-probs, backward and one
AdamW step. Both run in this process on the same batches of whole prompts (`PromptGroupedBatches`' order),
alternating which goes first in each repeat; the ratio of the medians is what to read (the machine may be shared).
"""
import argparse
import os
import statistics
import sys
from pathlib import Path
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from data.batching import PromptGroupedBatches, collate, collate_grouped, row_values  # noqa: E402
from data.tokenization import load_preference_data  # noqa: E402
from models import Tokenizer, add_lora, load_pretrained  # noqa: E402
from models.lora import TARGET_NAMES  # noqa: E402
from spl.logprobs import sequence_logprobs  # noqa: E402
from spl.losses import anchored_spl_loss, spl_loss  # noqa: E402

WORLD = str(Path(__file__).resolve().parents[2] / "data" / "world")
ALPHA, BETA = 0.2, 0.1


def logps(model, batch):
    hidden = model.hidden_states(batch["input_ids"])  # [rows, T, D]
    return sequence_logprobs(hidden, model.lm_head.weight, batch["targets"], batch["loss_mask"], compile=False)


def pair_step(model, optimizer, examples, ref):
    batch = collate(examples, 0)
    pairs = len(examples)
    rows = logps(model, batch)  # [2B]
    index = batch["pair_index"]
    losses, _, _ = spl_loss(rows[:pairs], rows[pairs:], ref[index, 0], ref[index, 1], ALPHA, BETA,
                            batch["chosen_prob"])
    losses.mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return batch["input_ids"].shape[0]


def grouped_step(model, optimizer, examples, ref):
    batch = collate_grouped(examples, 0)
    index = batch["pair_index"]
    ref_rows = row_values(batch, ref[index, 0], ref[index, 1])  # [R]
    losses, _, _ = anchored_spl_loss(logps(model, batch), ref_rows, batch["pair_chosen"], batch["pair_rejected"],
                                     batch["response_prompt"], ALPHA, BETA, 0.0, batch["chosen_prob"])
    losses.mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return batch["input_ids"].shape[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts per batch (the world has 30)")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps per side")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_pretrained(os.path.join(WORLD, "model"))
    tokenizer = Tokenizer(os.path.join(WORLD, "model", "tokenizer.model"))
    examples, _ = load_preference_data(os.path.join(WORLD, "opinion_pairs_soft.jsonl"), tokenizer, 128, 64)
    add_lora(model, 16, 32.0, 0.0, list(TARGET_NAMES))
    ref = -10 * torch.rand(len(examples), 2)  # [N, 2]: the step's cost does not depend on their values
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    order = PromptGroupedBatches(examples, args.prompts, tokenizer.pad_id, seed=0)
    batches = [[examples[i] for i in indices] for indices in order.epoch_order(0)]
    times = {"pairs": [], "grouped": []}
    rows = {"pairs": 0, "grouped": 0}
    pair_count = 0
    steps = {"pairs": pair_step, "grouped": grouped_step}
    for side in steps:  # warm-up, untimed
        steps[side](model, optimizer, batches[0], ref)
    for repeat in range(args.repeats):
        batch = batches[repeat % len(batches)]
        pair_count += len(batch)
        for side in (("pairs", "grouped") if repeat % 2 == 0 else ("grouped", "pairs")):
            started = time.perf_counter()
            rows[side] += steps[side](model, optimizer, batch, ref)
            times[side].append(time.perf_counter() - started)
    pairs_time, grouped_time = statistics.median(times["pairs"]), statistics.median(times["grouped"])
    print(f"{args.repeats} steps per side of {args.prompts} prompts ({pair_count / args.repeats:.1f} pairs a step), "
          f"{args.threads} thread(s)")
    print(f"rows scored: pair batches {rows['pairs']}, grouped {rows['grouped']} "
          f"({rows['grouped'] / rows['pairs']:.3f}x)")
    print(f"median step: pair batches {1e3 * pairs_time:.1f} ms, grouped {1e3 * grouped_time:.1f} ms")
    print(f"grouped / pair step time: {grouped_time / pairs_time:.3f}x (speed-up {pairs_time / grouped_time:.2f}x)")


if __name__ == "__main__":
    main()
