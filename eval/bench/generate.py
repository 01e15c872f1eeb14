"""Generation speed: `models.generate.generate` against HF transformers' `generate` on the same checkpoint.

    python eval/bench/generate.py                      # N = 16 samples x 128 new tokens, the world model's shape
    python eval/bench/generate.py --threads 1 --repeats 5   # one thread only
    python eval/bench/generate.py --busy 1               # the same while another CPU-bound job runs
    python eval/bench/generate.py --model smollm2 --threads 1   # the real SmolLM2-135M-Instruct, a chat prompt
    python eval/bench/generate.py --model smollm2 --threads 1 --lora 16   # a policy under training: online SPL

Both methods run at torch's default thread count and at one thread (--threads N: only at N). With --busy K,
K competing processes (each a one-thread matmul loop, like another job on the machine) run during every timed
call: on a two-core machine that is the case where intra-op threads lose most, since each op's thread barrier
waits for a core the other job holds (the reason sample.py, like train.py, takes one thread for a small model).

A random Mistral of the embedded world's reference-model shape (vocab 2000, hidden 192, 4 layers, 6 heads,
2 KV heads, head_dim 32, FFN 512) is built by HF transformers and saved to a temporary directory; ours loads the
same files. Both sample N completions of one prompt at temperature 1 with no filter and no EOS stop (ours:
eos_id=None; HF: min_new_tokens = max_new_tokens, so EOS cannot end a row early), so both produce exactly
N x max_new_tokens tokens. Each method runs once to warm up, then `--repeats` times, the methods taking turns (the
machine's speed drifts over minutes); the table gives the median wall time, tokens/s (N x max_new_tokens / time)
and the speed ratio against HF. CPU, float32.

With --model (a directory, a .gguf file or smollm2, as sample.py takes it: models/gguf.py resolve_model), both
load that checkpoint instead (HF through AutoModelForCausalLM on the same directory), and the prompt is a user turn
in the checkpoint's chat format ("Write a short story about a lighthouse keeper.", encoded by our tokenizer, as
sample.py encodes it); the same no-EOS rule holds, so both still produce exactly N x max_new_tokens tokens.

What differs between the two: ours prefills the prompt once and repeats its KV cache N times, and decodes into a
preallocated cache; HF expands the prompt to N rows (num_return_sequences) and grows a DynamicCache. Ours draws
each token by inverting the CDF (one uniform per row), HF with torch.multinomial (one exponential per vocabulary
entry: at V = 49152 and one thread, 16% of our decoding time before we changed it, docs/speed.md).
With --lora R both models carry the same live LoRA adapter (rank R, lora_alpha R, all seven projections, B drawn
at random so the branch changes the output), unmerged, as a policy is while it trains; ours gets it from
models/lora.py, HF's model through peft (`PeftModel.from_pretrained` on the adapter ours writes, models/peft.py),
and the two prompts' next-token logits are compared before anything is timed. A third method then runs: online
SPL's sampler (`spl.online.sample_rollouts`, what `train.py --loss spl-online` calls each step: the K = N samples
of one prompt with their sequence log-probs, EOS ignored here as above). HF's side is what TRL's online trainers
do without vLLM: `generate` on the peft-wrapped policy.
Timings on a shared machine vary with its load; compare ratios from the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere
# torch, transformers and our models are imported inside the functions that use them: --help answers without
# loading torch, and transformers (a benchmark-only dependency) is imported only to build the HF checkpoint.

WORLD_SHAPE = dict(vocab_size=2000, hidden_size=192, num_hidden_layers=4, num_attention_heads=6,
                   num_key_value_heads=2, head_dim=32, intermediate_size=512)


def build_checkpoint(directory: Path, seed: int = 0):
    """A random HF MistralForCausalLM of the world model's shape, saved with HF's save_pretrained."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.MistralConfig(**WORLD_SHAPE, sliding_window=None, max_position_embeddings=1024,
                                        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=1,
                                        eos_token_id=2)
    model = transformers.MistralForCausalLM(config).float().eval()
    model.save_pretrained(directory)
    return model


