"""The GPU check: everything a first lent GPU should run, in one call, into one JSON summary.

    python -m eval.bench.gpu --out gpu.json                # on the GPU machine (about 6 minutes on one H100)
    python -m eval.bench.gpu --dry-run --out dry.json      # the same steps on CPU at tiny shapes (the tests run it)

No GPU has been lent to this project yet, so none of the CUDA paths (bf16 GEMMs, SDPA's CUDA kernels,
torch.compile's Triton code, NCCL, FSDP2 on a GPU) has run. Each step below is one process with its own time
limit; a step that fails or runs out of time is recorded with its exit code and the tail of its output, and the
next one still runs, so one call gives every answer there is. The summary holds, per step, the command, exit code,
seconds and the step's own JSON record (the last JSON line it printed).

  device_tests    `pytest -m device` with SPL_TEST_DEVICE=cuda: the fused log-probs (fp32, bf16), a LoRA SPL step
                  and cached greedy decoding on the GPU against float64 CPU oracles (tests/test_device.py)
  step_7b         eval/bench/step.py: the Mistral-7B-shape LoRA SPL step in bf16 (4 pairs x 1024 tokens): tokens/s,
                  peak memory, MFU against the bf16 matmul rate measured in the same process; eager, then compiled
  step_7b_compiled
  logprobs_fused  eval/bench/logprobs.py at D = 4096, V = 32768 (B = 4, T = 1024, bf16): the fused kernel, torch's
  logprobs_naive  chunked F.linear_cross_entropy and the naive log_softmax path, time and peak extra memory each
  logprobs_torch
  generate        eval/bench/generate.py: models.generate and online SPL's sampler against HF generate + peft, a
                  live LoRA (r = 16) on both, 16 samples x 128 tokens, bf16
  torchrun_train  torchrun --nproc_per_node 1 train.py: 3 steps of the main job on the GPU, launched as at scale
  nccl_fsdp2      this module's --fsdp-smoke under torchrun: a process group on NCCL (gloo on the dry run), an
                  all-reduce, then the frozen weights sharded with FSDP2's fully_shard (spl.distributed's
                  shard_frozen_weights) and one LoRA SPL step whose loss and LoRA gradients equal the unsharded
                  model's

The time limits add up to under 8 minutes (the budget one lent machine call allows, with room to rerun).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere


DRY_RUN_LIMIT = 600  # seconds per step of --dry-run


def steps(dry_run: bool, work: Path) -> list[tuple[str, list[str], dict, int]]:
    """(name, command, extra environment, time limit in seconds) of every step, GPU or dry-run shapes."""
    py = sys.executable
    device = "cpu" if dry_run else "cuda"
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    if dry_run:
        step_shape = ["--scale", "0.03125", "--iters", "1", "--matmul-size", "256", "--vocab", "512"]
        logprobs_shape = ["--batch", "2", "--seq", "32", "--dim", "64", "--vocab", "500", "--iters", "1"]
        generate_shape = ["-n", "2", "--max-new-tokens", "4", "--repeats", "1", "--threads", "1"]
    else:
        step_shape, generate_shape = ["--iters", "3"], ["-n", "16", "--max-new-tokens", "128", "--repeats", "3"]
        logprobs_shape = ["--batch", "4", "--seq", "1024", "--dim", "4096", "--vocab", "32768", "--iters", "5"]
    dtype = "float32" if dry_run else "bfloat16"
    return [
        ("device_tests", [py, "-m", "pytest", "-q", "-n", "0", "-m", "device", "-p", "no:cacheprovider",  # in-process
                          str(ROOT / "tests")],
         {"SPL_TEST_DEVICE": device}, 60),
        ("step_7b", [py, str(ROOT / "eval/bench/step.py"), "--device", device, "--dtype", dtype, "--compile", "off",
                     *step_shape], {}, 60),
        ("step_7b_compiled", [py, str(ROOT / "eval/bench/step.py"), "--device", device, "--dtype", dtype,
                              "--compile", "on", *step_shape], {}, 90),
        *[(f"logprobs_{name}", [py, str(ROOT / "eval/bench/logprobs.py"), "--method", method, "--device", device,
                                "--dtype", dtype, *logprobs_shape], {}, 40)
          for name, method in (("fused", "fused"), ("naive", "naive"), ("torch", "torch_chunked"))],
        ("generate", [py, str(ROOT / "eval/bench/generate.py"), "--device", device, "--dtype", dtype, "--json",
                      "--lora", "16", *generate_shape], {}, 45),
        ("torchrun_train", [*torchrun, str(ROOT / "train.py"), "--steps", "3", "--device", device, "--no-progress",
                           "--out", str(work / "torchrun")], {}, 45),
        ("nccl_fsdp2", [*torchrun, str(ROOT / "eval/bench/gpu.py"), "--fsdp-smoke", "--device", device], {}, 45),
    ]


def last_json(text: str):
    """The last line of `text` that parses as a JSON object, or None."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def run_step(name: str, command: list[str], environment: dict, limit: int) -> dict:
    started = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **environment}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT, env=env)
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        code = "timeout"
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                         for part in (expired.stdout, expired.stderr))
    record = {"name": name, "command": " ".join(command), "exit_code": code,
              "seconds": round(time.perf_counter() - started, 2), "result": last_json(output)}
    if code != 0:
        record["output_tail"] = output[-3000:]
    return record


