"""Train a policy with Soft Preference Learning (or DPO, IPO, cDPO, f-DPO, SFT, a reward model).

    python train.py --alpha 0.2 --beta 0.1                                 # the embedded world, LoRA, CPU
    python train.py --model DIR --data prefs.jsonl --alpha 0.2 --beta 0.1 --dtype bfloat16   # paper-chat recipe

With --model and no --preset, the options not given take the paper's chat recipe (PRESETS["paper-chat"]);
TrainConfig's own defaults are tuned for the embedded world's tiny model. With no --model/--data it trains on
the embedded synthetic world (data/world/): opinion questions with known
population preferences and a tiny reference model trained by this project. There the closed-form SPL optimum
`pi ∝ pi_ref^(beta/alpha) p^(1/alpha)` (Prop. A.1) is computable, and the run ends with a report comparing it
with what was learned.

The loop, top to bottom (`run`, one function per phase): load_model and load_data; trainable_parameters (LoRA);
reference_log_probs once (the model before any update, cached); resume; then per optimizer step the learning
rate (warmup + cosine), accumulate_gradients over `grad_accum` micro-batches with the loss that step_function
chose once for --loss, gradient clipping, AdamW on the trainable parameters, a metrics line, atomic checkpoints
every --save-every steps (save_checkpoint); last write_outputs (adapter or model, and the world's report).

At scale, with no change to the code:

    torchrun --nproc_per_node 8 train.py --model DIR --data prefs.jsonl --dtype bfloat16 --grad-checkpointing
    torchrun --nproc_per_node 8 train.py ... --fsdp      # frozen weights sharded across the GPUs (FSDP2)

--batch-size is the number of pairs per optimizer step, all processes together:
batch_size = processes x grad_accum x micro-batch. Every process draws the same seeded order of global
micro-batches and takes its own contiguous share of each, back-propagates `sum over its pairs of loss / N`
with N the step's global pair count, and the trainable (LoRA) gradients are summed across processes in one
all-reduce per optimizer step: the update equals the one-process update on the same global batch. (A manual
all-reduce rather than DistributedDataParallel: the step calls `model.hidden_states`, not the model's forward
that DDP hooks; the LoRA gradients are a few MB; and one reduction after all accumulation micro-batches is
exact and visible.) Reference log-probs: each process scores its share, an all-reduce joins them, rank 0
writes the cache. Only rank 0 writes files and prints; a checkpoint holds the global data position and every
process's RNG state, so --resume works under torchrun. --fsdp shards the frozen base weights with
`torch.distributed.fsdp.fully_shard` (per decoder block, then the root) and keeps the LoRA parameters and the
output head whole on every process, so gradients, optimizer and checkpoints are the same as without it.
"""
from __future__ import annotations

from spl.signals import exit_quietly_on_stop

if __name__ == "__main__":  # before torch's import (seconds): a stop signal is one line from the first line on
    exit_quietly_on_stop("train.py")

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from cli import ArgumentParser, UsageError, check_fits, check_seed, check_threads, choose_threads, resolve_device
from data.world import DEFAULT_DIR as WORLD_DIR, FILES as WORLD_FILES, MODEL_DIR as WORLD_MODEL, load_world
from data.batching import PreferenceBatches, PromptGroupedBatches, prompt_groups
from data.preferences import DataError
from data.reference_cache import ReferenceCacheKey, cache_path, file_sha256
from data.sft import SequenceBatches, load_sft_data
from data.tokenization import check_lengths, load_preference_data
from eval.opinions import add_reward_optimum, format_report, format_reward_optimum, world_report
from models import (CheckpointError, ConfigError, MistralConfig, Tokenizer, add_lora, build_model, load_pretrained,
                    save_pretrained)
from models.chat_format import FORMATS as CHAT_FORMATS
from models.fields import read_json_object
from models.lora import HEAD_TARGET, TARGET_NAMES, check_head_dropout, max_rank, resolve_targets
from models.peft import save_adapter
from models.tokenizer import check_vocabulary, describe_format
from spl import runs
from spl.distributed import (Processes, broadcast_from_main, gather_to_main, share_batches, shard_frozen_weights,
                             shared_reference_logps, sum_across, sum_gradients_)
from spl.losses import FDPO_DIVERGENCES, check_label_smoothing
from spl.theory import log_num_completions
from spl import online
from spl.step import (PREFERENCE_LOSSES, Objective, RewardHead, grouped_preference_step, preference_step,
                      reference_logprobs, reward_step, sft_step)

LOSSES = (*PREFERENCE_LOSSES, "sft", "reward", "spl-online")

# The paper's two recipes (Appendix B.3: chat on HH-RLHF; Appendix C.4: math, Zephyr-like on UltraFeedback).
# LoRA targets are not stated in the paper; all seven projections are our choice.
PRESETS = {
    "paper-chat": dict(lora_rank=16, lora_alpha=16.0, lora_dropout=0.05, lr=1e-5, warmup_steps=150, batch_size=8,
                       steps=5000, epochs=None, max_length=512, max_prompt_length=256, beta=0.1),
    "paper-math": dict(lora_rank=64, lora_alpha=64.0, lora_dropout=0.05, lr=1e-5, warmup_steps=150, batch_size=4,
                       steps=None, epochs=1, max_length=1024, max_prompt_length=512, beta=0.1),
}
OWN_MODEL_PRESET = "paper-chat"  # what --model without --preset starts from (TrainConfig's defaults suit the world)
# The main job (no --model, --init-config or --data: the world's opinion pairs) also keeps the probability on the
# options: whole prompts per batch and the option-mass anchor (spl/losses.py anchored_spl_loss), values chosen by
# measurement (README "The main job"), and LoRA on the output head too: the frozen head bounds how far apart two
# options' logits can go (eval/output_gap.py), which DPO's peaked optima need. Any option given on the command line
# wins; other data keep the plain loss.
WORLD_MAIN_JOB = dict(anchor=0.1, prompts_per_batch=15, steps=200, lora_targets=[*TARGET_NAMES, HEAD_TARGET])
# Online SPL on the world (--loss spl-online, no --model, --init-config or --data): every question each step, K = 4
# samples of each, the output head trainable as for the main job, and the step size and length that measured best
# (README "Online SPL"; lr 1e-2 with the head oscillates). Any option given on the command line wins.
WORLD_ONLINE_JOB = dict(batch_size=30, online_samples=4, lr=3e-3, warmup_steps=10, steps=200,
                        lora_targets=[*TARGET_NAMES, HEAD_TARGET])

# What --resume may change; every other option must equal the run's config.json (spl/runs.check_resumed_config).
# How far to train (--steps/--epochs: extend a run, as one raises HF Trainer's max_steps when resuming from a
# checkpoint; the cosine schedule then spans the new total from the step resumed at), how the same computation is
# executed (device, threads, compile, FSDP, activation checkpointing, shared prefixes: equal results up to float
# rounding), and what is logged, kept and reported. --preset only fills other options, which are compared.
RESUME_MAY_CHANGE = ("steps", "epochs", "device", "threads", "compile", "fsdp", "grad_checkpointing", "shared_prefix",
                     "progress", "log_every", "save_every", "keep_checkpoints", "eval_every", "resume", "overwrite",
                     "preset", "out")


