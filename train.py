"""Train a policy with Soft Preference Learning (or DPO, IPO, cDPO, f-DPO, SFT, a reward model).

    python train.py --alpha 0.2 --beta 0.1                                 # the embedded world, LoRA, CPU
    python train.py --model DIR --data prefs.jsonl --alpha 0.2 --beta 0.1 --dtype bfloat16   # paper-chat recipe

With no --model/--data it trains on the embedded synthetic world (data/world/): opinion questions with known
population preferences and a tiny reference model, where the closed-form optimum `pi ∝ pi_ref^(beta/alpha)
p^(1/alpha)` (Prop. A.1) is computable; the run ends with a report comparing it with what was learned. The
options, their presets (--model takes the paper's chat recipe) and their checks are spl/config.py's.

Read top to bottom: `run` sets the run up phase by phase (load_model, load_data, trainable_parameters (LoRA),
reference_log_probs once: the model before any update, cached; resume), `loop` is the training loop: per
optimizer step the learning rate (warmup + cosine), accumulate_gradients over `grad_accum` micro-batches with the
loss that step_function chose once for --loss, gradient clipping, AdamW on the trainable parameters, a metrics
line, atomic checkpoints every --save-every steps; last write_outputs (adapter or model, and the world's report).
The run directory's files are spl/runs.py's, the torchrun glue spl/distributed.py's. `main(argv)` and
`train(config)` are the in-process entries the experiments and the world builder call.

At scale, with no change to the code (--batch-size stays the pairs per step, all processes together; how they share
the work, exactly, is spl/distributed.py's docstring):

    torchrun --nproc_per_node 8 train.py --model DIR --data prefs.jsonl --dtype bfloat16 --grad-checkpointing
    torchrun --nproc_per_node 8 train.py ... --fsdp      # frozen weights sharded across the GPUs (FSDP2)
"""
from __future__ import annotations

from spl.signals import exit_quietly_on_stop
exit_quietly_on_stop(__name__, "train.py")  # before torch's import (seconds): a stop signal is one line from here on

import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from data.batching import PreferenceBatches, PromptGroupedBatches, epochs_to_steps
from data.preferences import DataError
from data.sft import SequenceBatches, load_sft_data
from data.tokenization import ContextError, check_context, load_preference_data
from data.world import DEFAULT_DIR as WORLD_DIR, FILES as WORLD_FILES, MODEL_DIR as WORLD_MODEL, load_world
from data.world.report import format_job_report, job_report, world_report
from data.world.reward import exact_reward_floor, world_reward_for_prompts
from data.reference_cache import file_sha256, reference_identity
from models import CheckpointError, ConfigError, MistralConfig, add_lora, build_model, load_pretrained
from models.gguf import resolve_model
from models.tokenizer import check_vocabulary, describe_format, load_tokenizer
from spl import evaluation, online, runs
from spl.cli import UsageError, check_fits, choose_threads, resolve_device
from spl.console import ConsoleLog
from spl.plot import TensorBoardLog, draw_curves
from spl.config import (RESUME_MAY_CHANGE, TrainConfig, describe, describe_recipe, is_world_run, parse_args,
                        validate_for_model)
from spl.distributed import (Processes, check_run_directory, prepare_run_directory, resume, run_directory_lock,
                             save_checkpoint, share_batches, shard_frozen_weights, start_processes, stop_processes,
                             sum_across, sum_gradients_)
from spl.reference import reference_log_probs
from spl.step import (PREFERENCE_LOSSES, Objective, RewardHead, grouped_preference_step, preference_step,
                      reward_step, sft_step)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float, floor_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `floor_ratio * peak` at `total_steps`."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * (floor_ratio + (1 - floor_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


# --------------------------------------------------------------------------------------------------- entry points

