"""Write the embedded world and train its tokenizer: `python -m data.world.build --out data/world [--seed S]`;
with `--train-model`, also train its reference model from scratch (`--out/model`, in HF format); with
`--train-arithmetic-model`, the arithmetic reference model of the best-of-N experiment (`--out/arithmetic_model`).

The files are data/world/__init__.py's `world_files(generate_world(seed, k, k_other))`, byte for byte, plus
`tokenizer.model`: a sentencepiece BPE model trained on the world's SFT text with Mistral's conventions

    unk 0 "<unk>", bos 1 "<s>", eos 2 "</s>", no pad; byte_fallback (any UTF-8 text round-trips, a newline is
    the byte piece <0x0A>, as in Mistral's tokenizer); digits split one per piece; identity normalisation with
    whitespace kept, so decode(encode(text)) == text; "[INST]" and "[/INST]" one piece each (user-defined
    symbols "▁[INST]" and "▁[/INST]": the chat format always puts a space, i.e. "▁", in front of them).

Training is deterministic (one thread, every sentence, no sampling, written through `model_writer`, so no path
is recorded in the model), so two builds with the same arguments are byte-identical. Existing files are
overwritten; nothing else in --out is touched (the reference model lives beside the world, in --out/model).
"""
from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import sentencepiece

from data.world import DEFAULT_DIR, FILES, generate_world, load_world, preference_records, world_files
from data.world.arithmetic import ARITHMETIC_MODEL_DIR, arithmetic_model_sft, sampled_arithmetic_groups

VOCAB_SIZE = 2000
CHAT_MARKERS = ("▁[INST]", "▁[/INST]")

# The reference model: a tiny Mistral (GQA: 6 query heads share 2 key/value heads), 2.34M parameters.
REFERENCE_CONFIG = {
    "model_type": "mistral", "vocab_size": VOCAB_SIZE, "hidden_size": 192, "intermediate_size": 512,
    "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 32,
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "sliding_window": None, "tie_word_embeddings": False,
    "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
}
# Trained by this project's own loop in SFT mode, a full fine-tune from random weights over the world's SFT text.
REFERENCE_TRAINING = ["--loss", "sft", "--lora-rank", "0", "--lr", "3e-3", "--epochs", "6", "--batch-size", "32",
                      "--warmup-steps", "50", "--max-length", "128", "--max-prompt-length", "64", "--seed", "0"]


# The arithmetic reference model (eval/experiments/best_of_n.py): the world's model solves 13% of one-digit sums, so every
# level would be "hard". A smaller model (1.04M parameters, embeddings tied to the output head) trained on
# arithmetic alone; its size, data and schedule were chosen by measurement (README "Rebuilding the world").
ARITHMETIC_CONFIG = {**REFERENCE_CONFIG, "hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4,
                     "tie_word_embeddings": True}
# Fresh problems per level (never a held-out one's operands), solved in the world's strategies at the reference's
# weights, so the preference pairs' solutions are the model's own kind of text.
ARITHMETIC_SFT_PER_LEVEL = {1: 6000, 2: 6000, 3: 6000, 4: 3000, 5: 2000}
ARITHMETIC_TRAINING = ["--loss", "sft", "--lora-rank", "0", "--lr", "3e-3", "--steps", "2800", "--batch-size", "32",
                       "--warmup-steps", "50", "--max-length", "128", "--max-prompt-length", "64", "--seed", "0",
                       "--threads", "1", "--log-every", "100"]

# Its preference pairs: each training problem's correct solutions against what the model itself gets wrong, from
# ARITHMETIC_PAIR_SAMPLES samples per problem at temperature 1 (the paper's math setting: correct vs incorrect).
ARITHMETIC_PAIRS = "arithmetic_model_pairs_soft.jsonl"
ARITHMETIC_PAIR_SAMPLES = 8