@dataclass
class TrainConfig:
    """Every training option, flat. Saved as config.json in the run directory and checked on --resume."""
    model: str | None = None  # HF-format directory; None: the embedded world's reference model
    init_config: str | None = None  # a config.json to train from random weights (the world's SFT model)
    data: str | None = None  # preference (or SFT) file or dataset directory; None: the embedded world's opinion pairs
    data_split: str | None = None  # the split of a dataset directory with several (data/preferences.py)
    chat_format: str | None = None  # None: chosen from the checkpoint (models/tokenizer.py)
    # The objective (spl/step.py's Objective owns these fields and their defaults; see Objective.from_config)
    loss: str = Objective.loss
    alpha: float = Objective.alpha
    beta: float = Objective.beta
    label_smoothing: float = Objective.label_smoothing
    ipo_tau: float = Objective.ipo_tau
    fdpo_divergence: str = Objective.fdpo_divergence
    fdpo_alpha: float = Objective.fdpo_alpha
    average_logprobs: bool = Objective.average_logprobs
    # spl-online (spl/online.py): K samples per prompt, their length limit, the world's floor reward, a reward model
    online_samples: int = 8
    max_new_tokens: int = 16
    reward_floor: float | None = None  # None: online.noise_proof_floor (log 0.01, lowered for alpha > beta)
    reward_model: str | None = None
    # natural: each prompt's data responses summed exactly, in natural-gradient form, the rest sampled; exact: the
    # same with the plain (unbiased) gradient; rloo: every text sampled (spl/online.py exact_candidates_loss)
    online_estimator: str = "natural"
    anchor: float = Objective.anchor
    nll_weight: float = Objective.nll_weight
    dpop_lambda: float = Objective.dpop_lambda
    lora_rank: int = 16  # 0: full fine-tune
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(TARGET_NAMES))
    lr: float = 5e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    steps: int | None = 250
    epochs: float | None = None
    batch_size: int = 16  # pairs (or sequences, for SFT) per optimizer step, all processes together
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    max_length: int = 128
    max_prompt_length: int = 64
    group_by_length: bool = False
    prompts_per_batch: int = 0  # > 0: batches of whole prompts (all their pairs, each response scored once)
    dtype: str = "float32"  # bfloat16: frozen weights in bf16; LoRA, its gradients and AdamW state stay float32
    grad_checkpointing: bool = False  # recompute each decoder block's activations in the backward pass
    fsdp: bool = False  # shard the frozen weights across torchrun's processes (FSDP2)
    shared_prefix: bool = True  # each prompt of a micro-batch computed once (spl/prefix.py); not with --fsdp
    device: str = "auto"
    compile: str = "auto"
    threads: int = 0  # CPU intra-op threads; 0: one for tiny models (< 10M parameters), torch's default otherwise
    seed: int = 0
    out: str = "runs/spl"
    save_every: int = 0
    keep_checkpoints: int = 2
    eval_every: int = 0
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False
    preset: str | None = None
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    chosen_prob_key: str = "chosen_prob"
    response_key: str = "response"
    progress: bool = True