def main(argv=None) -> int:
    try:
        with runs.StopSignals(immediate=True):  # SIGINT/SIGTERM in any phase: one line, exit 128 + signal
            return train(parse_args(argv))
    except runs.Stopped as stop:
        return stop.exit("train.py", quiet=not Processes.from_environment().main)
    except (UsageError, ContextError, DataError, CheckpointError, ConfigError, runs.RunError) as error:
        # Every process meets these alike (same inputs; run-directory checks are rank 0's, broadcast): one line.
        if Processes.from_environment().main:
            print(f"train.py: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, (UsageError, ContextError)) else 1


def train(c: TrainConfig) -> int:
    """One training run, in this process: join torchrun's process group when launched by it, hold the run
    directory's lock, run, and leave. Returns the exit code (0: done; 128 + signal: stopped and saved)."""
    procs = Processes.from_environment()
    runs.check_out(c.out, c.resume, c.overwrite, c.inputs_read(WORLD_MODEL, WORLD_DIR))  # before anything is touched
    if procs.distributed and c.device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device {c.device}: under torchrun every process takes cuda:LOCAL_RANK; "
                         f"give --device auto, cuda or cpu")
    device = start_processes(procs, resolve_device(c.device))
    try:
        with run_directory_lock(Path(c.out), procs), ConsoleLog(enabled=procs.main) as console:
            code = run(c, procs, device, console)
        if procs.distributed:
            # Leave together: rank 0 still writes the outputs when the others finish, and a gloo process whose
            # peer tears its connections down first can abort in its own teardown ("terminate called ...").
            dist.barrier()
        return code
    finally:
        stop_processes(procs)


# --------------------------------------------------------------------------------------------------- the run

@dataclass
class Setup:
    """What the loop needs, made by `run`'s phases."""
    model: torch.nn.Module
    trainable: dict
    optimizer: torch.optim.Optimizer
    batches: object  # the seeded, resumable order of micro-batches (data/batching.py)
    step_loss: object  # micro-batch -> (loss, metric sums), step_function's
    total_steps: int
    start_step: int
    evaluate: object = None  # () -> {eval_<metric>: mean over the held-out pairs}, when there is an eval set
    console: object = None  # spl/console.py ConsoleLog: what is printed, kept in OUT/train.log once training starts


