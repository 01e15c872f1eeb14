"""Peak memory of loading a checkpoint: `load_pretrained` against the naive way, each in a fresh process.

    python eval/bench/load.py                      # ~300 MB float32 checkpoint (74M parameters)
    python eval/bench/load.py --layers 8 --hidden 1024

A random model is saved once with our `save_pretrained` into a temporary directory. Each method then runs in
its own subprocess, which imports everything and pays one-time costs first (a tiny model built), reads its
resident set size (VmRSS in /proc/self/status), loads the checkpoint, reads every weight once (so weights that
are memory-mapped but not yet paged in are counted too), and reports its peak resident set size (VmHWM) minus
the RSS before loading. Methods:

    load_pretrained        models.load_pretrained(path): meta-device model, tensors assigned from safetensors
    load_pretrained bf16   the same with dtype=torch.bfloat16 (the stored float32 is converted tensor by tensor)
    naive                  build_model(config) with random init, then
                           model.load_state_dict(safetensors.torch.load_file(...)) (the weights twice at once)

The table prints each peak in MB, as a multiple of the weights' size on disk, and as a ratio to the naive peak;
the memory still resident after loading and how much of the process's RSS is file-backed (memory-mapped
weights); and the time to load and the time of the first read of every weight (where memory-mapped pages are
actually read from the page cache or disk, so the two times belong together).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

METHODS = ("load_pretrained", "load_pretrained bf16", "naive")
MB = 2**20


def proc_status_kb(field: str) -> int:
    """One `kB` field of /proc/self/status (VmRSS: resident now; VmHWM: peak resident; RssFile: file-backed)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (this benchmark needs Linux)")


def child(method: str, path: str) -> dict:
    """Runs in a fresh interpreter: load with `method`, return memory figures in bytes and the load time."""
    import torch
    from safetensors.torch import load_file

    from models import Mistral, MistralConfig, build_model, load_pretrained
    from models.checkpoint import hf_to_ours

    config = MistralConfig.from_json(Path(path) / "config.json")
    # Warm-up: building a first model under `torch.device("meta")` imports ~800 more modules (~70 MB, once per
    # process, whatever the model's size). Pay it, for every method alike, before the baseline, so that only
    # memory that scales with the weights is measured.
    tiny = dataclasses.replace(config, vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                               num_attention_heads=1, num_key_value_heads=1, head_dim=8)
    build_model(tiny)
    with torch.device("meta"):
        Mistral(tiny)
    rss_before = proc_status_kb("VmRSS")
    start = time.perf_counter()
    if method == "load_pretrained":
        model = load_pretrained(path)
    elif method == "load_pretrained bf16":
        model = load_pretrained(path, dtype=torch.bfloat16)
    elif method == "naive":
        model = build_model(config)
        state = {hf_to_ours(name): tensor for name, tensor in load_file(Path(path) / "model.safetensors").items()}
        model.load_state_dict(state)
        del state
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    seconds = time.perf_counter() - start
    with torch.no_grad():
        checksum = sum(float(p.float().sum()) for p in model.parameters())  # page in every weight
    first_read_seconds = time.perf_counter() - start - seconds
    return {"method": method, "peak_extra": (proc_status_kb("VmHWM") - rss_before) * 1024,
            "resident_extra": (proc_status_kb("VmRSS") - rss_before) * 1024,
            "file_backed": proc_status_kb("RssFile") * 1024, "seconds": seconds,
            "first_read_seconds": first_read_seconds, "checksum": checksum}


def measure(method: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", method, str(path)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{method}: child process failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return

    from models import MistralConfig, build_model, save_pretrained

    config = MistralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           num_key_value_heads=args.kv_heads, head_dim=args.hidden // args.heads, rms_norm_eps=1e-5,
                           rope_theta=1e6, sliding_window=4096, tie_word_embeddings=False,
                           max_position_embeddings=32768)
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        model = build_model(config, seed=0)
        parameters = model.num_parameters()
        path = save_pretrained(model, Path(tmp) / "checkpoint")
        del model
        on_disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        results = {method: measure(method, path) for method in METHODS}

    checksums = {round(r["checksum"], 1) for name, r in results.items() if "bf16" not in name}
    if len(checksums) != 1:
        raise RuntimeError(f"methods loaded different weights: {checksums}")
    naive_peak = results["naive"]["peak_extra"]
    print(f"checkpoint: {parameters / 1e6:.1f}M parameters, float32, {on_disk / MB:.0f} MB on disk "
          f"(vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers)")
    print(f"{'method':<22}{'peak extra MB':>14}{'x disk':>8}{'x naive':>9}{'resident MB':>13}"
          f"{'file-backed MB':>16}{'load s':>8}{'1st read s':>11}")
    for method, r in results.items():
        print(f"{method:<22}{r['peak_extra'] / MB:>14.0f}{r['peak_extra'] / on_disk:>8.2f}"
              f"{r['peak_extra'] / naive_peak:>9.2f}{r['resident_extra'] / MB:>13.0f}{r['file_backed'] / MB:>16.0f}"
              f"{r['seconds']:>8.2f}{r['first_read_seconds']:>11.2f}")


if __name__ == "__main__":
    main()