def argument_parser(defaults: TrainConfig) -> ArgumentParser:
    """Every option of TrainConfig on the command line (values not given stay None, so presets can fill them)."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF-format model directory (default: the embedded world's reference model)")
    p.add_argument("--init-config", help="train from random weights built from this config.json (full fine-tune)")
    p.add_argument("--data", help="preference data: .jsonl/.json (.gz), .parquet, a datasets directory (or SFT "
                                  "records for --loss sft)")
    p.add_argument("--data-split", help="the split of a dataset directory with several (train, test_prefs, ...)")
    p.add_argument("--chat-format", help=f"override the checkpoint's chat format: {', '.join(CHAT_FORMATS)}")
    p.add_argument("--loss", choices=LOSSES, default=defaults.loss)
    p.add_argument("--alpha", type=float, help=f"SPL entropy coefficient (default {defaults.alpha})")
    p.add_argument("--beta", type=float, help=f"cross-entropy (reference) coefficient (default {defaults.beta})")
    p.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing, help="cdpo: label noise eps")
    p.add_argument("--ipo-tau", type=float, default=defaults.ipo_tau)
    p.add_argument("--fdpo-divergence", choices=FDPO_DIVERGENCES,
                   default=defaults.fdpo_divergence)
    p.add_argument("--fdpo-alpha", type=float, default=defaults.fdpo_alpha)
    p.add_argument("--average-logprobs", action="store_true", help="length-normalised sequence log-probs")
    p.add_argument("--anchor", type=float, help="weight of the option-mass anchor, which keeps the probability on "
                   "each prompt's responses at the reference's and the optimum at Prop. A.1's (needs "
                   f"--prompts-per-batch; default {defaults.anchor}, the main job {WORLD_MAIN_JOB['anchor']})")
    p.add_argument("--nll-weight", type=float, help=f"rpo: weight of the chosen NLL (default {defaults.nll_weight})")
    p.add_argument("--dpop-lambda", type=float, help=f"dpop: Pal et al.'s lambda (default {defaults.dpop_lambda})")
    p.add_argument("--prompts-per-batch", type=int, help="batches of whole prompts, this many per optimizer step "
                   "(replaces --batch-size; each distinct response is scored once; default 0: batches of "
                   f"--batch-size pairs, the main job {WORLD_MAIN_JOB['prompts_per_batch']})")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the paper's recipes (Appendix B.3 / C.4)")
    p.add_argument("--online-samples", type=int, help=f"spl-online: completions sampled per prompt per step, K >= 2 "
                   f"(default {defaults.online_samples}; on the world {WORLD_ONLINE_JOB['online_samples']})")
    p.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens,
                   help="spl-online: length limit of a sampled completion")
    p.add_argument("--reward-floor", type=float, default=defaults.reward_floor,
                   help="spl-online on the world: the exact reward of any text that is not an option (default "
                   "log 0.01 - max(alpha - beta, 0) log N, N the completions --max-new-tokens allows: see README); "
                   "with --reward-model: the reward of any text that is not one of the prompt's data responses "
                   "(default: none, the reward model scores everything)")
    p.add_argument("--reward-model", help="spl-online: the run directory of a `--loss reward` run to score with "
                   "(default on the world: its exact reward)")
    p.add_argument("--online-estimator", choices=online.ESTIMATORS, default=defaults.online_estimator,
                   help="spl-online's gradient: 'exact' sums each prompt's data responses exactly, samples the rest; "
                   "'natural' (default): 'exact' moving each response by its advantage, not advantage x probability "
                   "(natural policy gradient: same optimum, no slow escape from a wrong mode); 'rloo' samples all")
    for name in ("lora_rank", "lora_alpha", "lora_dropout", "lr", "weight_decay", "warmup_steps", "steps",
                 "epochs", "batch_size", "grad_accum", "max_grad_norm", "max_length", "max_prompt_length"):
        kind = {int: int, float: float}.get(type(getattr(defaults, name)), float)
        if name in ("steps", "lora_rank", "warmup_steps", "batch_size", "grad_accum", "max_length",
                    "max_prompt_length"):
            kind = int
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=f"default {getattr(defaults, name)}")
    p.add_argument("--lora-targets", help=f"comma-separated, or all-linear; {HEAD_TARGET} adds the output head "
                   f"(default {','.join(TARGET_NAMES)}; the main job adds {HEAD_TARGET})")
    p.add_argument("--group-by-length", action="store_true")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=defaults.dtype,
                   help="bfloat16: frozen weights in bf16, LoRA and optimizer state in float32")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="activation checkpointing per decoder block (less memory, one more forward)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the frozen weights across processes (FSDP2 fully_shard)")
    p.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false",
                   help="run every row's prompt again instead of once per prompt (the same values; slower). "
                        "--fsdp turns sharing off: its shards are gathered by the decoder's own forward")
    p.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ... or auto")
    p.add_argument("--threads", type=int, default=defaults.threads,
                   help="CPU threads per process (default 0: 1 for models under 10M parameters, else torch's choice)")
    p.add_argument("--compile", dest="compile", action="store_const", const="on", default=defaults.compile,
                   help="torch.compile the fused log-prob kernel (default: on CUDA, off on CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--out", default=defaults.out, help="run directory")
    p.add_argument("--save-every", type=int, default=defaults.save_every, help="checkpoint period in steps; 0: off")
    p.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints)
    p.add_argument("--eval-every", type=int, default=defaults.eval_every, help="world report period; 0: at the end")
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --out and start afresh")
    for key in ("prompt", "chosen", "rejected", "chosen_prob", "response"):
        p.add_argument(f"--{key.replace('_', '-')}-key", default=getattr(defaults, f"{key}_key"),
                       help=f"field name of the {key} in the data")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def parse_args(argv=None) -> TrainConfig:
    """The command line as a validated TrainConfig: the options given, then the preset's (or the world main job's)
    values for the others, then TrainConfig's defaults."""
    defaults = TrainConfig()
    args = argument_parser(defaults).parse_args(argv)

    values = {}
    if args.preset is None and args.model is not None:
        # Your own checkpoint gets the paper's chat recipe for every option not given, not the defaults below,
        # which are tuned for the embedded world's 2.3M-parameter model (lr 5e-3 would wreck a 7B one).
        args.preset = OWN_MODEL_PRESET
    if args.preset:
        values.update(PRESETS[args.preset])
    elif args.model is None and args.init_config is None and args.data is None and args.loss in ("spl", "dpo"):
        values.update(WORLD_MAIN_JOB)
    elif args.model is None and args.init_config is None and args.data is None and args.loss == "spl-online":
        values.update(WORLD_ONLINE_JOB)
    if args.loss == "spl-online":  # samples must come from the pi that is differentiated: no LoRA dropout, even
        values["lora_dropout"] = 0.0  # under a preset (paper-chat's 0.05); --lora-dropout given is still refused
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "lora_targets" in given:
        targets = given.pop("lora_targets")
        given["lora_targets"] = (list(TARGET_NAMES) if targets == "all-linear"
                                 else [t.strip() for t in targets.split(",") if t.strip()])
    if given.get("epochs") is not None and "steps" not in given:
        values["steps"] = None
    values.update(given)
    config = dataclasses.replace(defaults, **values)
    validate(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    return config


def validate(c: TrainConfig, world_size: int = 1) -> None:
    """Impossible values fail here, at start-up, with one line each (never mid-run). world_size: the number of
    processes (torchrun's WORLD_SIZE)."""
    def fail(message):
        raise UsageError(message)

    for name in ("alpha", "beta", "label_smoothing", "ipo_tau", "fdpo_alpha", "lora_alpha", "lora_dropout", "lr",
                 "weight_decay", "max_grad_norm", "epochs"):  # nan passes every comparison below: refuse it first
        value = getattr(c, name)
        if value is not None and not math.isfinite(value):
            fail(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if c.alpha <= 0 or not math.isfinite(c.alpha):
        fail(f"--alpha must be > 0 (the entropy coefficient), got {c.alpha}")
    if c.beta < 0 or not math.isfinite(c.beta):
        fail(f"--beta must be >= 0 (0 is reference-free), got {c.beta}")
    if c.loss in ("dpo", "cdpo", "fdpo") and c.beta <= 0:
        fail(f"--loss {c.loss} needs --beta > 0, got {c.beta}")
    try:
        check_label_smoothing(c.label_smoothing, "--label-smoothing")  # the loss's own rule
    except ValueError as error:
        fail(str(error))
    if c.ipo_tau <= 0:
        fail(f"--ipo-tau must be > 0, got {c.ipo_tau}")
    if not 0 < c.fdpo_alpha < 1:
        fail(f"--fdpo-alpha must be in (0, 1), got {c.fdpo_alpha}")
    if c.lora_rank < 0:
        fail(f"--lora-rank must be >= 0 (0: full fine-tune), got {c.lora_rank}")
    if c.lora_rank > 0 and c.lora_alpha <= 0:
        fail(f"--lora-alpha must be > 0, got {c.lora_alpha}")
    if not 0 <= c.lora_dropout < 1:
        fail(f"--lora-dropout must be in [0, 1), got {c.lora_dropout}")
    try:
        resolve_targets(c.lora_targets)  # models/lora.py's rule, the one add_lora applies
    except ValueError as error:
        fail(f"--lora-targets: {error}")
    if c.lr <= 0 or c.weight_decay < 0 or c.max_grad_norm <= 0:
        fail(f"--lr and --max-grad-norm must be > 0 and --weight-decay >= 0 "
             f"(got {c.lr}, {c.max_grad_norm}, {c.weight_decay})")
    if (c.steps is None) == (c.epochs is None):
        fail("give exactly one of --steps and --epochs")
    if c.steps is not None and c.steps <= 0:
        fail(f"--steps must be > 0, got {c.steps}")
    if c.epochs is not None and c.epochs <= 0:
        fail(f"--epochs must be > 0, got {c.epochs}")
    if c.warmup_steps < 0:
        fail(f"--warmup-steps must be >= 0, got {c.warmup_steps}")
    if c.batch_size <= 0 or c.grad_accum <= 0 or c.batch_size % c.grad_accum:
        fail(f"--batch-size ({c.batch_size}) must be a positive multiple of --grad-accum ({c.grad_accum})")
    if c.batch_size % (c.grad_accum * world_size):
        fail(f"--batch-size ({c.batch_size}) is pairs per step over all processes: it must be a multiple of "
             f"--grad-accum ({c.grad_accum}) x {world_size} processes = {c.grad_accum * world_size}")
    try:  # the data layer owns the length rule; training adds that a response needs at least one token
        check_lengths(c.max_length, c.max_prompt_length)
        lengths_ok = c.max_prompt_length < c.max_length
    except ValueError:
        lengths_ok = False
    if not lengths_ok:
        fail(f"need 2 <= --max-prompt-length ({c.max_prompt_length}) < --max-length ({c.max_length})")
    check_threads(c.threads)  # cli.py's rules, sample.py's too
    check_seed(c.seed)
    if c.save_every < 0 or c.eval_every < 0 or c.log_every <= 0 or c.keep_checkpoints <= 0:
        fail("--save-every and --eval-every must be >= 0, --log-every and --keep-checkpoints > 0")
    validate_combinations(c, world_size)


def validate_combinations(c: TrainConfig, world_size: int) -> None:
    """The options that exclude or need each other (validate's second half)."""
    def fail(message):
        raise UsageError(message)

    if c.model and c.init_config:
        fail("give --model or --init-config, not both")
    if c.init_config and c.lora_rank:
        fail("--init-config trains from random weights: use --lora-rank 0 (a full fine-tune)")
    if c.loss == "reward" and c.lora_rank == 0:
        fail("--loss reward trains LoRA plus a scalar head: give --lora-rank > 0")
    if c.dtype == "bfloat16" and c.lora_rank == 0:
        fail("--dtype bfloat16 keeps frozen weights in bf16: a full fine-tune (--lora-rank 0) would train bf16 "
             "weights with bf16 AdamW state; use --dtype float32 or LoRA")
    if c.fsdp and world_size < 2:
        fail("--fsdp shards the frozen weights across processes: launch with torchrun --nproc_per_node N (N > 1)")
    if c.anchor < 0 or not math.isfinite(c.anchor) or c.nll_weight < 0 or c.dpop_lambda < 0:
        fail(f"--anchor, --nll-weight and --dpop-lambda must be >= 0 (got {c.anchor}, {c.nll_weight}, "
             f"{c.dpop_lambda})")
    if c.prompts_per_batch < 0 or c.prompts_per_batch % c.grad_accum:
        fail(f"--prompts-per-batch ({c.prompts_per_batch}) must be 0 (pair batches) or a positive multiple of "
             f"--grad-accum ({c.grad_accum})")
    if c.anchor > 0 and not c.prompts_per_batch:
        fail("--anchor needs each prompt's responses in one batch: give --prompts-per-batch N (or --anchor 0)")
    if c.prompts_per_batch and c.loss not in PREFERENCE_LOSSES:
        fail(f"--prompts-per-batch groups preference pairs; --loss {c.loss} takes --batch-size")
    if c.lora_rank:
        try:
            check_head_dropout(c.lora_targets, c.lora_dropout, "--lora-targets", "--lora-dropout")  # add_lora's rule
        except ValueError as error:
            fail(str(error))
    if c.fsdp and c.lora_rank == 0:
        fail("--fsdp shards the frozen weights of a LoRA run: give --lora-rank > 0")
    if c.chat_format is not None and c.chat_format not in CHAT_FORMATS:
        fail(f"--chat-format {c.chat_format}: unknown format (known: {', '.join(CHAT_FORMATS)})")
    if c.data_split is not None and c.loss == "sft":
        fail("--data-split reads preference datasets; --loss sft reads one .jsonl/.json(.gz) file")
    if c.loss == "spl-online":
        validate_online(c)


def validate_online(c: TrainConfig) -> None:
    """--loss spl-online's own options."""
    def fail(message):
        raise UsageError(message)

    if c.lora_rank == 0 or c.lora_dropout:
        fail("--loss spl-online scores the reference with LoRA off and samples from the policy it trains: "
             "give --lora-rank > 0 and --lora-dropout 0")
    if c.online_samples < 2 or c.max_new_tokens < 1:
        fail(f"--online-samples must be >= 2 (the leave-one-out baseline) and --max-new-tokens >= 1, got "
             f"{c.online_samples} and {c.max_new_tokens}")
    if c.reward_floor is not None and not math.isfinite(c.reward_floor):
        fail(f"--reward-floor must be a finite number, got {c.reward_floor}")
    if c.reward_model is None and (c.model or c.init_config):
        fail("--loss spl-online with your own model needs --reward-model RUN_DIR (the exact reward exists only "
             "on the embedded world)")
    if c.reward_model is not None and not (Path(c.reward_model) / "adapter" / "reward_head.safetensors").is_file():
        fail(f"--reward-model {c.reward_model}: no adapter/reward_head.safetensors there; give the run directory "
             f"of a finished `train.py --loss reward` run")


# --------------------------------------------------------------------------------------------------- schedule

def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, floor_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `floor_ratio * peak` at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# --------------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    try:
        with runs.StopSignals(immediate=True):  # SIGINT/SIGTERM in any phase: one line, exit 128 + signal
            return train(parse_args(argv))
    except runs.Stopped as stop:
        if Processes.from_environment().main:
            print(f"train.py: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except (UsageError, DataError, CheckpointError, ConfigError, runs.RunError) as error:
        # Every process meets these alike (same inputs; run-directory checks are rank 0's, broadcast): one line.
        if Processes.from_environment().main:
            print(f"train.py: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UsageError) else 1


def train(c: TrainConfig) -> int:
    """Join torchrun's process group when launched by it, run, and leave it."""
    procs = Processes.from_environment()
    runs.check_out(c.out, c.resume, c.overwrite, run_inputs(c))  # before anything is read, created or deleted
    device = start_processes(procs, c.device)
    try:
        with run_directory_lock(Path(c.out), procs):
            code = run(c, procs, device)
        if procs.distributed:
            # Leave together: rank 0 still writes the outputs when the others finish, and a gloo process whose
            # peer tears its connections down first can abort in its own teardown ("terminate called ...").
            dist.barrier()
        return code
    finally:
        if procs.distributed:
            dist.destroy_process_group()


@contextlib.contextmanager
def run_directory_lock(out: Path, procs: Processes):
    """Rank 0 holds out/.lock for the whole run (spl/runs.py RunLock): a second process on the same --out is
    refused in one line, with --resume and --overwrite too, before it reads or deletes anything; a lock left by
    a killed process is taken over and named. Every process raises the same error."""
    lock, problem = None, None
    if procs.main:
        try:
            lock = runs.RunLock(out).__enter__()
        except runs.RunError as error:
            problem = str(error)
    problem = broadcast_from_main(procs, problem)
    if problem:
        raise runs.RunError(problem)
    if lock is not None and lock.took_over:
        print(lock.took_over)
    try:
        yield
    except BaseException as error:  # a new run stopped before a checkpoint or its outputs leaves nothing behind
        begun = runs.has_marker(out)  # prepare_run_dir had written it: more than the lock's own directory
        if lock is not None and not runs.worth_keeping(out) and lock.abandon() and begun and \
                isinstance(error, runs.RunError):
            raise runs.RunError(f"{error}; removed {out}, which this run had only begun") from None
        raise
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def start_processes(procs: Processes, device_name: str):
    """The device this process drives. Under torchrun, also join the process group: NCCL with one GPU per
    process (cuda:LOCAL_RANK), gloo on CPU. The helpers for several processes live in spl/distributed.py; with
    one process they are the identity."""
    device = resolve_device(device_name)
    if not procs.distributed:
        return device
    if device_name not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {device_name}: under torchrun every process takes cuda:LOCAL_RANK; "
                         f"give --device auto, cuda or cpu")
    if device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=procs.rank, world_size=procs.world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=procs.rank, world_size=procs.world_size)
    return device


# --------------------------------------------------------------------------------------------------- the loop

def run(c: TrainConfig, procs: Processes, device) -> int:
    """The whole run, phase by phase; each phase is a function below, in the order it runs."""
    say = print if procs.main else (lambda *args, **kwargs: None)  # only rank 0 prints
    out = Path(c.out)
    check_run_dir(out, c, procs)
    compile = {"auto": device.type == "cuda", "on": True, "off": False}[c.compile]
    torch.manual_seed(c.seed)
    np.random.seed(c.seed)
    model, tokenizer, model_dir, tokenizer_path = load_model(c, device)
    examples, summary = load_data(c, tokenizer, say, model.config.vocab_size)
    total_steps = c.steps or epochs_to_steps(examples, c)
    inputs = prepare_run_dir(out, c, procs, input_fingerprints(c, model_dir, summary.sha256, tokenizer_path), say)
    num_parameters = model.num_parameters()  # the model's own, before LoRA adds its branches
    trainable, head = trainable_parameters(model, c, procs, device)
    reference = None  # (ref_chosen_logps [N], ref_rejected_logps [N]) for the preference losses
    if c.loss in PREFERENCE_LOSSES:
        key = reference_cache_key(examples, c, inputs, tokenizer)
        reference = reference_log_probs(model, examples, tokenizer.pad_id, out / "cache", key, c, procs, device,
                                        compile)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=c.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay)
    if c.loss == "spl-online":  # the data's distinct prompts, the reward, and a seeded order of prompt batches
        batches, reference = online_batches(examples, tokenizer, c, procs, device)
    else:
        batches = training_batches(examples, tokenizer.pad_id, c, procs)
    say(describe(num_parameters, trainable, len(examples), total_steps, c, procs, device))
    start_step = resume(out, trainable, optimizer, batches, total_steps, c, procs, say) if c.resume else 0
    step_loss = step_function(c, model, head, reference, compile)
    save = lambda step: save_checkpoint(out, step, trainable, optimizer, batches, c, procs)  # noqa: E731
    # The world's report runs the model: on rank 0, or on every process when FSDP shards the model.
    reports = c.model is None and c.init_config is None and c.data is None and (procs.main or c.fsdp)

    log = runs.MetricsLog(out / "metrics.jsonl", start_step if c.resume else None, procs.main, say=say)
    model.train()
    last_saved = None
    with runs.StopSignals() as signals:
        progress = tqdm(range(start_step, total_steps), initial=start_step, total=total_steps,
                        disable=not (c.progress and procs.main), dynamic_ncols=True)
        for step in progress:
            lr = learning_rate(step, total_steps, c.warmup_steps, c.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            started, started_cpu = time.perf_counter(), time.process_time()
            sums, units, tokens = accumulate_gradients(step_loss, batches, trainable, c, procs, device)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(trainable.values()), c.max_grad_norm))
            if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
                kept = f"; the last good checkpoint is {last_saved}" if last_saved else ""
                say(f"train.py: error: non-finite loss or gradient at step {step + 1} (loss {sums['loss']}, grad "
                    f"norm {grad_norm}); stopped without applying it{kept}", file=sys.stderr)
                log.close()
                return 1
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_s = time.perf_counter() - started
            record = {"step": step + 1, **{k: v / units for k, v in sums.items()}, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens / step_s, "step_s": step_s,
                      "step_cpu_s": time.process_time() - started_cpu}  # this process's CPU seconds, all threads
            if (step + 1) % c.log_every == 0 or step + 1 == total_steps:
                log.write(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            if c.save_every and (step + 1) % c.save_every == 0:
                last_saved = save(step + 1)
            if reports and c.eval_every and (step + 1) % c.eval_every == 0 and step + 1 < total_steps:
                log.write({"step": step + 1, **world_report(model, tokenizer, *report_coefficients(c), device,
                                                             brief=True)})
            if sum_across(procs, [float(signals.received is not None)], device)[0] > 0:  # all stop together
                if last_saved is None or not last_saved.name.endswith(f"{step + 1:06d}"):
                    last_saved = save(step + 1)
                progress.close()
                log.close()  # another process's signal stops this one too, as SIGTERM
                raise runs.Stopped(signals.received or signal.SIGTERM, f"saved {last_saved}; continue with the same "
                                   f"command plus --resume")
        progress.close()
        log.close()
        if c.save_every and (last_saved is None or not last_saved.name.endswith(f"{total_steps:06d}")):
            save(total_steps)
        write_outputs(model, head, tokenizer, tokenizer_path, model_dir, out, c, procs, device, reports,
                      reference[:2] if c.loss == "spl-online" else None)
        signals.check("came while the outputs were written; they were finished first")  # a write is not cut
    return 0


# --------------------------------------------------------------------------------------------------- the phases

def check_run_dir(out: Path, c: TrainConfig, procs: Processes) -> None:
    """Refuse an unusable run directory before any work and before anything is written. Rank 0 looks (it is
    the one that will write) and every process raises the same error."""
    problem = None
    if procs.main:
        try:
            runs.check_run_dir(out, c.resume, c.overwrite)
            if c.resume:  # the same run: the saved options, but for those a resume may change
                runs.check_resumed_config(out, dataclasses.asdict(c), RESUME_MAY_CHANGE)
        except runs.RunError as error:
            problem = str(error)
    problem = broadcast_from_main(procs, problem)
    if problem:
        raise runs.RunError(problem)


def run_inputs(c: TrainConfig) -> dict:
    """What the run reads, which its --out must stay apart from (spl/rundir.py check_out)."""
    return {"--model": c.model or (None if c.init_config else WORLD_MODEL), "--data": c.data or WORLD_DIR,
            "--init-config": c.init_config, "--reward-model": c.reward_model}


def prepare_run_dir(out: Path, c: TrainConfig, procs: Processes, inputs: dict, say) -> dict:
    """Once every input has been read and checked, rank 0 creates the run directory (a marked one emptied with
    --overwrite) with its marker and config.json (the options and the inputs' fingerprints), or, for --resume,
    checks the inputs are the run's; every process raises the same error. Returns `inputs`."""
    problem = None
    if procs.main:
        try:
            runs.prepare_run_dir(out, c.resume, c.overwrite, dataclasses.asdict(c), inputs, say)
        except runs.RunError as error:
            problem = str(error)
    problem = broadcast_from_main(procs, problem)
    if problem:
        raise runs.RunError(problem)
    return inputs


def load_model(c: TrainConfig, device):
    """(model, tokenizer, model_dir, tokenizer_path): --model, the world's reference model, or random weights
    from --init-config (model_dir None). Read tensor by tensor straight onto the device (no CPU copy of a 7B
    model). With --fsdp each process reads it into CPU memory and FSDP moves its shards to its GPU block by
    block, so no GPU ever holds the whole model."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[c.dtype]
    load_device = torch.device("cpu") if c.fsdp else device
    if c.init_config:
        model_dir = None
        config = MistralConfig.from_json(c.init_config)
        check_fits(16 * config.num_parameters(), f"--init-config {c.init_config}: a full fine-tune of "  # 4 float32s
                   f"{config.num_parameters():,} parameters (weights, gradients, AdamW's two moments)", load_device)
        model = build_model(config, dtype=dtype, device=load_device, seed=c.seed)
        tokenizer_path = Path(c.init_config).parent / "tokenizer.model"
    else:
        model_dir = Path(c.model) if c.model else WORLD_MODEL
        model = load_pretrained(model_dir, dtype=dtype, device=load_device)
        tokenizer_path = model_dir / "tokenizer.model"
    if not tokenizer_path.is_file():
        raise UsageError(f"{tokenizer_path}: missing (the sentencepiece tokenizer.model must sit beside the model)")
    tokenizer = Tokenizer(tokenizer_path, c.chat_format)  # the chat format, from the checkpoint or --chat-format
    check_vocabulary(tokenizer, model.config.vocab_size, model_dir or c.init_config)  # a tokenizer of another model
    choose_threads(c.threads, model.num_parameters(), device)  # 0: one thread for a small model on CPU
    check_model_limits(model, c)
    return model, tokenizer, model_dir, tokenizer_path


def check_model_limits(model, c: TrainConfig) -> None:
    """Options the model bounds, refused before any work: a LoRA rank above min(in, out) of a target (B A
    cannot have it), sequences longer than the model's positions."""
    if c.lora_rank:
        bound, layer = max_rank(model, c.lora_targets)
        if c.lora_rank > bound:
            raise UsageError(f"--lora-rank {c.lora_rank} exceeds min(in, out) = {bound} of {layer}, the largest "
                             f"rank a LoRA update of it can have")
    if c.max_length > model.config.max_position_embeddings:
        raise UsageError(f"--max-length {c.max_length} exceeds the model's max_position_embeddings "
                         f"{model.config.max_position_embeddings}")


def load_data(c: TrainConfig, tokenizer, say, vocab_size: int):
    """(examples, summary): --data (or the world's opinion pairs, its SFT text for --loss sft), tokenized in the
    tokenizer's chat format, truncated and checked."""
    world_file = WORLD_FILES["sft" if c.loss == "sft" else "opinion_pairs_soft"]
    data_path = Path(c.data) if c.data else WORLD_DIR / world_file
    if c.loss == "sft":
        examples, summary = load_sft_data(data_path, tokenizer, c.max_length, c.max_prompt_length,
                                          {"prompt": c.prompt_key, "response": c.response_key})
    else:
        column_map = {"prompt": c.prompt_key, "chosen": c.chosen_key, "rejected": c.rejected_key,
                      "chosen_prob": c.chosen_prob_key}
        examples, summary = load_preference_data(data_path, tokenizer, c.max_length, c.max_prompt_length, column_map,
                                                 c.data_split, vocab_size)
    say(describe_format(tokenizer))
    say(summary.format())
    if c.preset:
        taken = [f"--{k.replace('_', '-')} {v:g}" for k, v in PRESETS[c.preset].items()
                 if v is not None and getattr(c, k) == v]
        say(f"recipe: {c.preset} for the options not given: {', '.join(taken) or 'none left'}")
    if not examples:
        raise UsageError(f"{data_path}: no usable examples")
    if c.loss == "cdpo" and any(e.chosen_prob != 1.0 for e in examples):
        raise UsageError(f"{data_path}: --loss cdpo smooths every label by --label-smoothing; the data's soft "
                         f"labels ({c.chosen_prob_key}) would be ignored: use --loss spl or dpo with them")
    return examples, summary


def trainable_parameters(model, c: TrainConfig, procs: Processes, device):
    """(trainable parameters by name, reward head or None). LoRA with everything else frozen (its B = 0, so the
    model is still the reference), or the whole model; --loss reward adds a scalar head. The same draws on
    every process; afterwards each process its own dropout noise."""
    if c.lora_rank:
        add_lora(model, c.lora_rank, c.lora_alpha, c.lora_dropout, c.lora_targets)
    if procs.rank:
        torch.manual_seed(c.seed + procs.rank)
    model.gradient_checkpointing = c.grad_checkpointing
    if c.fsdp:
        shard_frozen_weights(model, procs, device)
    head = RewardHead(model.config.hidden_size).to(device) if c.loss == "reward" else None
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if head is not None:
        trainable |= {f"reward_head.{name}": p for name, p in head.named_parameters()}
    return trainable, head


def input_fingerprints(c: TrainConfig, model_dir, dataset_sha256: str, tokenizer_path) -> dict:
    """{"data", "model", "tokenizer"}: what the run's inputs are, recorded in config.json (--resume refuses
    others) and the reference cache's key. The dataset is named by the content of the records read (the same in
    every file format; another split, another)."""
    return {"data": dataset_sha256, "model": reference_identity(model_dir, c), "tokenizer": file_sha256(tokenizer_path)}


def reference_cache_key(examples, c: TrainConfig, inputs: dict, tokenizer):
    """What the reference log-probs depend on (data/reference_cache.py): a cache with another key is stale."""
    return ReferenceCacheKey.build(examples, dataset_sha256=inputs["data"], reference_model=inputs["model"],
                                   max_length=c.max_length, max_prompt_length=c.max_prompt_length,
                                   chat_format=tokenizer.chat_format, tokenizer_sha256=inputs["tokenizer"])


def reference_identity(model_dir: Path | None, c: TrainConfig) -> str:
    """What the reference log-probs depend on besides the data: the weights, their dtype, the objective's
    length normalisation. Weight files under 1 GB are hashed; larger ones are named by size and mtime."""
    if model_dir is None:
        return f"random-init:{c.init_config}:{c.seed}"
    parts = [file_sha256(model_dir / "config.json")]
    files = sorted(model_dir.glob("*.safetensors"))
    small = sum(f.stat().st_size for f in files) < 1 << 30
    for f in files:
        stat = f.stat()
        parts.append(file_sha256(f) if small else f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}")
    parts += [c.dtype, f"average={c.average_logprobs}"]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def uses_shared_prefix(c: TrainConfig) -> bool:
    """--shared-prefix unless --fsdp: FSDP gathers a block's shards in the block's own forward, which
    spl/prefix.py's per-module calls bypass."""
    return c.shared_prefix and not c.fsdp


def reference_log_probs(model, examples, pad_id: int, cache_dir: Path, key, c: TrainConfig, procs: Processes,
                        device, compile):
    """(ref_chosen_logps [N], ref_rejected_logps [N]) on `device`: the model as loaded, LoRA off, before any
    update (so also right on --resume), read from the cache or computed once, each process scoring its share."""
    def compute():
        model.eval()
        chosen = torch.zeros(len(examples), device=device)  # [N]
        rejected = torch.zeros(len(examples), device=device)  # [N]
        micro_batch = c.batch_size // c.grad_accum  # pairs per accumulation step, all processes together
        order = share_batches(PreferenceBatches(examples, micro_batch * 2, pad_id, seed=c.seed), procs)
        for _ in tqdm(range(len(order)), desc="reference log-probs", disable=not (c.progress and procs.main),
                      leave=False):
            batch = next(order)
            counts = batch.pop("counts", True)
            batch = {k: v.to(device) for k, v in batch.items()}
            ref_chosen, ref_rejected = reference_logprobs(model, batch, average=c.average_logprobs, compile=compile,
                                                          shared_prefix=uses_shared_prefix(c))
            if counts:
                chosen[batch["pair_index"]] = ref_chosen.float()
                rejected[batch["pair_index"]] = ref_rejected.float()
        finite = torch.isfinite(chosen) & torch.isfinite(rejected)  # [N]
        if not bool(finite.all()):  # before the cache is written: a NaN reference would poison every step
            first = int((~finite).nonzero()[0])
            raise runs.RunError(f"reference log-probs are NaN or infinite for {int((~finite).sum())} of "
                                f"{len(examples)} pairs (the first: pair {first}); the model overflows on this "
                                f"data: check its weights and config.json (rope_theta, rms_norm_eps, dtype)")
        return chosen, rejected

    with runs.writing(cache_path(cache_dir, key)):  # a full disk: one line (the cache is published atomically)
        return shared_reference_logps(cache_path(cache_dir, key), key, compute, procs, device)


def epochs_to_steps(examples, c: TrainConfig) -> int:
    """--epochs as optimizer steps: passes over the pairs (or, with --prompts-per-batch, the prompts)."""
    per_step = c.prompts_per_batch or c.batch_size  # prompts (grouped batches) or pairs per optimizer step
    units = len(prompt_groups(examples)) if c.prompts_per_batch else len(examples)
    return max(1, math.ceil(c.epochs * units / per_step))


def online_batches(examples, tokenizer, c: TrainConfig, procs: Processes, device):
    """--loss spl-online: (a seeded order of batches of the data's distinct prompts, what step_function needs:
    (prompts, reward, pad_id, end_of_turn_id))."""
    prompts, reward = online_prompts_and_reward(examples, tokenizer, c, device)
    if c.online_estimator != "rloo":  # the responses the sampler can write, scored once
        prompts = online.with_candidate_rewards(prompts, reward, c.max_new_tokens, tokenizer.end_of_turn_id)
    batches = share_batches(PreferenceBatches(prompts, c.batch_size // c.grad_accum, tokenizer.pad_id,
                                              seed=c.seed, collate_fn=online.collate_prompts,
                                              length_fn=lambda prompt: len(prompt.prompt_ids)), procs)
    return batches, (prompts, reward, tokenizer.pad_id, tokenizer.end_of_turn_id)


def training_batches(examples, pad_id: int, c: TrainConfig, procs: Processes):
    """The seeded order of micro-batches (batch_size / grad_accum pairs, or sequences for SFT, all processes
    together), each process drawing its own share of each (spl/distributed.py share_batches)."""
    if c.prompts_per_batch:  # whole prompts: prompts_per_batch / grad_accum of them per micro-batch
        return share_batches(PromptGroupedBatches(examples, c.prompts_per_batch // c.grad_accum, pad_id, seed=c.seed,
                                                  group_by_length=c.group_by_length), procs)
    Batches = SequenceBatches if c.loss == "sft" else PreferenceBatches
    return share_batches(Batches(examples, c.batch_size // c.grad_accum, pad_id, seed=c.seed,
                                 group_by_length=c.group_by_length), procs)


def online_prompts_and_reward(examples, tokenizer, c: TrainConfig, device):
    """spl-online's (distinct prompts of the data, reward): the world's exact reward (log p of an option, the
    floor elsewhere), or the reward model of --reward-model on the base model it was trained from (with
    --reward-floor: only on the data's responses, the floor elsewhere)."""
    prompts = online.distinct_prompts(examples)
    if c.reward_model is None:
        try:
            return prompts, online.world_reward_for_prompts(load_world(WORLD_DIR).opinions, tokenizer, prompts,
                                                            world_floor(c, tokenizer.vocab_size)[0])
        except ValueError as error:
            raise UsageError(f"{c.data}: {error}") from None
    saved = read_json_object(Path(c.reward_model) / "config.json", UsageError)
    if saved.get("loss") != "reward" or saved.get("init_config"):
        raise UsageError(f"--reward-model {c.reward_model}: not a LoRA `--loss reward` run")
    base = Path(saved["model"]) if saved.get("model") else WORLD_MODEL
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[c.dtype]
    reward = online.RewardModelReward.load(c.reward_model, base, tokenizer.pad_id, device, dtype)
    return prompts, reward if c.reward_floor is None else online.SupportedReward(reward, prompts, c.reward_floor)


def world_floor(c: TrainConfig, vocab_size: int) -> tuple[float, float]:
    """(the floor of the world's exact reward: --reward-floor or online.noise_proof_floor, log N): N the
    completions of at most --max-new-tokens tokens over the world model's vocabulary (its tokenizer's)."""
    log_num_texts = log_num_completions(c.max_new_tokens, vocab_size)
    floor = c.reward_floor if c.reward_floor is not None else online.noise_proof_floor(c.alpha, c.beta, log_num_texts)
    return floor, log_num_texts


def describe(num_parameters: int, trainable: dict, num_examples: int, total_steps: int, c: TrainConfig,
             procs: Processes, device) -> str:
    """The run's one-line summary: model size, what is trained, examples, steps and where."""
    processes = f" x {procs.world_size} processes{' (FSDP)' if c.fsdp else ''}" if procs.distributed else ""
    return (f"model: {num_parameters / 1e6:.2f}M parameters; {sum(p.numel() for p in trainable.values()) / 1e6:.3f}M "
            f"trainable{' (LoRA)' if c.lora_rank else ''}; {num_examples} examples, {total_steps} steps of "
            f"{f'{c.prompts_per_batch} prompts' if c.prompts_per_batch else c.batch_size}"
            f"{f', anchor {c.anchor:g}' if c.anchor else ''} on {device}{processes}")


def resume(out: Path, trainable: dict, optimizer, batches, total_steps: int, c: TrainConfig, procs: Processes,
           say) -> int:
    """Load the newest checkpoint of `out` that verifies against its manifest (a damaged newer one is named in
    one line and passed over; every process reads the one rank 0 picked) into the trainable parameters, the
    optimizer, the data position and the RNGs; returns its step (0 if there is none yet), at most total_steps."""
    found, problem = None, None
    if procs.main:
        runs.clean_interrupted_saves(out)
        try:
            found = runs.load_latest_checkpoint(out, say)
        except runs.RunError as error:
            problem = str(error)
    checkpoint, problem = broadcast_from_main(procs, (str(found[0]) if found else None, problem))
    if problem:
        raise runs.RunError(problem)
    if not checkpoint:
        say(f"{out}: no complete checkpoint yet; starting from step 0")
        return 0
    checkpoint = Path(checkpoint)
    tensors, optimizer_state, rng, state = found[1] if procs.main else runs.load_checkpoint(checkpoint)
    if state["step"] > total_steps:
        raise UsageError(f"{checkpoint}: is step {state['step']}, past the {total_steps} steps asked for; give "
                         f"--steps {state['step']} or more to continue")
    if set(tensors) != set(trainable):
        raise runs.RunError(f"{checkpoint}: holds {sorted(set(tensors) ^ set(trainable))[:4]}... "
                            f"that this run does not train")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(tensors[name])
    optimizer.load_state_dict(optimizer_state)
    rng_states = rng["per_rank"] if "per_rank" in rng else [rng]  # one per process that wrote it
    if len(rng_states) == procs.world_size:
        runs.set_rng_state(rng_states[procs.rank])
    else:
        say(f"{checkpoint}: written by {len(rng_states)} process(es), resumed by {procs.world_size}: the "
            f"data position is global and carries over; dropout noise starts from fresh seeds")
    try:
        batches.load_state_dict(state["data"])
    except (ValueError, TypeError, KeyError) as error:  # the data shrank, or the position was edited
        raise runs.RunError(f"{checkpoint}: its data position does not fit this data ({error}); resume with the "
                            f"data the run started with, or start a new run") from None
    say(f"resumed from {checkpoint} at step {state['step']}")
    return state["step"]


def step_function(c: TrainConfig, model, head, reference, compile):
    """The loss of one micro-batch for --loss, batch -> (mean loss with grad, metric sums): chosen once, here.
    reference: (ref_chosen_logps [N], ref_rejected_logps [N]) for the preference losses, else None."""
    if c.loss == "sft":
        return lambda batch: sft_step(model, batch, compile=compile)[:2]
    if c.loss == "reward":
        return lambda batch: reward_step(model, head, batch)[:2]
    if c.loss == "spl-online":  # reference: (distinct prompts, reward, pad id, stop id); see spl/online.py
        prompts, reward, pad_id, eos_id = reference
        return online.online_step_function(model, prompts, reward, c.alpha, c.beta, c.online_samples,
                                           c.max_new_tokens, pad_id, eos_id, c.online_estimator,
                                           compile=compile)
    objective = Objective.from_config(c)
    ref_chosen_logps, ref_rejected_logps = reference

    step = grouped_preference_step if c.prompts_per_batch else preference_step

    def preference_loss(batch):
        index = batch["pair_index"]  # [B] the batch's pairs among all N
        return step(model, batch, ref_chosen_logps[index], ref_rejected_logps[index], objective, compile=compile,
                    shared_prefix=uses_shared_prefix(c))[:2]

    return preference_loss


def accumulate_gradients(step_loss, batches, trainable: dict, c: TrainConfig, procs: Processes, device):
    """The gradient of one optimizer step in every trainable parameter's .grad: c.grad_accum micro-batches,
    each back-propagating `sum over its pairs of loss / N` with N the step's pairs over all processes (tokens
    for SFT), then one all-reduce. Returns (metric sums, N, tokens), all processes together."""
    micro_batches, counted = [], []
    for _ in range(c.grad_accum):
        batch = next(batches)  # this process's share of the next global micro-batch
        counted.append(batch.pop("counts", True))
        micro_batches.append({k: v.to(device) for k, v in batch.items()})
    units = [(len(b["chosen_prob"]) if "chosen_prob" in b else int(b["loss_mask"].sum())) if counts else 0
             for b, counts in zip(micro_batches, counted)]
    total_units = sum_across(procs, [sum(units)], device)[0]  # pairs (or tokens) of the whole step
    sums, tokens = {}, 0
    for batch, n, counts in zip(micro_batches, units, counted):
        loss, metrics = step_loss(batch)
        (loss * n / total_units).backward()  # the mean over every pair (or token) of the optimizer step
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + (float(value) if counts else 0.0)
        tokens += int(batch["attention_mask"].sum()) if counts else 0
    sum_gradients_(procs, list(trainable.values()))
    names = list(sums)  # the same order on every process
    reduced = sum_across(procs, [sums[name] for name in names] + [tokens], device)
    return dict(zip(names, reduced[:-1])), total_units, reduced[-1]


def save_checkpoint(out: Path, step: int, trainable: dict, optimizer, batches, c: TrainConfig, procs: Processes):
    """Checkpoint `step` (spl/runs.py, atomic): every process calls this (their RNG states are gathered); rank 0
    writes. Returns the checkpoint's directory."""
    rng = runs.rng_state()
    if procs.distributed:  # as JSON in tensors (torch's object collectives pickle)
        states = gather_to_main(procs, runs.rng_state_to_json(rng))
        rng = {"per_rank": [runs.rng_state_from_json(state) for state in states]} if procs.main else None
    path, problem = out / "checkpoints" / f"step_{step:06d}", None
    if procs.main:
        try:  # a failed save (disk full, no permission) keeps the previous checkpoint; all processes stop
            path = runs.save_checkpoint(out, step, trainable, optimizer, {"data": batches.state_dict()},
                                        keep=c.keep_checkpoints, rng=rng)
        except runs.RunError as error:
            problem = str(error)
    problem = broadcast_from_main(procs, problem)
    if problem:
        raise runs.RunError(problem)
    return path


def report_coefficients(c: TrainConfig) -> tuple[float, float]:
    """(alpha, beta) of the closed-form optimum the world report compares with: DPO is SPL with alpha = beta."""
    return (c.beta if c.loss == "dpo" else c.alpha), c.beta


def write_outputs(model, head, tokenizer, tokenizer_path, model_dir, out: Path, c: TrainConfig, procs: Processes,
                  device, reports: bool, online_reward=None) -> None:
    """The adapter (PEFT format, plus the reward head) or the whole model (HF format), and on the world the
    report comparing the learned policy with the closed-form optimum (report.json, printed). online_reward:
    spl-online's (prompts, reward), for the optimum a reward model implies."""
    report = None
    if reports and c.loss in ("spl", "dpo", "spl-online") and c.lora_rank:
        report = world_report(model, tokenizer, *report_coefficients(c), device)
        if c.loss == "spl-online" and c.reward_model is None:  # the full-space optimum's option mass
            report = online.add_full_space_mass(report, *world_floor(c, tokenizer.vocab_size), c.alpha, c.beta)
        elif c.loss == "spl-online":  # how far the reward model alone moves the target
            report = add_reward_optimum(report, online_reward[1], online_reward[0], tokenizer, c.alpha, c.beta)
    if not procs.main:
        return
    saved = runs.complete_checkpoints(out)
    kept = f"the last checkpoint {saved[-1]} is intact" if saved else ""
    if c.lora_rank:
        extra = {"reward_head.safetensors": head.state_dict()} if head is not None else None
        with runs.writing(out / "adapter", kept):
            save_adapter(model, out / "adapter", base_model_name_or_path=str(model_dir or c.init_config),
                         overwrite=True, extra_tensors=extra)
        print(f"adapter: {out / 'adapter'} (PEFT format)")
    else:
        final = out / "model"
        with runs.writing(final, kept):
            save_pretrained(model, final, tokenizer_path=tokenizer_path, overwrite=True)
        print(f"model: {final} (HF format)")
    if report is not None:
        with runs.writing(out / "report.json", kept):
            runs.write_json_atomic(out / "report.json", report)
        print(format_report(report))
        if "mean_closed_form_option_mass" in report:
            print(online.format_full_space_mass(report))
        if "mean_tv_reward_optimum_vs_closed_form" in report:
            print(format_reward_optimum(report))


if __name__ == "__main__":
    sys.exit(main())
