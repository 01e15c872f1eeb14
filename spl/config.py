"""Training options: every option of train.py as one flat, validated dataclass (saved as the run's config.json),
the paper's recipes and the embedded world's jobs, the command-line parser and the start-up checks.

Precedence, for each option: the command line, then the preset's value (--preset, or paper-chat for --model, or
the world's main/online job when no --model/--init-config/--data is given), then TrainConfig's default (tuned for
the embedded world's 2.3M-parameter model). Impossible values and combinations fail here, at start-up, in one line
each (a UsageError), never mid-run.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from data.tokenization import check_lengths
from models.chat_format import FORMATS as CHAT_FORMATS
from models.bf16 import bf16_note
from models.lora import HEAD_TARGET, TARGET_NAMES, check_head_dropout, max_rank, resolve_targets
from spl.cli import ArgumentParser, UsageError, check_seed, check_threads, steps
from spl.evaluation import check_evaluation_options
from spl.losses import FDPO_DIVERGENCES, check_label_smoothing
from spl.online import ESTIMATORS as ONLINE_ESTIMATORS
from spl.plot import check_tensorboard
from spl.step import PREFERENCE_LOSSES, Objective

DESCRIPTION = "Train a policy with Soft Preference Learning (or DPO, IPO, cDPO, f-DPO, SFT, a reward model)."
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
# measurement (docs/results.md "The main job"), and LoRA on the output head too: the frozen head bounds how far
# apart two options' logits can go (eval/experiments/output_gap.py), which DPO's peaked optima need. Any option
# given on the command line wins; other data keep the plain loss.
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
                     "preset", "out", "from_preset", "detected_chat_format", "tensorboard", "plot")


@dataclass
class TrainConfig:
    """Every training option, flat. Saved as config.json in the run directory and checked on --resume."""
    model: str | None = None  # HF-format directory; None: the embedded world's reference model
    init_config: str | None = None  # a config.json to train from random weights (the world's SFT model)
    # preference (or SFT) data: a file, a dataset directory, a glob, or several of them (a list; data/sources.py);
    # None: the embedded world's opinion pairs
    data: str | list[str] | None = None
    data_split: str | None = None  # the split of a dataset directory with several (data/sources.py)
    data_subsets: list[str] | None = None  # some of a dataset repository's subsets (folders); None: all
    chat_format: str | None = None  # None: chosen from the checkpoint (models/tokenizer.py)
    # Held-out evaluation (spl/evaluation.py): another file, another split, or whole prompts cut from --data
    eval_data: str | None = None
    eval_split: str | None = None
    eval_fraction: float = 0.0
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
    shared_prefix: bool = True  # each prompt of a micro-batch computed once (models/prefix.py); not with --fsdp
    device: str = "auto"
    compile: str = "auto"
    threads: int = 0  # CPU intra-op threads; 0: one for tiny models (< 10M parameters), torch's default otherwise
    seed: int = 0
    out: str = "runs/spl"
    # Checkpoints by default on long runs: a crash loses at most 500 steps; a run of fewer steps (the world's jobs,
    # tests) writes none. The last keep_checkpoints are kept.
    save_every: int = 500
    keep_checkpoints: int = 2
    eval_every: int = 0
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False
    preset: str | None = None
    # Records, not options: the options whose value the preset gave (the recipe line, config.json), and the chat
    # format train.py detected in the checkpoint (set at start-up, for config.json; not compared on --resume).
    from_preset: list[str] = field(default_factory=list)
    detected_chat_format: str | None = None
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    chosen_prob_key: str = "chosen_prob"
    response_key: str = "response"
    progress: bool = True
    plot: bool = True  # OUT/curves.png at the end, when matplotlib is installed (spl/plot.py)
    tensorboard: bool = False  # metrics also as TensorBoard scalars in OUT/tensorboard/ (needs tensorboard)

    def column_map(self) -> dict:
        """The data's field names (--prompt-key, ...) as data/preferences.py's column_map."""
        return {"prompt": self.prompt_key, "chosen": self.chosen_key, "rejected": self.rejected_key,
                "chosen_prob": self.chosen_prob_key}

    def uses_shared_prefix(self) -> bool:
        """--shared-prefix unless --fsdp: FSDP gathers a block's shards in the block's own forward, which
        models/prefix.py's per-module calls bypass."""
        return self.shared_prefix and not self.fsdp

    def inputs_read(self, world_model, world_dir) -> dict:
        """{flag: path} of what the run reads, which its --out must stay apart from (spl/rundir.py check_out);
        the embedded world's model and folder (its data) stand for --model and --data not given."""
        return {"--model": self.model or (None if self.init_config else world_model), "--data": self.data or world_dir,
                "--eval-data": self.eval_data, "--init-config": self.init_config, "--reward-model": self.reward_model}