def run(c: TrainConfig, procs: Processes, device, console: ConsoleLog) -> int:
    """The whole run, phase by phase; each phase is a function below, in the order it runs. What it prints is
    kept in OUT/train.log once training starts (spl/console.py): a refused run changes no file of its directory."""
    say = print if procs.main else (lambda *args, **kwargs: None)  # only rank 0 prints
    out = Path(c.out)
    check_run_directory(out, dataclasses.asdict(c), c.resume, c.overwrite, RESUME_MAY_CHANGE, procs)
    compile = {"auto": device.type == "cuda", "on": True, "off": False}[c.compile]
    torch.manual_seed(c.seed)
    np.random.seed(c.seed)
    model, tokenizer, model_dir, tokenizer_path = load_model(c, device)
    c = dataclasses.replace(c, detected_chat_format=tokenizer.chat_format)  # recorded in config.json
    examples, summary = load_data(c, tokenizer, say, model.config.vocab_size)
    examples, held_out, held_out_sha256 = evaluation.held_out_examples(c, tokenizer, examples, summary.sha256,
                                                                       model.config.vocab_size, say)
    total_steps = c.steps or epochs_to_steps(examples, c.epochs, c.prompts_per_batch or c.batch_size,
                                             c.prompts_per_batch > 0)
    inputs = {"data": summary.sha256, "tokenizer": file_sha256(tokenizer_path),  # recorded; --resume compares
              "model": reference_identity(model_dir, c.init_config, c.seed, c.dtype, c.average_logprobs)}
    prepare_run_directory(out, dataclasses.asdict(c), c.resume, c.overwrite, procs, inputs, say)  # inputs checked
    num_parameters = model.num_parameters()  # the model's own, before LoRA adds its branches
    trainable, head = trainable_parameters(model, c, procs, device)
    reference = held_out_reference = None  # (ref_chosen_logps [N], ref_rejected_logps [N]), preference losses
    if c.loss in PREFERENCE_LOSSES:  # the model as loaded, LoRA off, before any update; cached (spl/reference.py)
        reference = reference_log_probs(model, examples, inputs["data"], inputs, tokenizer, out / "cache", c, procs,
                                        device, compile)
        if held_out:  # its own key, its own cache
            held_out_reference = reference_log_probs(model, held_out, held_out_sha256, inputs, tokenizer,
                                                     out / "cache", c, procs, device, compile)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=c.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay)
    if c.loss == "spl-online":  # the data's distinct prompts, the reward, and a seeded order of prompt batches
        prompts = online.distinct_prompts(examples)
        reward = online_reward(c, tokenizer, prompts, device)
        batches, reference = online.training_batches(prompts, reward, tokenizer, c.batch_size // c.grad_accum,
                                                     c.seed, c.max_new_tokens, c.online_estimator, procs)
    else:
        batches = training_batches(examples, tokenizer.pad_id, c, procs)
    say(describe(c, num_parameters, trainable, len(examples), total_steps, procs.world_size, device))
    start_step = resume(out, trainable, optimizer, batches, total_steps, procs, say) if c.resume else 0
    setup = Setup(model, trainable, optimizer, batches, step_function(c, model, head, reference, compile),
                  total_steps, start_step, console=console)
    if held_out:  # each evaluation: the training loss over a fresh seeded order of the held-out pairs
        held_out_loss = step_function(c, model, head, held_out_reference, compile)
        setup.evaluate = lambda: evaluation.evaluate(model, held_out_loss, training_batches(
            held_out, tokenizer.pad_id, c, procs), procs, device)
    code = loop(setup, c, procs, device, out, say, reports=is_world_run(c) and (procs.main or c.fsdp),
                tokenizer=tokenizer)
    with runs.StopSignals() as signals:  # a signal while the outputs are written waits for them (never a cut write)
        if code == 0:
            write_outputs(model, head, tokenizer, tokenizer_path, model_dir, out, c, procs, device,
                          is_world_run(c) and (procs.main or c.fsdp), reference[:2] if c.loss == "spl-online" else None)
    signals.check("came while the outputs were written; they were finished first")
    return code


