"""Benchmark: sequence log-probs, forward + backward, naive vs torch's chunked F.linear_cross_entropy vs ours.

    python eval/bench/logprobs.py                      # every method, each in its own process, then a table
    python eval/bench/logprobs.py --method fused       # one method in this process, one JSON line
    python eval/bench/logprobs.py --device cuda --dtype bfloat16 --batch 8 --dim 4096

Every method computes the same thing: per-sequence sums of the log-probabilities of the masked-in targets
under softmax(hidden @ weight.T), then backward of sum_b g[b] * logp[b] with a fixed random g (a preference
loss weights every sequence differently), into hidden and, with --train-weight, into weight.

    naive           log_softmax(hidden @ weight.T).gather(targets), masked sum     (spl.logprobs reference)
    torch_chunked   F.linear_cross_entropy(..., reduction="none", ignore_index=-100, options=
                    LinearCrossEntropyOptions(batch_chunk_size=--chunk-size)): torch's own chunked kernel
                    with our chunk size; "none" is the reduction that yields per-token values to sum per
                    sequence ("sum" and "mean" give one scalar, which a per-sequence loss cannot use)
    torch_chunked_auto   the same with torch's default options (64-token chunks here; about 2x slower on CPU)
    fused           spl.logprobs.sequence_logprobs (torch.compile'd chunks)
    fused_eager     the same with compile=False
    matmul          the floor: the projection's GEMMs alone (hidden @ weight.T, then [N, V] @ weight back to
                    [N, D], and with --train-weight [V, N] @ [N, D]), no softmax, no masking; a time
                    floor only (it holds the full [N, V] logits, so its memory column means nothing)

Memory on CPU: the resident-set high-water mark over the timed region. After a warm-up iteration (which
includes compilation), gc and glibc's malloc_trim(0) hand freed heap pages back to the OS so the baseline
RSS is live memory only; writing "5" to /proc/self/clear_refs resets VmHWM to it; after the timed
iterations, peak extra = VmHWM - baseline. The inputs live before the reset, their gradients do not.
Each method's process runs with MALLOC_MMAP_THRESHOLD_=131072 (glibc's initial threshold, held fixed; a
--method run re-executes itself with it set): every buffer of 128 KiB or more is then its own mapping,
returned to the OS when freed, so RSS follows live tensors. With glibc's default dynamic threshold
(--default-malloc), buffers of a few MB come from the heap and freed ones stay resident, which added a
run-to-run varying 0-60 MiB to the chunked methods' figures in our runs.
On CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was allocated then.
Time: median over --iters timed iterations (CUDA synchronised). Shared machines give noisy times.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from eval.bench.measure import measure  # noqa: E402
from spl.logprobs import DEFAULT_CHUNK_SIZE, naive_sequence_logprobs, sequence_logprobs  # noqa: E402

MMAP_THRESHOLD = "131072"  # bytes; see the docstring
METHODS = ["naive", "torch_chunked", "torch_chunked_auto", "fused", "fused_eager", "matmul"]


def make_inputs(args):
    """Seeded hidden [B, T, D] (requires grad), weight [V, D], targets [B, T], mask [B, T], upstream g [B]."""
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    shape = (args.batch, args.seq, args.dim)
    hidden = torch.randn(shape, generator=generator).to(device=args.device, dtype=dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.dim, generator=generator) / args.dim ** 0.5).to(args.device, dtype)
    weight.requires_grad_(args.train_weight)
    targets = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    prompt_lengths = (torch.rand(args.batch, generator=generator) * args.prompt_fraction * args.seq).long()
    mask = torch.arange(args.seq)[None, :] >= prompt_lengths[:, None]  # [B, T]: response after the prompt
    targets = targets.masked_fill(~mask, -100).to(args.device)
    upstream = torch.randn(args.batch, generator=generator).to(args.device)
    return hidden, weight, targets, mask.to(args.device), upstream


def step_function(method, args, hidden, weight, targets, mask, upstream):
    """-> a function running one forward + backward of `method`."""
    if method == "matmul":
        flat_hidden = hidden.detach().reshape(-1, args.dim)  # [N, D]

        def step():
            logits = flat_hidden @ weight.detach().T  # [N, V]
            grads = [logits @ weight.detach()]  # [N, D]: the backward GEMM into hidden
            if args.train_weight:
                grads.append(logits.T @ flat_hidden)  # [V, D]: the backward GEMM into weight
            return grads
        return step

    if method == "naive":
        def logps():
            return naive_sequence_logprobs(hidden, weight, targets, mask)
    elif method.startswith("torch_chunked"):
        options = (torch.nn.LinearCrossEntropyOptions() if method == "torch_chunked_auto" else
                   torch.nn.LinearCrossEntropyOptions(batch_chunk_size=args.chunk_size, chunking_method=None))

        def logps():
            losses = F.linear_cross_entropy(hidden.reshape(-1, args.dim), weight, targets.reshape(-1),
                                            reduction="none", ignore_index=-100, options=options)  # [N]
            return -losses.float().reshape(args.batch, args.seq).sum(-1)  # [B]; ignored tokens give 0
    else:
        compile = method == "fused"

        def logps():
            return sequence_logprobs(hidden, weight, targets, mask, chunk_size=args.chunk_size, compile=compile)

    def step():
        hidden.grad = weight.grad = None
        (logps() * upstream).sum().backward()
    return step


def run_one(args):
    """Time and measure one method in this process; -> dict."""
    torch.manual_seed(0)
    inputs = make_inputs(args)
    step = step_function(args.method, args, *inputs)
    hidden, weight = inputs[:2]

    def drop_gradients():
        hidden.grad = weight.grad = None  # the timed region's peak includes the gradients it produces

    result = measure(step, torch.device(args.device), args.iters, before_reset=drop_gradients)
    return {"method": args.method, "peak_extra_mb": result["peak_extra_mb"], "time_ms": result["time_ms"],
            "warmup_s": result["warmup_s"]}


def run_all(args):
    """Each method in a fresh subprocess (so no allocator or compile state leaks between them); print a table."""
    passthrough = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
                   if name not in ("method", "methods", "train_weight", "default_malloc")]
    passthrough += ["--train-weight"] * args.train_weight + ["--default-malloc"] * args.default_malloc
    results, load_before = [], os.getloadavg()[0]  # other processes on the machine skew the times
    for method in args.methods.split(","):
        command = [sys.executable, os.path.abspath(__file__), "--method", method, *passthrough]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            sys.exit(f"{method} failed:\n{completed.stderr}")
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    naive = next((r for r in results if r["method"] == "naive"), results[0])
    floor = next((r for r in results if r["method"] == "matmul"), None)
    print(f"B={args.batch} T={args.seq} D={args.dim} V={args.vocab} {args.dtype} on {args.device}, "
          f"prompt fraction {args.prompt_fraction}, weight {'trained' if args.train_weight else 'frozen'}, "
          f"chunk {args.chunk_size}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.iters}, load average before {load_before:.1f} after {os.getloadavg()[0]:.1f}, "
          f"{'default malloc' if args.default_malloc else 'MALLOC_MMAP_THRESHOLD_=131072'}")
    print(f"{'method':<19} {'peak extra MiB':>14} {'x naive':>8} {'time ms':>9} {'x naive':>8} {'x matmul':>8} "
          f"{'warm-up s':>10}")
    for r in results:
        versus_floor = f"{r['time_ms'] / floor['time_ms']:>8.3f}" if floor else f"{'-':>8}"
        print(f"{r['method']:<19} {r['peak_extra_mb']:>14.1f} {r['peak_extra_mb'] / naive['peak_extra_mb']:>8.3f} "
              f"{r['time_ms']:>9.1f} {r['time_ms'] / naive['time_ms']:>8.3f} {versus_floor} {r['warmup_s']:>10.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", choices=METHODS, help="run one method here and print JSON")
    parser.add_argument("--methods", default="naive,torch_chunked,fused,matmul",
                        help=f"comma-separated, run in this order, from {','.join(METHODS)}")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    parser.add_argument("--prompt-fraction", type=float, default=0.0,
                        help="mask out a random prompt of up to this fraction of each row (0: every token counts)")
    parser.add_argument("--train-weight", action="store_true", help="weight requires grad (full fine-tune)")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's dynamic mmap threshold in the method processes (see the docstring)")
    args = parser.parse_args()
    if args.method and not args.default_malloc and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD)  # glibc reads it at start-up
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], environment)
    if args.method:
        print(json.dumps(run_one(args)))
    else:
        run_all(args)


if __name__ == "__main__":
    main()
