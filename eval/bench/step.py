"""Benchmark: one LoRA SPL training step, at Mistral-7B's shape on a GPU, or against HF transformers + peft.

    python eval/bench/step.py                                   # Mistral-7B shape, bf16, CUDA: tokens/s, memory, MFU
    python eval/bench/step.py --device cpu --scale 0.0625       # the same step scaled down (CI smoke test)
    python eval/bench/step.py --compare-hf                      # CPU: ours vs HF transformers + peft, same batch
    python eval/bench/step.py --side ours --checkpoint DIR ...  # one side in this process, one JSON line

The step: the policy's forward pass over 4 pairs (8 rows of prompt + response, 1024 tokens each), the SPL loss
(Eq. 5) against reference log-probs computed beforehand (LoRA off), backward into the LoRA parameters (r = 16
on all seven projections, float32), clipping and one AdamW step. Random weights (std 0.02), built on the
device in the weights' dtype; the first `--prompt` tokens of each row are the prompt (no loss).

Model FLOPs of one step (a multiply-add is 2 FLOPs; recomputation by --grad-checkpointing is not counted),
with N = 2 x pairs x seq tokens and S = 2 x pairs x (seq - prompt) response tokens:

    frozen projections, P = D (H hd) + 2 D (KV hd) + (H hd) D + 3 D F per layer:
        forward 2 P N, backward 2 P N (the input gradient only: the weights are frozen)
    LoRA, per projection (in, out): forward 2 r (in + out) N, backward 4 r (in + out) N (input, A and B)
    less, in layer 0, the input gradients of q, k and v (frozen and LoRA): the embeddings need none
    attention, causal (half of the T x T scores), per layer and row: forward 2 T^2 H hd, backward twice that
    output head on the S response tokens (spl/logprobs.py): logits 2 V D S, their gradient into h 2 V D S

MFU = model FLOPs / step time / the bf16 (or --dtype) matmul rate measured here on the same device
(n x n x n products, --matmul-size, in the three layouts a linear layer uses; the fastest), not the datasheet peak.
--profile ROWS profiles one more step (torch.profiler): its top operators by self CPU time and the step's time by
group (matmul, attention, casts and copies, optimizer, allocation, elementwise).

Memory: on CUDA, peak = torch.cuda.max_memory_allocated over the timed steps (weights included), peak extra =
peak minus what was allocated before them (weights, optimizer state, batch). On CPU, as in
eval/bench/logprobs.py: after a warm-up step, gc and malloc_trim(0), VmHWM is reset to VmRSS through
/proc/self/clear_refs, and peak extra = VmHWM after the timed steps - that baseline.

--compare-hf (the DESIGN target: faster, with at most 40% of HF's peak extra memory) writes one random
checkpoint, then runs each side in its own subprocess on the same batch: ours (Mistral + LoRALinear + the fused
log-probs), and HF's MistralForCausalLM (sdpa attention) + peft LoRA with the same r, alpha and targets, the
sequence log-probs taken with log_softmax over the full logits as TRL does. Both start from the same weights
with B = 0, so their first losses must agree (printed). HF and peft are imported only on that path.
Both subprocesses run with MALLOC_MMAP_THRESHOLD_=65536: every buffer above 64 KiB gets its own mapping, returned
to the OS when freed, so VmHWM follows the live tensors, as max_memory_allocated does on CUDA. With glibc's
default (a dynamic threshold that rises to the size of freed buffers, after which activations freed in one
step stay in the heap) VmHWM also counts that retention, on both sides; --glibc-heap measures that way.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
from models import Mistral, MistralConfig, add_lora, build_model, load_pretrained, save_pretrained  # noqa: E402
from models.lora import TARGET_NAMES  # noqa: E402
from spl.step import Objective, preference_step, reference_logprobs  # noqa: E402
from eval.bench.measure import measure  # noqa: E402

ALPHA, BETA, CHOSEN_PROB = 0.2, 0.1, 0.75


@dataclass(frozen=True)
class Shape:
    """The model and batch of one step; the defaults are Mistral-7B's and the issue's batch."""
    dim: int = 4096
    layers: int = 32
    ffn: int = 14336
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 32000
    rank: int = 16
    pairs: int = 4
    seq: int = 1024
    prompt: int = 256

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def config(self) -> MistralConfig:
        return MistralConfig(vocab_size=self.vocab, hidden_size=self.dim, intermediate_size=self.ffn,
                             num_hidden_layers=self.layers, num_attention_heads=self.heads,
                             num_key_value_heads=self.kv_heads, head_dim=self.head_dim, rms_norm_eps=1e-5,
                             rope_theta=1e6, sliding_window=None, tie_word_embeddings=False,
                             max_position_embeddings=max(self.seq, 32768))

    def scaled(self, s: float) -> "Shape":
        """Heads, FFN, layers and sequence times s (head_dim, vocab, rank and pairs kept): a small model of the
        same proportions."""
        heads = max(1, round(self.heads * s))
        kv_heads = max(1, min(heads, round(self.kv_heads * s)))
        while heads % kv_heads:
            kv_heads -= 1
        seq = max(8, round(self.seq * s))
        return replace(self, dim=heads * self.head_dim, heads=heads, kv_heads=kv_heads, ffn=max(8, round(self.ffn * s)),
                       layers=max(1, round(self.layers * s)), seq=seq, prompt=min(seq - 2, round(self.prompt * s)))


COMPARE_SHAPE = Shape(dim=512, layers=4, ffn=1792, heads=8, kv_heads=2, vocab=32000, rank=16, pairs=4, seq=512,
                      prompt=128)


def step_flops(shape: Shape) -> dict:
    """Model FLOPs of one LoRA SPL step, by part (see the module docstring); "total" sums them."""
    D, hd, H, KV, F_, V, r = shape.dim, shape.head_dim, shape.heads, shape.kv_heads, shape.ffn, shape.vocab, shape.rank
    rows, T = 2 * shape.pairs, shape.seq
    N, S = rows * T, rows * (T - shape.prompt)
    projections = [(D, H * hd), (D, KV * hd), (D, KV * hd), (H * hd, D), (D, F_), (D, F_), (F_, D)]  # q k v o gate up down
    P = sum(i * o for i, o in projections)
    qkv = projections[:3]
    frozen = shape.layers * (2 * P * N + 2 * P * N) - sum(2 * i * o * N for i, o in qkv)
    lora = shape.layers * sum(6 * r * (i + o) * N for i, o in projections) - sum(2 * r * i * N for i, o in qkv)
    attention = shape.layers * rows * 3 * (2 * T * T * H * hd)  # forward 2 T^2 H hd (causal half), backward 2x
    head = 2 * V * D * S + 2 * V * D * S
    return {"frozen": frozen, "lora": lora, "attention": attention, "head": head,
            "total": frozen + lora + attention + head}


def make_batch(shape: Shape, device) -> dict:
    """Seeded token ids [2P, T] (rows 0..P-1 chosen, P..2P-1 rejected, as data/batching.py), every row full length;
    the loss covers the targets after the prompt."""
    generator = torch.Generator().manual_seed(0)
    rows = 2 * shape.pairs
    input_ids = torch.randint(3, shape.vocab, (rows, shape.seq), generator=generator)  # [2P, T]
    targets = torch.roll(input_ids, -1, dims=1)  # [2P, T]: position t predicts token t + 1
    positions = torch.arange(shape.seq)
    loss_mask = ((positions >= shape.prompt - 1) & (positions < shape.seq - 1)).expand(rows, -1)  # [2P, T]
    batch = {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask.contiguous(),
             "attention_mask": torch.ones(rows, shape.seq, dtype=torch.bool),
             "chosen_prob": torch.full((shape.pairs,), CHOSEN_PROB), "pair_index": torch.arange(shape.pairs)}
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------------ the two sides

def build_ours(shape: Shape, dtype, device, checkpoint=None) -> Mistral:
    """Our model with LoRA on all seven projections: from `checkpoint`, or random weights made on `device` in
    `dtype` directly (built on the meta device, then allocated there: no float32 or CPU copy of 7B)."""
    torch.manual_seed(0)
    if checkpoint:
        model = load_pretrained(checkpoint, dtype=dtype, device=device)
    else:
        with torch.device("meta"):
            model = Mistral(shape.config())
        model = model.to(dtype=dtype).to_empty(device=device).init_weights()
    return add_lora(model, shape.rank, float(shape.rank), 0.0, TARGET_NAMES)


def ours_step(shape: Shape, dtype, device, checkpoint, grad_checkpointing: bool, compile):
    """-> step() for our implementation: the fused log-probs and preference_step of spl/step.py."""
    model = build_ours(shape, dtype, device, checkpoint)
    model.gradient_checkpointing = grad_checkpointing
    batch = make_batch(shape, device)
    ref_chosen, ref_rejected = reference_logprobs(model, batch, compile=compile)  # precomputed, LoRA off
    objective = Objective("spl", alpha=ALPHA, beta=BETA)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    model.train()

    def step():
        loss, _, _ = preference_step(model, batch, ref_chosen, ref_rejected, objective, compile=compile)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def hf_step(shape: Shape, dtype, device, checkpoint, grad_checkpointing: bool, compile):
    """-> step() for HF transformers + peft, the way a TRL DPO trainer computes it: full logits [2P, T, V],
    log_softmax, gather the targets, masked sum; the SPL loss written out (Eq. 5 with soft labels)."""
    import peft
    import transformers

    model = transformers.MistralForCausalLM.from_pretrained(checkpoint, dtype=dtype, attn_implementation="sdpa")
    model = model.to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(r=shape.rank, lora_alpha=shape.rank, lora_dropout=0.0,
                                                       target_modules=list(TARGET_NAMES), bias="none"))
    if grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = make_batch(shape, device)
    pairs = shape.pairs

    def sequence_logps():
        logits = model(input_ids=batch["input_ids"]).logits.float()  # [2P, T, V]
        token_logps = logits.log_softmax(-1).gather(-1, batch["targets"][..., None]).squeeze(-1)  # [2P, T]
        return (token_logps * batch["loss_mask"]).sum(-1)  # [2P]

    with torch.no_grad(), model.disable_adapter():
        reference = sequence_logps()  # [2P], precomputed
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    model.train()
    q = batch["chosen_prob"]

    def step():
        policy = sequence_logps()  # [2P]
        z = ALPHA * (policy[:pairs] - policy[pairs:]) - BETA * (reference[:pairs] - reference[pairs:])  # Eq. 5
        loss = -(q * F.logsigmoid(z) + (1 - q) * F.logsigmoid(-z)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


# ------------------------------------------------------------------------------------------------------ measurement

# The three products a linear layer y = x W^T runs: forward x @ W^T, input gradient g @ W, weight gradient g^T @ x.
# On a CPU without bfloat16 matrix units (no AVX512-BF16 or AMX) their bf16 rates differ by 15x (this project's AMD
# EPYC, one thread: a @ b 0.9, a @ b.T 9.4, a.T @ b 14.7 GFLOP/s; float32 about 70 in every layout), so one layout
# alone does not say what the hardware can do; the MFU is taken against the fastest.
LAYOUTS = {"a @ b": lambda a, b: a @ b, "a @ b.T": lambda a, b: a @ b.T, "a.T @ b": lambda a, b: a.T @ b}


def matmul_rates(device, dtype, n: int, iters: int = 10) -> dict:
    """{layout: measured FLOP/s} of n x n x n products in `dtype` on `device` (median of `iters` each)."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device, dtype)
    b = torch.randn(n, n, generator=generator).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if device.type == "cuda" else time.process_time  # see run_side on CPU time
    rates = {}
    for name, product in LAYOUTS.items():
        for _ in range(2):
            product(a, b)
        sync()
        times = []
        for _ in range(iters):
            start = clock()
            product(a, b)
            sync()
            times.append(clock() - start)
        rates[name] = 2 * n ** 3 / statistics.median(times)
    return rates


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