def tokenizer_corpus(sft_records) -> list[str]:
    """The lines sentencepiece learns from: every SFT prompt and response, split at newlines (sentencepiece
    reads sentences, not paragraphs; newlines themselves go to byte fallback)."""
    return [line for record in sft_records for text in (record["prompt"], record["response"])
            for line in text.split("\n") if line]


def train_tokenizer(lines, vocab_size: int = VOCAB_SIZE) -> bytes:
    """A serialized sentencepiece model (the bytes of tokenizer.model) trained on `lines`."""
    if vocab_size < 300:
        raise ValueError(f"train_tokenizer: vocab_size must be >= 300 (256 byte pieces, specials, characters), "
                         f"got {vocab_size}")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False,  # a world too small for vocab_size gets the pieces it has, not an error
        character_coverage=1.0, byte_fallback=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        user_defined_symbols=list(CHAT_MARKERS), normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True,
        input_sentence_size=0, shuffle_input_sentence=False, num_threads=1, minloglevel=2)
    return model.getvalue()


def build_world(out=DEFAULT_DIR, seed: int = 0, k: int = 20, k_other: int = 4,
                vocab_size: int = VOCAB_SIZE) -> dict[str, Path]:
    """Generate the world, write its files and tokenizer.model into `out`; returns FILES name -> path."""
    out = Path(out)
    world = generate_world(seed, k, k_other)
    out.mkdir(parents=True, exist_ok=True)
    for filename, text in world_files(world).items():
        (out / filename).write_text(text, encoding="utf-8")
    (out / FILES["tokenizer"]).write_bytes(train_tokenizer(tokenizer_corpus(world.sft), vocab_size))
    return {name: out / filename for name, filename in world.spec["files"].items()}


def train_reference_model(out=DEFAULT_DIR, progress: bool = True) -> Path:
    """Train the world's reference model with `train.py --loss sft` (REFERENCE_TRAINING) and install it as
    `out/model`, replacing any model there only once the new one is complete. About 15 minutes on 2 CPU cores."""
    out = Path(out).resolve()
    return _train_model(out, "model", "reference_config.json", REFERENCE_CONFIG, out / FILES["sft"],
                        REFERENCE_TRAINING, progress)


def train_arithmetic_model(out=DEFAULT_DIR, progress: bool = True) -> Path:
    """Train the arithmetic reference model (ARITHMETIC_CONFIG, ARITHMETIC_TRAINING) on fresh arithmetic SFT text
    (ARITHMETIC_SFT_PER_LEVEL, drawn from the world's seed and kept clear of its held-out problems) and install it
    as `out/arithmetic_model`. Reads the world in `out`, so build the world first."""
    out = Path(out).resolve()
    world = load_world(out)
    records = arithmetic_model_sft(world.arithmetic, random.Random(f"{world.seed}:arithmetic-model-sft"),
                                   ARITHMETIC_SFT_PER_LEVEL)
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        data = Path(scratch) / "arithmetic_sft.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        return _train_model(out, "arithmetic_model", "arithmetic_config.json", ARITHMETIC_CONFIG, data,
                            ARITHMETIC_TRAINING, progress)


def write_arithmetic_model_pairs(out=DEFAULT_DIR, model_dir=None, seed: int = 0) -> Path:
    """Sample the arithmetic model ARITHMETIC_PAIR_SAMPLES times on each training problem (one thread, seeded,
    so deterministic) and write the correct-against-incorrect pairs of `sampled_arithmetic_groups` as soft pairs
    (chosen_prob 1 / (1 + incorrect weight)) into out/ARITHMETIC_PAIRS."""
    import torch  # here, not at the top: building the world itself needs no torch

    from models import Tokenizer, load_pretrained
    from models.generate import sample_completions

    out = Path(out)
    model_dir = Path(model_dir or out / ARITHMETIC_MODEL_DIR.name)
    world = load_world(out)
    torch.set_num_threads(1)
    model, tokenizer = load_pretrained(model_dir).eval(), Tokenizer(model_dir / "tokenizer.model")
    generator = torch.Generator().manual_seed(seed)
    samples = {}
    for problem in (p for p in world.arithmetic if p.split == "train"):
        completions = sample_completions(model, tokenizer, [problem.prompt], ARITHMETIC_PAIR_SAMPLES, 112, 1.0,
                                         chat=True, generator=generator)
        samples[problem.id] = [c.text for c in completions]
    records = [r for r in preference_records(sampled_arithmetic_groups(world.arithmetic, samples), "soft")
               if r["chosen_prob"] > 0.5]  # indifferent pairs (two correct, or two wrong) would only flatten
    path = out / ARITHMETIC_PAIRS
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