def load_real(name, dtype, device):
    """(HF model, our model, prompt ids) for a real checkpoint: the directory resolve_model gives sample.py, read
    by both; the prompt a user turn in its chat format."""
    import transformers

    from models import load_pretrained
    from models.gguf import resolve_model
    from models.tokenizer import load_tokenizer

    directory = resolve_model(name)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    ours = load_pretrained(directory, dtype=dtype, device=device).eval()
    tokenizer, _ = load_tokenizer(directory)
    prompt = tokenizer.encode_prompt([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
    return hf_model, ours, prompt


def attach_lora(hf_model, ours, rank: int, directory: Path, seed: int = 0):
    """The same live LoRA adapter on both models -> HF's model wrapped by peft (ours is changed in place). Ours:
    models/lora.py on the seven projections, lora_alpha = rank, B drawn at random (std 0.02) so the branch is not
    zero; written in PEFT format (models/peft.py) to `directory` and read from there by peft onto HF's model."""
    import peft
    import torch

    from models.lora import TARGET_NAMES, add_lora, lora_modules
    from models.peft import save_adapter

    add_lora(ours, rank, float(rank), targets=TARGET_NAMES)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(ours).values():
            weight = module.lora_B.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
    ours.eval()
    save_adapter(ours, directory)
    hf_lora = peft.PeftModel.from_pretrained(hf_model, directory).eval()
    return hf_lora


def next_token_difference(hf_model, ours, prompt: list[int]) -> float:
    """max |ours - HF| / max |HF| over the prompt's next-token logits: the two must be the same function."""
    import torch

    device = ours.embed_tokens.weight.device
    with torch.no_grad():
        ids = torch.tensor([prompt], device=device)
        hf_logits = hf_model(input_ids=ids).logits[0, -1].float()
        our_logits = ours(ids)[0, -1].float()
    return float((our_logits - hf_logits).abs().max() / hf_logits.abs().max())


def time_runs(functions: dict, repeats: int) -> dict:
    """{name: (wall seconds, CPU seconds)} of `repeats` calls of each function after one warm-up call each, the
    functions taking turns (one call of each per round), so a drift in the machine's speed over the minutes of a
    run falls on every method alike. The CPU time (all the process's threads) is the steadier figure on a machine
    shared with other jobs, where a one-thread process waits for a core for part of its wall time."""
    for function in functions.values():
        function()  # warm-up: first-call allocations and kernel selection
    times = {name: ([], []) for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            function()
            times[name][0].append(time.perf_counter() - started)
            times[name][1].append(time.process_time() - started_cpu)
    return times


BUSY_LOOP = "import torch\ntorch.set_num_threads(1)\na = torch.randn(384, 384)\nwhile True:\n    a = (a @ a).tanh()\n"


@contextlib.contextmanager
def busy_machine(processes: int):
    """`processes` competing one-thread matmul loops for the duration of the block (none for 0)."""
    jobs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(processes)]
    try:
        if jobs:
            time.sleep(3)  # let them import torch and start spinning
        yield
    finally:
        for job in jobs:
            job.kill()
            job.wait()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--num-samples", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: both torch's choice and one thread)")
    p.add_argument("--busy", type=int, default=0, help="competing one-thread CPU jobs during the timed runs")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both models there; times CUDA-synchronised)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="both models' weights")
    p.add_argument("--model", help="a real checkpoint (directory, .gguf file or smollm2) instead of the random one")
    p.add_argument("--lora", type=int, default=0, metavar="R",
                   help="both models carry the same live LoRA of rank R (unmerged), and online SPL's sampler runs too")
    p.add_argument("--json", action="store_true", help="also print one JSON line of the medians")
    args = p.parse_args(argv)

    import torch

    from models import load_pretrained
    from models.generate import generate

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    thread_counts = [args.threads] if args.threads else sorted({torch.get_num_threads(), 1}, reverse=True)
    n, new = args.num_samples, args.max_new_tokens
    if args.model:
        hf_model, ours, prompt = load_real(args.model, dtype, device)
    else:
        prompt = torch.randint(3, WORLD_SHAPE["vocab_size"], (args.prompt_length,),
                               generator=torch.Generator().manual_seed(0)).tolist()
        with tempfile.TemporaryDirectory() as tmp:
            hf_model = build_checkpoint(Path(tmp) / "model").to(device, dtype)
            ours = load_pretrained(Path(tmp) / "model", dtype=dtype, device=device).eval()

    difference = None
    if args.lora:
        adapter_dir = tempfile.TemporaryDirectory()
        hf_model = attach_lora(hf_model, ours, args.lora, Path(adapter_dir.name) / "adapter")
        difference = next_token_difference(hf_model, ours, prompt)
        print(f"LoRA r = {args.lora} on both: next-token logits differ by {difference:.1e} of their largest")
        tolerance = 1e-4 if dtype == torch.float32 else 5e-2  # bf16: each side rounds its activations its own way
        if difference > tolerance:
            raise SystemExit(f"generate bench: the two models with the adapter are not the same function "
                             f"({difference:.1e} > {tolerance:g})")

    def synchronised(function):  # CUDA runs asynchronously: a timed call ends when the device is done
        def run():
            function()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return run

    def run_ours():
        out = generate(ours, prompt, max_new_tokens=new, num_samples=n, temperature=1.0, eos_id=None,
                       generator=torch.Generator(device=device).manual_seed(1))
        assert all(len(t) == new for t in out.tokens)

    def run_online():
        from spl.online import sample_rollouts
        rollouts = sample_rollouts(ours, [prompt], n, new, eos_id=None,
                                   generator=torch.Generator(device=device).manual_seed(1))
        assert all(len(t) == new for t in rollouts.completions[0])

    input_ids = torch.tensor([prompt], device=device)
    attention_mask = torch.ones_like(input_ids)

    def run_hf():
        torch.manual_seed(1)
        with torch.no_grad():
            out = hf_model.generate(input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0,
                                    top_k=0, top_p=1.0, num_return_sequences=n, max_new_tokens=new,
                                    min_new_tokens=new, pad_token_id=0)
        assert out.shape == (n, len(prompt) + new)

    results = {}  # (threads, method) -> times
    with busy_machine(args.busy):
        for threads in thread_counts:
            torch.set_num_threads(threads)
            methods = {"ours (models.generate)": run_ours, "online SPL's sampler": run_online,
                       "HF transformers generate": run_hf}
            if not args.lora:
                del methods["online SPL's sampler"]
            timed = time_runs({name: synchronised(run) for name, run in methods.items()}, args.repeats)
            results |= {(threads, name): times for name, times in timed.items()}

    tokens = n * new
    print(f"{args.model or 'random world-shape Mistral'}: "
          f"N = {n} samples x {new} new tokens, prompt {len(prompt)} tokens, torch {torch.__version__}, "
          f"{device} {args.dtype}, median of {args.repeats}; {args.busy} competing CPU job(s) running"
          + (f"; LoRA r = {args.lora} unmerged on both (HF: peft)" if args.lora else ""))
    print(f"{'threads':>7} {'method':<26} {'wall s':>8} {'CPU s':>8} {'tokens/s':>9} {'per CPU s':>10} "
          f"{'speed vs HF (wall, CPU)':>24}")
    medians = {key: (statistics.median(wall), statistics.median(cpu)) for key, (wall, cpu) in results.items()}
    for (threads, name), (wall, cpu) in medians.items():
        hf_wall, hf_cpu = medians[threads, "HF transformers generate"]
        print(f"{threads:>7} {name:<26} {wall:>8.3f} {cpu:>8.3f} {tokens / wall:>9.0f} {tokens / cpu:>10.0f} "
              f"{hf_wall / wall:>15.2f}x {hf_cpu / cpu:>6.2f}x")
    if len(thread_counts) > 1:
        ours = {t: medians[t, "ours (models.generate)"][0] for t in thread_counts}
        print(f"ours: {thread_counts[0]} threads take {ours[thread_counts[0]] / ours[1]:.2f}x the time of one thread")
    if args.json:
        record = {}
        for (threads, name), (wall, cpu) in medians.items():
            method = {"ours": "ours", "online": "online", "HF": "hf"}[name.split()[0]]
            record[f"{method}_tokens_per_s_{threads}_threads"] = tokens / wall
            record[f"{method}_tokens_per_cpu_s_{threads}_threads"] = tokens / cpu
        print(json.dumps(record | {"device": str(device), "dtype": args.dtype, "model": args.model, "lora": args.lora,
                                   "logits_difference": difference}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