# Where a step's time goes: torch.profiler's self CPU time per operator, put into the groups below (matched on the
# operator's name; the first group that matches wins). "matmul" is the GEMMs (the model FLOPs); everything else is
# the rest of the step the issue asks about.
PROFILE_GROUPS = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::matmul")),
    ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention")),
    ("casts and copies", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous",
                          "aten::cat", "aten::index_select", "aten::index_copy", "aten::gather", "aten::scatter")),
    ("optimizer", ("Optimizer.step", "aten::_foreach", "aten::addcdiv", "aten::addcmul", "aten::lerp",
                   "aten::sqrt", "aten::norm", "aten::linalg_vector_norm", "aten::_fused_adam")),
    ("allocation", ("aten::empty", "aten::zeros", "aten::zero_", "aten::fill_", "aten::new_", "aten::resize_")),
    ("elementwise", ("aten::",)),
)


def profile_step(step, rows: int = 25) -> dict:
    """One step under torch.profiler (after the timed steps): the top `rows` operators by self CPU time, printed,
    and {group: share of the step's self CPU time} by PROFILE_GROUPS."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    groups = dict.fromkeys([name for name, _ in PROFILE_GROUPS] + ["other"], 0.0)
    for event in events:
        group = next((name for name, keys in PROFILE_GROUPS if any(event.key.startswith(k) or k in event.key
                                                                     for k in keys)), "other")
        groups[group] += event.self_cpu_time_total
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))
    shares = {name: seconds / total for name, seconds in groups.items()}
    print("  self CPU time by group: " + ", ".join(f"{name} {100 * share:.1f}%" for name, share in shares.items()))
    return shares


def run_side(args, shape: Shape) -> dict:
    """One side in this process -> its JSON record."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    make = ours_step if args.side == "ours" else hf_step
    compile = {"auto": None, "on": True, "off": False}[args.compile]
    step = make(shape, dtype, device, args.checkpoint, args.grad_checkpointing, compile)
    cpu_times = []

    def timed_step():  # the step's CPU time beside measure's wall time
        start = time.process_time()
        out = step()
        cpu_times.append(time.process_time() - start)
        return out
    result = measure(timed_step, device, args.iters)
    # On CPU the rates are per CPU second: a one-thread process on a machine shared with other jobs waits for a core
    # for part of its wall time, differently in every run, while its CPU time (and so the ratio of the step to the
    # matmul rate, both measured that way) barely moves. On CUDA, wall time (synchronised).
    result["cpu_time_ms"] = 1000 * statistics.median(cpu_times[1:])  # the timed steps, not the warm-up
    seconds = result["time_ms" if device.type == "cuda" else "cpu_time_ms"] / 1000
    tokens = 2 * shape.pairs * shape.seq
    flops = step_flops(shape)["total"]
    record = {"side": args.side, "device": device_name(device), "dtype": args.dtype, **asdict(shape),
              "grad_checkpointing": args.grad_checkpointing, "tokens": tokens, **result,
              "tokens_per_s": tokens / seconds, "model_tflops": flops / 1e12,
              "achieved_tflops_per_s": flops / seconds / 1e12}
    if args.matmul_size:
        rates = matmul_rates(device, dtype, args.matmul_size, iters=3 if device.type == "cpu" else 10)
        rate = max(rates.values())
        record |= {"matmul_tflops_per_s": rate / 1e12, "mfu": record["achieved_tflops_per_s"] * 1e12 / rate,
                   "matmul_tflops_per_s_by_layout": {name: r / 1e12 for name, r in rates.items()}}
    if args.profile:
        record["profile"] = profile_step(step, args.profile)
    return record