class TrainingFailed(RuntimeError):
    """train.py's run for a world model ended with a non-zero exit code (it has printed why)."""

    def __init__(self, code: int):
        super().__init__(f"train.py exited {code}")
        self.code = code


def _train_model(out: Path, name: str, config_name: str, config: dict, data: Path, training: list[str],
                 progress: bool) -> Path:
    """train.py --init-config out/config_name (beside tokenizer.model, where --init-config looks for it) on `data`,
    installed as out/name, replacing any model there only once the new one is complete."""
    import train  # train.py's own entry, in this process (this builder is a script too; train imports the world)
    config_path = out / config_name
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    with tempfile.TemporaryDirectory(dir=out) as scratch:
        run = Path(scratch) / "run"
        argv = ["--init-config", str(config_path), "--data", str(data), "--out", str(run), *training]
        if not progress:
            argv.append("--no-progress")
        code = train.main(argv)
        if code != 0:
            raise TrainingFailed(code)
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        (run / "model").rename(target)
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.world.build", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_DIR), help="directory to write (default: data/world)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed (default 0)")
    parser.add_argument("--k", type=int, default=20, help="comparisons per opinion pair in the counts and sampled "
                                                          "files (default 20)")
    parser.add_argument("--k-other", type=int, default=4, help="comparisons per story, arithmetic and multiple-"
                                                               "choice pair in their counts files (default 4)")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help=f"tokenizer vocabulary (default "
                                                                           f"{VOCAB_SIZE})")
    parser.add_argument("--train-model", action="store_true", help="also train the reference model from scratch "
                                                                    "into --out/model (about 15 minutes on 2 cores)")
    parser.add_argument("--train-arithmetic-model", action="store_true",
                        help="also train the best-of-N experiment's arithmetic model into --out/arithmetic_model "
                             f"and sample its preference pairs ({ARITHMETIC_PAIRS})")
    parser.add_argument("--arithmetic-pairs", action="store_true",
                        help=f"only (re)sample the arithmetic model's preference pairs ({ARITHMETIC_PAIRS})")
    args = parser.parse_args(argv)
    if args.arithmetic_pairs:
        print(f"arithmetic model's preference pairs: {write_arithmetic_model_pairs(args.out)}")
        return 0
    try:
        paths = build_world(args.out, args.seed, args.k, args.k_other, args.vocab_size)
    except (ValueError, OSError) as error:
        print(f"build_world: {error}", file=sys.stderr)
        return 1
    total = sum(path.stat().st_size for path in paths.values())
    for name, path in paths.items():
        print(f"{path}  {path.stat().st_size / 1e3:8.1f} kB")
    print(f"wrote {len(paths)} files, {total / 1e6:.2f} MB, seed {args.seed}, into {args.out}")
    if args.train_model:
        try:
            print(f"reference model: {train_reference_model(args.out)}")
        except TrainingFailed as error:
            print(f"build_world: training the reference model failed (train.py exit code {error.code})",
                  file=sys.stderr)
            return 1
    if args.train_arithmetic_model:
        try:
            print(f"arithmetic model: {train_arithmetic_model(args.out)}")
            print(f"its preference pairs: {write_arithmetic_model_pairs(args.out)}")
        except TrainingFailed as error:
            print(f"build_world: training the arithmetic model failed (train.py exit code {error.code})",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