def is_world_run(options) -> bool:
    """Whether a run trains on the embedded world (no --model, --init-config or --data): it then takes the world's
    job for the options not given and ends with the world's report."""
    return options.model is None and options.init_config is None and options.data is None


def argument_parser(defaults: TrainConfig) -> ArgumentParser:
    """Every option of TrainConfig on the command line (values not given stay None, so presets can fill them)."""
    p = ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF-format model directory, a .gguf file (converted once, cached) or smollm2 "
                                    "(default: the embedded world's reference model)")
    p.add_argument("--init-config", help="train from random weights built from this config.json (full fine-tune)")
    p.add_argument("--data", nargs="+", help="preference data: .jsonl/.json (.gz), .parquet, a datasets directory, "
                   "a dataset repository (its shards and subsets read as one), a glob, or several of these (or one "
                   "file of SFT records for --loss sft)")
    p.add_argument("--data-split", help="the split of a dataset directory with several (train, test_prefs, ...)")
    p.add_argument("--data-subsets", help="comma-separated subsets (folders) of a dataset repository to read, e.g. "
                   "helpful-base,harmless-base (default: all)")
    p.add_argument("--eval-data", help="held-out preference pairs to evaluate on every --eval-every steps and at "
                   "the end (any form --data takes)")
    p.add_argument("--eval-split", help="evaluate on this split of the dataset directory (--eval-data's, else "
                   "--data's), e.g. test_prefs")
    p.add_argument("--eval-fraction", type=float, default=defaults.eval_fraction,
                   help="hold this fraction of --data's prompts out of training (all their pairs, seeded by --seed) "
                        "and evaluate on them (default 0: none)")
    p.add_argument("--chat-format", help=f"override the checkpoint's chat format: {', '.join(CHAT_FORMATS)}")
    p.add_argument("--loss", choices=LOSSES, default=defaults.loss,
                   help=f"the objective (default {defaults.loss}; dpo is spl with alpha = beta)")
    p.add_argument("--alpha", type=float, help=f"SPL entropy coefficient (default {defaults.alpha})")
    p.add_argument("--beta", type=float, help=f"cross-entropy (reference) coefficient (default {defaults.beta})")
    p.add_argument("--label-smoothing", type=float, default=defaults.label_smoothing, help="cdpo: label noise eps")
    p.add_argument("--ipo-tau", type=float, default=defaults.ipo_tau,
                   help=f"ipo: the regularisation tau (default {defaults.ipo_tau})")
    p.add_argument("--fdpo-divergence", choices=FDPO_DIVERGENCES, default=defaults.fdpo_divergence,
                   help=f"fdpo: the f-divergence (default {defaults.fdpo_divergence})")
    p.add_argument("--fdpo-alpha", type=float, default=defaults.fdpo_alpha,
                   help=f"fdpo: the alpha-divergence's parameter, in (0, 1) (default {defaults.fdpo_alpha})")
    p.add_argument("--average-logprobs", action="store_true", help="length-normalised sequence log-probs")
    p.add_argument("--anchor", type=float, help="weight of the option-mass anchor, which keeps the probability on "
                   "each prompt's responses at the reference's and the optimum at Prop. A.1's (needs "
                   f"--prompts-per-batch; default {defaults.anchor}, the main job {WORLD_MAIN_JOB['anchor']})")
    p.add_argument("--nll-weight", type=float, help=f"rpo: weight of the chosen NLL (default {defaults.nll_weight})")
    p.add_argument("--dpop-lambda", type=float, help=f"dpop: Pal et al.'s lambda (default {defaults.dpop_lambda})")
    p.add_argument("--prompts-per-batch", type=int, help="batches of whole prompts, this many per optimizer step "
                   "(replaces --batch-size; each distinct response is scored once; default 0: batches of "
                   f"--batch-size pairs, the main job {WORLD_MAIN_JOB['prompts_per_batch']})")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the paper's recipes (Appendix B.3 / C.4) for the options "
                   "not given (flags given win, --steps over a preset's --epochs and the other way round)")
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
    p.add_argument("--online-estimator", choices=ONLINE_ESTIMATORS, default=defaults.online_estimator,
                   help="spl-online's gradient: 'exact' sums each prompt's data responses exactly, samples the rest; "
                   "'natural' (default): 'exact' moving each response by its advantage, not advantage x probability "
                   "(natural policy gradient: same optimum, no slow escape from a wrong mode); 'rloo' samples all")
    for name in ("lora_rank", "lora_alpha", "lora_dropout", "lr", "weight_decay", "warmup_steps", "steps",
                 "epochs", "batch_size", "grad_accum", "max_grad_norm", "max_length", "max_prompt_length"):
        kind = {int: int, float: float}.get(type(getattr(defaults, name)), float)
        if name in ("steps", "lora_rank", "warmup_steps", "batch_size", "grad_accum", "max_length",
                    "max_prompt_length"):
            kind = int
        p.add_argument("--" + name.replace("_", "-"), type=kind, help=option_defaults(name, defaults))
    p.add_argument("--lora-targets", help=f"comma-separated, or all-linear; {HEAD_TARGET} adds the output head "
                   f"(default {','.join(TARGET_NAMES)}; the main job adds {HEAD_TARGET})")
    p.add_argument("--group-by-length", action="store_true",
                   help="batch pairs of similar length together (less padding; the order stays random)")
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
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off",
                   help="never torch.compile (the eager kernel: the same values)")
    p.add_argument("--seed", type=int, default=defaults.seed,
                   help=f"seeds the data order, LoRA's initialisation and --eval-fraction's cut (default "
                        f"{defaults.seed})")
    p.add_argument("--out", default=defaults.out, help="run directory")
    p.add_argument("--save-every", type=int, default=defaults.save_every,
                   help=f"checkpoint every N steps (default {defaults.save_every}: a shorter run writes none; "
                        f"0: never; a stop signal always saves)")
    p.add_argument("--keep-checkpoints", type=int, default=defaults.keep_checkpoints,
                   help=f"how many of the latest checkpoints to keep (default {defaults.keep_checkpoints})")
    p.add_argument("--eval-every", type=int, default=defaults.eval_every,
                   help="evaluate the eval set (--eval-data, --eval-split, --eval-fraction) every N steps; it is "
                        "also evaluated at the end. On the embedded world: the world report's period (0: at the end)")
    p.add_argument("--log-every", type=int, default=defaults.log_every,
                   help=f"write a metrics.jsonl line every N steps (default {defaults.log_every})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete an existing --out and start afresh")
    for key in ("prompt", "chosen", "rejected", "chosen_prob", "response"):
        p.add_argument(f"--{key.replace('_', '-')}-key", default=getattr(defaults, f"{key}_key"),
                       help=f"field name of the {key} in the data")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--no-plot", dest="plot", action="store_false",
                   help="no curves.png at the end (drawn when matplotlib is installed; python -m spl.plot RUN_DIR "
                        "draws it any time)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log the metrics for TensorBoard, in OUT/tensorboard/ (needs: pip install tensorboard)")
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
    elif is_world_run(args) and args.loss in ("spl", "dpo"):
        values.update(WORLD_MAIN_JOB)
    elif is_world_run(args) and args.loss == "spl-online":
        values.update(WORLD_ONLINE_JOB)
    if args.loss == "spl-online":  # samples must come from the pi that is differentiated: no LoRA dropout, even
        values["lora_dropout"] = 0.0  # under a preset (paper-chat's 0.05); --lora-dropout given is still refused
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "data" in given:  # one path stays a string (as config.json has always held it); several are a list
        given["data"] = given["data"][0] if len(given["data"]) == 1 else given["data"]
    if "data_subsets" in given:
        given["data_subsets"] = [name.strip() for name in given["data_subsets"].split(",") if name.strip()]
    if "lora_targets" in given:
        targets = given.pop("lora_targets")
        given["lora_targets"] = (list(TARGET_NAMES) if targets == "all-linear"
                                 else [t.strip() for t in targets.split(",") if t.strip()])
    if "epochs" in given and "steps" not in given:  # how far to train, given on the command line, wins over the
        values["steps"] = None  # preset's, whichever of the two the preset states
    if "steps" in given and "epochs" not in given:
        values["epochs"] = None
    preset = PRESETS.get(args.preset, {})
    values["from_preset"] = [k for k in preset if k not in given and values.get(k) == preset[k]]
    values.update(given)
    config = dataclasses.replace(defaults, **values)
    validate(config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    return config


def validate(c: TrainConfig, world_size: int = 1) -> None:
    """Impossible values fail here, at start-up, with one line each (never mid-run). world_size: the number of
    processes (torchrun's WORLD_SIZE)."""
    def fail(message):
        raise UsageError(message)

    # nan passes every comparison below: refuse it first
    for name in ("alpha", "beta", "label_smoothing", "ipo_tau", "fdpo_alpha", "lora_alpha", "lora_dropout", "lr",
                 "weight_decay", "max_grad_norm", "epochs", "eval_fraction"):
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
    check_threads(c.threads)  # spl/cli.py's rules, sample.py's too
    check_seed(c.seed)
    if c.save_every < 0 or c.eval_every < 0 or c.log_every <= 0 or c.keep_checkpoints <= 0:
        fail("--save-every and --eval-every must be >= 0, --log-every and --keep-checkpoints > 0")
    validate_combinations(c, world_size)


def validate_for_model(c: TrainConfig, model) -> None:
    """The options the loaded model bounds, refused before any work: a LoRA rank above min(in, out) of a target
    (B A cannot have it: memory for nothing). (--max-length against the model's positions is
    data/tokenization.check_context's, the rule sample.py shares.)"""
    bound, layer = max_rank(model, c.lora_targets)
    if c.lora_rank > bound:
        raise UsageError(f"--lora-rank {c.lora_rank} exceeds min(in, out) = {bound} of {layer}, the largest rank a "
                         f"LoRA update of it can have")


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
    if (c.data_split is not None or c.data_subsets is not None or isinstance(c.data, list)) and c.loss == "sft":
        fail("--data-split, --data-subsets and several --data paths read preference datasets; --loss sft reads one "
             ".jsonl/.json(.gz) file")
    check_evaluation_options(c, is_world_run(c))  # spl/evaluation.py's
    if c.tensorboard and (missing := check_tensorboard()):
        fail(missing)
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


def describe(c: TrainConfig, num_parameters: int, trainable: dict, num_examples: int, total_steps: int,
             world_size: int, device) -> str:
    """The run's one-line summary: model size, what is trained, examples, steps and where; then a line for each of
    `warnings`."""
    processes = f" x {world_size} processes{' (FSDP)' if c.fsdp else ''}" if world_size > 1 else ""
    return (f"model: {num_parameters / 1e6:.2f}M parameters; {sum(p.numel() for p in trainable.values()) / 1e6:.3f}M "
            f"trainable{' (LoRA)' if c.lora_rank else ''}; {num_examples} examples, {steps(total_steps)} of "
            f"{f'{c.prompts_per_batch} prompts' if c.prompts_per_batch else c.batch_size}"
            f"{f', anchor {c.anchor:g}' if c.anchor else ''} on {device}{processes}"
            f"{bf16_note(device) if c.dtype == 'bfloat16' else ''}"
            + "".join("\n" + line for line in warnings(c, total_steps)))


def describe_recipe(c: TrainConfig) -> str:
    """Which of the preset's values the run took: those of the options not given (c.from_preset)."""
    taken = [f"--{k.replace('_', '-')} {v:g}" for k, v in PRESETS[c.preset].items()
             if v is not None and k in c.from_preset]
    return f"recipe: {c.preset} for the options not given: {', '.join(taken) or 'none left'}"


def option_defaults(name: str, defaults: TrainConfig) -> str:
    """An option's help: its default, and the values the embedded world's main job and --model (the paper-chat
    recipe) take instead, where they differ."""
    shown = [f"default {getattr(defaults, name)}"]
    if name in WORLD_MAIN_JOB and WORLD_MAIN_JOB[name] != getattr(defaults, name):
        shown.append(f"the world's main job {WORLD_MAIN_JOB[name]}")
    if name in PRESETS[OWN_MODEL_PRESET] and PRESETS[OWN_MODEL_PRESET][name] != getattr(defaults, name):
        shown.append(f"with --model {PRESETS[OWN_MODEL_PRESET][name]} ({OWN_MODEL_PRESET})")
    return "; ".join(shown)


def warnings(c: TrainConfig, total_steps: int) -> list[str]:
    """One line per option that does something other than it seems to in this run."""
    said = []
    if c.warmup_steps > total_steps:
        said.append(f"warning: --warmup-steps {c.warmup_steps} is longer than the run's {steps(total_steps)}: the "
                    f"learning rate never reaches --lr {c.lr:g} (it ends at {c.lr * total_steps / c.warmup_steps:.3g})")
    return said