def loop(s: Setup, c: TrainConfig, procs: Processes, device, out: Path, say, reports: bool, tokenizer) -> int:
    """The training loop: one optimizer step per iteration, a metrics line, checkpoints, the world's brief
    report every --eval-every steps; stop signals save and return 128 + signal. (The world's report runs the
    model: on rank 0, or on every process when FSDP shards the model.)"""
    def save(step):
        return save_checkpoint(out, step, s.trainable, s.optimizer, s.batches, c.keep_checkpoints, procs)

    log = runs.MetricsLog(out / "metrics.jsonl", s.start_step if c.resume else None, procs.main, say=say)
    log = TensorBoardLog(log, out / "tensorboard") if c.tensorboard and procs.main else log  # spl/plot.py
    s.console.keep_in(out / "train.log")  # every check passed: from here on the run's console is kept
    s.model.train()
    last_saved = None
    with runs.StopSignals() as signals:
        progress = tqdm(range(s.start_step, s.total_steps), initial=s.start_step, total=s.total_steps,
                        disable=not (c.progress and procs.main), dynamic_ncols=True)
        for step in progress:
            lr = learning_rate(step, s.total_steps, c.warmup_steps, c.lr)
            for group in s.optimizer.param_groups:
                group["lr"] = lr
            started, started_cpu = time.perf_counter(), time.process_time()
            sums, units, tokens = accumulate_gradients(s.step_loss, s.batches, s.trainable, c.grad_accum, procs,
                                                       device)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(list(s.trainable.values()), c.max_grad_norm))
            if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
                kept = f"; the last good checkpoint is {last_saved}" if last_saved else ""
                say(f"train.py: error: non-finite loss or gradient at step {step + 1} (loss {sums['loss']}, grad "
                    f"norm {grad_norm}); stopped without applying it{kept}", file=sys.stderr)
                log.close()
                return 1
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            step_s = time.perf_counter() - started
            record = {"step": step + 1, **{k: v / units for k, v in sums.items()}, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": tokens / step_s, "step_s": step_s,
                      "step_cpu_s": time.process_time() - started_cpu}  # this process's CPU seconds, all threads
            if (step + 1) % c.log_every == 0 or step + 1 == s.total_steps:
                log.write(record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            if c.save_every and (step + 1) % c.save_every == 0:
                last_saved = save(step + 1)
            if c.eval_every and (step + 1) % c.eval_every == 0 and step + 1 < s.total_steps:
                evaluate(s, step + 1, log, say)
                if reports:
                    log.write({"step": step + 1, **world_report(s.model, tokenizer, *report_coefficients(c), device,
                                                                 brief=True)})
            if sum_across(procs, [float(signals.received is not None)], device)[0] > 0:  # all stop together
                if last_saved is None or not last_saved.name.endswith(f"{step + 1:06d}"):
                    last_saved = save(step + 1)
                progress.close()
                log.close()  # another process's signal stops this one too, as SIGTERM
                raise runs.Stopped(signals.received or signal.SIGTERM, f"saved {last_saved}; continue with the same "
                                   f"command plus --resume")
        progress.close()
    evaluate(s, s.total_steps, log, say)
    log.close()
    saved_last_step = last_saved is not None and last_saved.name.endswith(f"{s.total_steps:06d}")
    if c.save_every and s.total_steps >= c.save_every and not saved_last_step:  # a shorter run saves none
        save(s.total_steps)
    return 0


# --------------------------------------------------------------------------------------------------- the phases

def load_model(c: TrainConfig, device):
    """(model, tokenizer, model_dir, tokenizer_path): --model, the world's reference model, or random weights
    from --init-config (model_dir None). Read tensor by tensor straight onto the device (no CPU copy of a 7B
    model). With --fsdp each process reads it into CPU memory and FSDP moves its shards to its GPU block by
    block, so no GPU ever holds the whole model."""
    load_device = torch.device("cpu") if c.fsdp else device
    if c.init_config:
        model_dir, config = None, MistralConfig.from_json(c.init_config)
        check_fits(16 * config.num_parameters(), f"--init-config {c.init_config}: a full fine-tune (4 float32s a "
                   f"parameter: weight, gradient, AdamW's two moments)", load_device)
        model = build_model(config, dtype=DTYPES[c.dtype], device=load_device, seed=c.seed)
    else:
        model_dir = resolve_model(c.model) if c.model else WORLD_MODEL  # a directory, a .gguf file or smollm2
        model = load_pretrained(model_dir, dtype=DTYPES[c.dtype], device=load_device)
    # tokenizer.model, tekken.json or tokenizer.json, and the chat format, from the checkpoint or --chat-format
    tokenizer, tokenizer_path = load_tokenizer(model_dir or Path(c.init_config).parent, c.chat_format)
    check_vocabulary(tokenizer, model.config.vocab_size, model_dir or c.init_config)  # a tokenizer of another model
    check_context(c.max_length, model.config.max_position_embeddings, "--max-length", model_dir or c.init_config)
    choose_threads(c.threads, model.num_parameters(), device)  # 0: one thread for a small model on CPU
    validate_for_model(c, model)  # the LoRA rank the model bounds, refused before any work
    return model, tokenizer, model_dir, tokenizer_path


def load_data(c: TrainConfig, tokenizer, say, vocab_size: int):
    """(examples, summary): --data (or the world's opinion pairs, its SFT text for --loss sft), tokenized in the
    tokenizer's chat format, truncated and checked."""
    data_path = c.data or WORLD_DIR / WORLD_FILES["sft" if c.loss == "sft" else "opinion_pairs_soft"]  # or several
    if c.loss == "sft":
        examples, summary = load_sft_data(data_path, tokenizer, c.max_length, c.max_prompt_length,
                                          {"prompt": c.prompt_key, "response": c.response_key})
    else:
        examples, summary = load_preference_data(data_path, tokenizer, c.max_length, c.max_prompt_length,
                                                 c.column_map(), c.data_split, vocab_size, c.data_subsets)
    say(describe_format(tokenizer))
    say(summary.format())
    if c.preset:
        say(describe_recipe(c))
    if not examples:
        raise UsageError(f"{summary.path}: no usable examples")
    if c.loss == "cdpo" and any(e.chosen_prob != 1.0 for e in examples):
        raise UsageError(f"{summary.path}: --loss cdpo smooths every label by --label-smoothing; the data's soft "
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


def training_batches(examples, pad_id: int, c: TrainConfig, procs: Processes):
    """The seeded order of micro-batches (batch_size / grad_accum pairs, or sequences for SFT, all processes
    together), each process drawing its own share of each (spl/distributed.py share_batches)."""
    if c.prompts_per_batch:  # whole prompts: prompts_per_batch / grad_accum of them per micro-batch
        return share_batches(PromptGroupedBatches(examples, c.prompts_per_batch // c.grad_accum, pad_id, seed=c.seed,
                                                  group_by_length=c.group_by_length), procs)
    Batches = SequenceBatches if c.loss == "sft" else PreferenceBatches
    return share_batches(Batches(examples, c.batch_size // c.grad_accum, pad_id, seed=c.seed,
                                 group_by_length=c.group_by_length), procs)


def online_reward(c: TrainConfig, tokenizer, prompts, device):
    """spl-online's reward for the data's distinct prompts: the world's exact reward (log p of an option, the
    floor elsewhere), or the reward model of --reward-model on the base model it was trained from (with
    --reward-floor: only on the data's responses, the floor elsewhere)."""
    try:
        if c.reward_model is None:
            floor = exact_reward_floor(c.alpha, c.beta, c.max_new_tokens, tokenizer.vocab_size, c.reward_floor)[0]
            return world_reward_for_prompts(load_world(WORLD_DIR).opinions, tokenizer, prompts, floor)
        return online.load_reward_model(c.reward_model, WORLD_MODEL, prompts, tokenizer.pad_id, c.reward_floor,
                                        device, DTYPES[c.dtype])
    except ValueError as error:  # data that are not the world's questions; a directory that is no reward run
        raise UsageError(f"{c.data}: {error}" if c.reward_model is None else str(error)) from None


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
                    shared_prefix=c.uses_shared_prefix())[:2]

    return preference_loss


def accumulate_gradients(step_loss, batches, trainable: dict, grad_accum: int, procs: Processes, device):
    """The gradient of one optimizer step in every trainable parameter's .grad: grad_accum micro-batches, each
    back-propagating `sum over its pairs of loss / N` with N the step's pairs over all processes (tokens for
    SFT), then one all-reduce. Returns (metric sums, N, tokens), all processes together."""
    micro_batches, counted = [], []
    for _ in range(grad_accum):
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


def evaluate(s: Setup, step: int, log, say) -> None:
    """The held-out metrics (when there is an eval set), logged with the step and printed (spl/evaluation.py)."""
    if s.evaluate is not None:
        record = s.evaluate()
        log.write({"step": step, **record})
        say(evaluation.format_evaluation(step, record))


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
        exact = c.loss == "spl-online" and c.reward_model is None  # beside it, the full-space optimum's mass
        floor = exact_reward_floor(c.alpha, c.beta, c.max_new_tokens, tokenizer.vocab_size, c.reward_floor)
        report = job_report(model, tokenizer, *report_coefficients(c), device, exact_floor=floor if exact else None,
                            reward_model=online_reward if c.loss == "spl-online" and not exact else None)
    if not procs.main:
        return
    runs.save_outputs(out, model, head, str(model_dir or c.init_config), tokenizer_path, bool(c.lora_rank), report)
    if report is not None:
        print(format_job_report(report))
    if c.plot and (picture := draw_curves(out)) is not None:  # when matplotlib is installed
        print(f"curves: {picture}")


if __name__ == "__main__":
    sys.exit(main())
