"""Several processes under torchrun: who this process is, the few collectives a training step needs, FSDP2.

With one process (plain `python train.py`) every helper here is the identity and no collective is called.
Data parallelism is done by hand rather than with DistributedDataParallel: every process draws the same seeded
global batch and takes a contiguous share (`share_batches`); the step's pair count is summed over processes so
each one back-propagates its share of the global mean loss; one all-reduce of the LoRA gradients per optimizer
step (`sum_gradients_`) then gives every process the one-process gradient. (DDP hooks `forward`, while the
training step calls `hidden_states`; and one reduction after gradient accumulation is exact and easy to read.)

Values other than tensors (a problem found by rank 0, every process's RNG state) travel as JSON bytes in uint8
tensors, not through torch's `*_object` collectives, which pickle.

train.py under torchrun, in full: --batch-size is the number of pairs per optimizer step, all processes together:
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

FSDP's modules are imported inside `shard_frozen_weights`: they take seconds to import and only --fsdp uses them.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data.reference_cache import reference_logps
from models.lora import lora_modules
from spl import runs
from spl.cli import UsageError, steps


@dataclass(frozen=True)
class Processes:
    """This process among torchrun's, from the RANK, WORLD_SIZE and LOCAL_RANK it sets; without torchrun,
    rank 0 of 1."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Processes":
        env = os.environ
        return cls(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _collective_device():
    """Where a collective's tensors must live: the process's GPU under NCCL, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_bytes(value, device) -> torch.Tensor:
    """`value` as JSON, UTF-8, in a uint8 tensor [n] (torch's object collectives pickle; JSON cannot run code)."""
    data = json.dumps(value, allow_nan=True).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)  # [n]


def _from_bytes(data: torch.Tensor):
    return json.loads(data.cpu().numpy().tobytes().decode("utf-8"))


def broadcast_from_main(procs: Processes, value):
    """Rank 0's `value` (anything JSON can hold: None, bool, numbers, strings, lists, dicts) on every process,
    as JSON bytes in two tensor broadcasts (its length, then the bytes). Tuples come back as lists."""
    if not procs.distributed:
        return value
    device = _collective_device()
    data = _to_bytes(value, device) if procs.main else None
    length = torch.tensor([data.numel() if procs.main else 0], dtype=torch.int64, device=device)  # [1]
    dist.broadcast(length, src=0)
    if not procs.main:
        data = torch.empty(int(length), dtype=torch.uint8, device=device)  # [n]
    dist.broadcast(data, src=0)
    return _from_bytes(data)


def gather_to_main(procs: Processes, value) -> list | None:
    """Every process's JSON-able `value`, in rank order, on rank 0 (None on the others); [value] with one
    process. JSON bytes through two all_gathers (lengths, then the bytes padded to the longest): gloo and NCCL
    both have all_gather for tensors."""
    if not procs.distributed:
        return [value]
    device = _collective_device()
    data = _to_bytes(value, device)
    lengths = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(procs.world_size)]
    dist.all_gather(lengths, torch.tensor([data.numel()], dtype=torch.int64, device=device))
    longest = max(int(n) for n in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)  # [longest]
    padded[:data.numel()] = data
    gathered = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(procs.world_size)]
    dist.all_gather(gathered, padded)
    if not procs.main:
        return None
    return [_from_bytes(g[:int(n)]) for g, n in zip(gathered, lengths)]


def sum_across(procs: Processes, values: list, device) -> list:
    """Every value summed over all processes (one float64 all-reduce); `values` unchanged with one process."""
    if not procs.distributed:
        return list(values)
    summed = torch.tensor(values, dtype=torch.float64, device=device)  # [len(values)]
    dist.all_reduce(summed)
    return summed.tolist()


def sum_gradients_(procs: Processes, parameters: list) -> None:
    """All-reduce (sum) the gradients of `parameters` in one flat buffer. Each process back-propagated
    sum over its pairs of loss / N (N: the step's pairs over all processes), so the sum is the gradient of the
    global mean loss, the one-process gradient; every process then holds it and takes the same AdamW step."""
    if not procs.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1).float() for g in grads])  # [sum of numels]
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(parameters, grads):
        p.grad = flat[offset:offset + g.numel()].view_as(g).to(g.dtype)
        offset += g.numel()