def print_record(r: dict) -> None:
    print(f"{r['side']}: one LoRA SPL step, D={r['dim']} L={r['layers']} F={r['ffn']} H={r['heads']}/{r['kv_heads']} "
          f"V={r['vocab']} r={r['rank']}, {r['pairs']} pairs x {r['seq']} tokens, {r['dtype']}"
          f"{', grad checkpointing' if r['grad_checkpointing'] else ''}, on {r['device']}, torch {torch.__version__}")
    print(f"  step {r['time_ms']:.1f} ms (median; CPU time {r['cpu_time_ms']:.1f} ms), {r['tokens_per_s']:.0f} "
          f"tokens/s{' per CPU second' if r['device'].startswith('CPU') else ''}, peak memory "
          f"{r['peak_mb'] / 1024:.2f} GiB (extra over weights and state {r['peak_extra_mb'] / 1024:.2f} GiB)")
    if "mfu" in r:
        print(f"  {r['model_tflops']:.4g} TFLOP/step -> {r['achieved_tflops_per_s']:.4g} TFLOP/s; measured "
              f"{r['dtype']} matmul {r['matmul_tflops_per_s']:.4g} TFLOP/s (fastest of "
              + ", ".join(f"{k} {v:.3g}" for k, v in r["matmul_tflops_per_s_by_layout"].items())
              + f"); MFU {100 * r['mfu']:.1f}%")