def fsdp_smoke(device_name: str) -> int:
    """Under torchrun: one LoRA SPL step with the frozen weights sharded by FSDP2 (spl.distributed's own
    shard_frozen_weights) against the same step on an unsharded copy; prints one JSON line."""
    import copy

    import torch
    import torch.distributed as dist

    from models import add_lora, build_model
    from models.lora import TARGET_NAMES
    from models.mistral import MistralConfig
    from spl.distributed import Processes, shard_frozen_weights
    from spl.step import Objective, preference_step

    procs = Processes.from_environment()
    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", procs.local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=procs.rank,
                            world_size=procs.world_size)  # a group even for one process: the collectives run
    total = torch.ones(3, device=device) * (procs.rank + 1)
    dist.all_reduce(total)
    all_reduce_ok = total.tolist() == [procs.world_size * (procs.world_size + 1) / 2] * 3
    config = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                           rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False)
    model = build_model(config, dtype=torch.float32, device=torch.device("cpu"), seed=0)
    add_lora(model, 4, 8.0, 0.0, list(TARGET_NAMES))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    plain = copy.deepcopy(model).to(device)
    shard_frozen_weights(model, procs, device)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (4, 24), generator=generator)
    mask = torch.zeros(4, 24, dtype=torch.bool)
    mask[:, 8:-1] = True
    batch = {"input_ids": ids, "targets": torch.roll(ids, -1, 1), "loss_mask": mask,
             "attention_mask": torch.ones(4, 24, dtype=torch.bool), "chosen_prob": torch.tensor([0.75, 0.6])}
    batch = {k: v.to(device) for k, v in batch.items()}
    reference = torch.tensor([-150.0, -160.0], device=device), torch.tensor([-152.0, -158.0], device=device)
    losses, grads = [], []
    for m in (plain, model):
        loss = preference_step(m, batch, *reference, Objective(), compile=False)[0]
        loss.backward()
        losses.append(float(loss))
        grads.append({n: p.grad.detach().float().cpu() for n, p in m.named_parameters() if p.requires_grad})
    max_grad_diff = max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0])
    backend = dist.get_backend()
    dist.destroy_process_group()
    ok = (all_reduce_ok and abs(losses[0] - losses[1]) < 1e-5 and max_grad_diff < 1e-5
          and grads[0].keys() == grads[1].keys())
    print(json.dumps({"backend": backend, "all_reduce_ok": all_reduce_ok,
                      "loss_unsharded": losses[0], "loss_fsdp2": losses[1], "max_lora_grad_diff": max_grad_diff,
                      "lora_tensors": len(grads[0]), "ok": ok}))
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu.json", help="the JSON summary (default gpu.json)")
    parser.add_argument("--dry-run", action="store_true", help="every step on CPU at tiny shapes")
    parser.add_argument("--only", help="comma-separated step names to run (default: all)")
    parser.add_argument("--fsdp-smoke", action="store_true", help=argparse.SUPPRESS)  # the fsdp2 step's child
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fsdp_smoke:
        return fsdp_smoke(args.device)

    import torch

    summary = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "dry_run": args.dry_run,
               "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "steps": []}
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu.py: error: no CUDA device here; use --dry-run to run the steps on CPU", file=sys.stderr)
        return 2
    wanted = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory() as work:
        for name, command, environment, limit in steps(args.dry_run, Path(work)):
            if wanted and name not in wanted:
                continue
            # The limits are the GPU's budget; a dry run checks the plumbing, on a CPU that may be busy.
            record = run_step(name, command, environment, DRY_RUN_LIMIT if args.dry_run else limit)
            summary["steps"].append(record)
            print(f"{name:<18} exit {record['exit_code']!s:<8} {record['seconds']:7.1f} s  "
                  f"{json.dumps(record['result'])[:150] if record['result'] else ''}", flush=True)
            Path(args.out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")  # after every step
    failed = [s["name"] for s in summary["steps"] if s["exit_code"] != 0]
    print(f"summary: {args.out}; {len(summary['steps']) - len(failed)} of {len(summary['steps'])} steps ok"
          f"{'; failed: ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