def share_batches(batches, procs: Processes):
    """Make `batches` (PreferenceBatches or SequenceBatches, the same seeded order on every process) yield this
    process's share of each global batch: the batch's examples cut into world_size contiguous shares, each
    collated alone (so padded to its own longest row); batches that say how to cut (PromptGroupedBatches.shares:
    whole prompts, so a prompt's responses stay together for the anchor) cut their way. A share left empty by a
    short last batch takes the batch's first example and batch["counts"] = False: the process still runs the
    forward and backward passes that the collectives (and FSDP) expect, but adds nothing to the step. One
    process: `batches` unchanged."""
    if not procs.distributed:
        return batches
    collate = batches.collate_fn
    cut = getattr(batches, "shares", None)

    def collate_share(examples, pad_id, pad_to_multiple):
        if cut is not None:
            share = cut(examples, procs.world_size)[procs.rank]
        else:
            per_process = -(-len(examples) // procs.world_size)
            share = examples[procs.rank * per_process:(procs.rank + 1) * per_process]
        batch = collate(share or examples[:1], pad_id, pad_to_multiple)
        batch["counts"] = bool(share)
        return batch

    batches.collate_fn = collate_share
    return batches


def shared_reference_logps(path, key, compute, procs: Processes, device):
    """Reference log-probs ([N] chosen, [N] rejected, on `device`), computed once for all processes. Rank 0 runs
    data.reference_cache.reference_logps (the path its tests cover: load and verify, or compute and save) and
    sends a hit to the others; on a miss every process scores its share (compute() returns its pairs' values and
    zeros elsewhere) and an all-reduce joins the shares. With one process this is reference_logps itself.
    Computed values that are not finite stop every process in one line before the cache is written; a cache that
    cannot be written (a full disk) is one line too (spl/files.py)."""
    def computed_by_all():  # [2, N]: every process's share, joined
        both = torch.stack(compute()).float().to(device)
        if procs.distributed:
            dist.all_reduce(both)
        runs.check_finite_reference(both[0], both[1])
        return both

    if not procs.main:
        if broadcast_from_main(procs, None):  # rank 0 missed the cache
            both = computed_by_all()
        else:
            both = torch.empty(2, key.num_examples, device=device)
            dist.broadcast(both, src=0)
        return both[0], both[1]
    missed = []

    def on_miss():
        missed.append(True)
        broadcast_from_main(procs, True)
        return tuple(computed_by_all())

    with runs.writing(path):
        both = torch.stack(reference_logps(path, key, on_miss, log=print)).to(device)  # [2, N]
    if not missed:
        broadcast_from_main(procs, False)
        if procs.distributed:
            dist.broadcast(both, src=0)
    return both[0], both[1]


def shard_frozen_weights(model, procs: Processes, device) -> None:
    """FSDP2: `fully_shard` each decoder block, then the root (embeddings and final norm), over all processes.

    The trainable (LoRA) parameters and the output head stay whole on every process (`ignored_params`): the
    fused log-prob kernel reads lm_head.weight outside any module's forward, and the LoRA gradients then take
    the same all-reduce, optimizer and checkpoints as without FSDP. `hidden_states` is registered as a forward
    method, so the root gathers its shards when the step calls it. FSDP moves what it shards to `device`, one
    block at a time; the whole parameters are moved here."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    whole = {p for p in model.parameters() if p.requires_grad} | {model.lm_head.weight}
    mesh = init_device_mesh(device.type, (procs.world_size,))
    for block in model.layers:
        fully_shard(block, mesh=mesh, ignored_params=whole)
    fully_shard(model, mesh=mesh, ignored_params=whole)
    register_fsdp_forward_method(model, "hidden_states")
    model.lm_head.to(device)
    for module in lora_modules(model).values():
        module.lora_A.to(device)
        module.lora_B.to(device)


# ----------------------------------------------------------------------------------- train.py's process glue

def start_processes(procs: Processes, device):
    """The device this process drives (`device`: what --device resolved to). Under torchrun, also join the
    process group: NCCL with one GPU per process (cuda:LOCAL_RANK), gloo on CPU. With one process every helper
    of this module is the identity."""
    if not procs.distributed:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=procs.rank, world_size=procs.world_size, device_id=device)
    else:
        dist.init_process_group("gloo", rank=procs.rank, world_size=procs.world_size)
    return device


def stop_processes(procs: Processes) -> None:
    """Leave torchrun's process group (nothing with one process). Garbage is collected first: FSDP2's module state
    keeps reference cycles that can hold a collective's work object, and gloo aborts the process ("terminate
    called without an active exception") when such an object is only destroyed during interpreter shutdown."""
    if procs.distributed:
        gc.collect()
        dist.destroy_process_group()


def on_main(procs: Processes, action, error_type):
    """`action()` on rank 0 alone (the process that reads and writes the run directory); its result there, None
    elsewhere. An `error_type` it raises is raised on every process with the same message, so all stop alike."""
    result, problem = None, None
    if procs.main:
        try:
            result = action()
        except error_type as error:
            problem = str(error)
    problem = broadcast_from_main(procs, problem)
    if problem:
        raise error_type(problem)
    return result


def check_run_directory(out: Path, config: dict, resume: bool, overwrite: bool, may_change, procs: Processes):
    """Refuse an unusable run directory before any work and before anything is written: rank 0 looks (spl/runs.py;
    with --resume, the saved options must equal `config` but for `may_change`), every process raises alike."""
    def check():
        runs.check_run_dir(out, resume, overwrite)
        if resume:
            runs.check_resumed_config(out, config, may_change)
    on_main(procs, check, runs.RunError)


def prepare_run_directory(out: Path, config: dict, resume: bool, overwrite: bool, procs: Processes,
                          inputs: dict | None = None, say=print) -> dict | None:
    """Rank 0 creates the run directory (a marked one emptied with --overwrite) with its marker and, for a new run,
    `config` as its config.json with the inputs' fingerprints; for --resume it checks that the inputs are the
    run's (spl/rundir.py). Every process raises alike. Returns `inputs`."""
    on_main(procs, lambda: runs.prepare_run_dir(out, resume, overwrite, config, inputs, say), runs.RunError)
    return inputs


@contextlib.contextmanager
def run_directory_lock(out: Path, procs: Processes):
    """Rank 0 holds out/.lock for the whole run (spl/runs.py RunLock): a second process on the same --out is
    refused in one line, with --resume and --overwrite too, before it reads or deletes anything; a lock left by
    a killed process is taken over and named. Every process raises the same error."""
    lock = on_main(procs, lambda: runs.RunLock(out).__enter__(), runs.RunError)
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


def resume(out: Path, trainable: dict, optimizer, batches, total_steps: int, procs: Processes, say) -> int:
    """Load the newest checkpoint of `out` that verifies against its manifest (a damaged newer one is named in
    one line and passed over; every process reads the one rank 0 picked) into the trainable parameters, the
    optimizer, the data position and the RNGs; returns its step (0 if there is none yet), at most total_steps."""
    def latest():
        runs.clean_interrupted_saves(out)
        return runs.load_latest_checkpoint(out, say)

    found = on_main(procs, latest, runs.RunError)
    checkpoint = broadcast_from_main(procs, str(found[0]) if found else None)
    if not checkpoint:
        say(f"{out}: no complete checkpoint yet; starting from step 0")
        return 0
    checkpoint = Path(checkpoint)
    tensors, optimizer_state, rng, state = found[1] if procs.main else runs.load_checkpoint(checkpoint)
    if state["step"] > total_steps:
        raise UsageError(f"{checkpoint}: is step {state['step']}, past the {steps(total_steps)} asked for; give "
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


def save_checkpoint(out: Path, step: int, trainable: dict, optimizer, batches, keep: int, procs: Processes):
    """Checkpoint `step` (spl/runs.py, atomic): every process calls this (their RNG states are gathered); rank 0
    writes; a failed save (disk full, no permission) keeps the previous checkpoint and stops every process.
    Returns the checkpoint's directory."""
    rng = runs.rng_state()
    if procs.distributed:  # as JSON in tensors (torch's object collectives pickle)
        states = gather_to_main(procs, runs.rng_state_to_json(rng))
        rng = {"per_rank": [runs.rng_state_from_json(state) for state in states]} if procs.main else None
    path = on_main(procs, lambda: runs.save_checkpoint(out, step, trainable, optimizer, {"data": batches.state_dict()},
                                                       keep=keep, rng=rng), runs.RunError)
    return path if procs.main else out / "checkpoints" / f"step_{step:06d}"