def compare_hf(args, shape: Shape) -> None:
    """Write one random checkpoint, run each side in a fresh subprocess on it, print a table of ratios."""
    with tempfile.TemporaryDirectory(prefix="bench_step_") as directory:
        checkpoint = os.path.join(directory, "model")
        save_pretrained(build_model(shape.config(), dtype=getattr(torch, args.dtype), seed=0), checkpoint)
        shape_flags = [f"--{name.replace('_', '-')}={value}" for name, value in asdict(shape).items()]
        common = [f"--device={args.device}", f"--dtype={args.dtype}", f"--iters={args.iters}",
                  f"--compile={args.compile}", "--matmul-size=0", f"--checkpoint={checkpoint}", *shape_flags]
        common += ["--grad-checkpointing"] if args.grad_checkpointing else []
        env = dict(os.environ) if args.glibc_heap else dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        results = {}
        for side in ("hf", "ours"):
            command = [sys.executable, os.path.abspath(__file__), "--side", side, *common]
            completed = subprocess.run(command, capture_output=True, text=True, env=env)
            if completed.returncode != 0:
                sys.exit(f"{side} failed:\n{completed.stderr[-4000:]}")
            results[side] = json.loads(completed.stdout.strip().splitlines()[-1])
    hf, ours = results["hf"], results["ours"]
    print(f"one LoRA SPL step (forward, backward, AdamW), D={shape.dim} L={shape.layers} F={shape.ffn} "
          f"H={shape.heads}/{shape.kv_heads} V={shape.vocab} r={shape.rank}, {shape.pairs} pairs x {shape.seq} tokens, "
          f"{args.dtype} on {hf['device']}, torch {torch.__version__}, median of {args.iters}, "
          f"{'glibc default heap' if args.glibc_heap else 'live memory (MALLOC_MMAP_THRESHOLD_=65536)'}")
    print(f"{'side':<22} {'step ms':>9} {'tokens/s':>9} {'peak extra MB':>14} {'first loss':>11}")
    for name, r in (("HF transformers + peft", hf), ("ours", ours)):
        print(f"{name:<22} {r['time_ms']:>9.1f} {r['tokens_per_s']:>9.0f} {r['peak_extra_mb']:>14.1f} "
              f"{r['first_loss']:>11.6f}")
    print(f"ours / HF: time {ours['time_ms'] / hf['time_ms']:.3f}, peak extra memory "
          f"{ours['peak_extra_mb'] / hf['peak_extra_mb']:.3f} (target: < 1 and <= 0.40)")
    print(json.dumps({"hf": hf, "ours": ours}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compare-hf", action="store_true", help="ours vs HF transformers + peft (subprocesses)")
    parser.add_argument("--side", choices=("ours", "hf"), help="run one side here and print one JSON line")
    parser.add_argument("--checkpoint", help="HF-format model directory (--side hf needs one)")
    parser.add_argument("--device", default=None, help="default: cuda if available (cpu for --compare-hf)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                        help="default: bfloat16 (float32 for --compare-hf)")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the shape's heads, FFN, layers, sequence")
    for name, value in asdict(Shape()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            help=f"default {value} (Mistral-7B; --compare-hf: {getattr(COMPARE_SHAPE, name)})")
    parser.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the fused log-prob chunks (ours)")
    parser.add_argument("--glibc-heap", action="store_true",
                        help="--compare-hf: keep glibc's default heap (see the docstring) instead of a fixed "
                             "mmap threshold")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="after timing, profile one more step: its top ROWS operators and time by group")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="n of the n x n x n matmul that measures the peak rate (default 8192 on CUDA, 2048 on "
                             "CPU; 0: skip MFU)")
    args = parser.parse_args(argv)

    base = COMPARE_SHAPE if args.compare_hf else Shape()
    shape = base.scaled(args.scale) if args.scale != 1.0 else base
    shape = replace(shape, **{name: getattr(args, name) for name in asdict(shape) if getattr(args, name) is not None})
    if not 0 <= shape.prompt < shape.seq - 1 or shape.dim % shape.heads or shape.heads % shape.kv_heads:
        parser.error(f"inconsistent shape {shape}: need prompt < seq - 1, heads | dim, kv_heads | heads")
    default_device = "cpu" if args.compare_hf or not torch.cuda.is_available() else "cuda"
    args.device = args.device or default_device
    args.dtype = args.dtype or ("float32" if args.compare_hf else "bfloat16")
    if args.matmul_size is None:
        args.matmul_size = 8192 if args.device.startswith("cuda") else 2048
    if args.compare_hf:
        return compare_hf(args, shape)
    if args.side == "hf" and not args.checkpoint:
        parser.error("--side hf needs --checkpoint (HF builds its model from a directory)")
    args.side = args.side or "ours"
    try:
        record = run_side(args, shape)
    except torch.cuda.OutOfMemoryError as error:
        sys.exit(f"bench_step.py: out of GPU memory at {shape} ({str(error).splitlines()[0]}); "
                 f"try --grad-checkpointing or a smaller --pairs/--seq")
    if args.checkpoint or args.side == "hf":
        print(json.dumps(record))  # the subprocess protocol of --compare-hf: one JSON line
    else:
        print_record(record)
        print(json.dumps(record))


if __name__ == "__main__":
    main()
