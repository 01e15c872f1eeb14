"""Merge a LoRA adapter into its base model and write an HF checkpoint that keeps the base's tokenizer and chat format.

    python -m models.export --adapter runs/spl/adapter --out merged/          # base from the adapter's config
    python -m models.export --adapter runs/spl/adapter --model BASE --out merged/ --dtype bfloat16

The base model is `--model` (a directory, a .gguf file or a short name, as train.py takes it), else the adapter's
`base_model_name_or_path` (train.py writes the base it trained on there). The merged weights are
W0 + (lora_alpha / r) B A in every adapted projection (models.lora.merge_lora; a tied head that was adapted is
untied, so the merged model computes exactly what the adapted one did). The directory gets config.json,
model.safetensors and the base's tokenizer file with its tokenizer_config.json and chat_template.jinja
(models.checkpoint.copy_tokenizer), so sample.py, HF transformers and vLLM find the same chat format and stop
tokens as on the base. It is written atomically with a manifest; an existing --out is refused unless --overwrite,
and --overwrite replaces only a model directory this project wrote (one with its manifest), never other files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from models.checkpoint import CheckpointError, load_pretrained, save_pretrained
from models.files import read_manifest
from models.lora import AdapterError, merge_lora
from models.peft import adapter_base_model, load_adapter
from models.tokenizer import load_tokenizer


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that exists, unless --overwrite and it is a model directory this project wrote."""
    if not out.exists():
        return
    if not overwrite:
        raise CheckpointError(f"{out}: already exists; give --overwrite to replace a model directory written here")
    try:
        ours = out.is_dir() and read_manifest(out) is not None
    except ValueError:
        ours = False
    if not ours:
        raise CheckpointError(f"{out}: not a model directory written by this project (no manifest.json); "
                              f"refusing to replace it, choose another --out")


def export(adapter_dir, out, model=None, dtype=torch.float32, overwrite: bool = False) -> Path:
    """Merge `adapter_dir` into its base (`model`, or the one the adapter names) and write `out`."""
    from models.gguf import resolve_model  # the same names train.py's --model takes (a .gguf, smollm2)

    adapter_dir, out = Path(adapter_dir), Path(out)
    check_out(out, overwrite)
    base = Path(resolve_model(model)) if model else adapter_base_model(adapter_dir)
    _, tokenizer_path = load_tokenizer(base)  # before any work: a base without a tokenizer cannot be exported
    merged = merge_lora(load_adapter(load_pretrained(base, dtype=dtype), adapter_dir))
    return save_pretrained(merged, out, tokenizer_path=tokenizer_path, overwrite=overwrite)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a PEFT adapter directory (a run's OUT/adapter)")
    parser.add_argument("--model", help="the base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--out", required=True, help="the merged model directory to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the merged weights' dtype (the merge itself runs in it)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is a model directory "
                                                                 "this project wrote")
    args = parser.parse_args(argv)
    try:
        path = export(args.adapter, args.out, args.model, getattr(torch, args.dtype), args.overwrite)
    except (CheckpointError, AdapterError, ValueError, OSError) as error:
        print(f"models.export: error: {error}", file=sys.stderr)
        return 1
    print(f"merged model: {path} (HF format, with the base's tokenizer and chat template)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
