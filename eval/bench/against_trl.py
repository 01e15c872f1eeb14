"""Benchmark: spl's train.py against TRL's DPOTrainer, end to end, on the same checkpoint, data and settings.

    pip install -r requirements-bench.txt                # TRL (and protobuf, which HF needs to read the tokenizer)
    python eval/bench/against_trl.py                             # D = 512, 4 layers, V = 32000; 64 pairs, 8 DPO steps of 8
    python eval/bench/against_trl.py --repeats 3                 # alternating repeats, medians
    python eval/bench/against_trl.py --side spl --workdir DIR    # one side in this process (what the parent runs)
    python eval/bench/against_trl.py --model smollm2 --pairs 4 --steps 2 --batch-size 2 --repeats 2   # the real model

One invocation writes a random Mistral (std 0.02, GQA 8/2 heads, FFN 1792) in HF format with Mistral's real v1
tokenizer (`tokenizer.model.v1` from the mistral_common wheel), and 64 preference pairs of English-like text whose
lengths follow HH-RLHF's shape (the prompt about 60% of a pair's tokens). Then it runs, each in its own process
with one thread, alternating the order in each repeat:

    spl            python train.py --loss dpo --beta 0.1 (LoRA r = 16, alpha 16, all seven projections)
    trl            trl.DPOTrainer, the same LoRA through peft, reference recomputed every step (TRL's default)
    trl-precompute the same with precompute_ref_log_probs=True

8 optimizer steps of 8 pairs, float32, no gradient checkpointing, lr 1e-5 constant, no warm-up, on both. The
batches are the same: TRL reads the pairs in spl's epoch-0 order (data.batching.PreferenceBatches, as train.py
draws it) with sequential sampling. Printed per side: wall time of the whole process, training time (the 8
steps; spl's reference pass and TRL's precompute are shown apart), tokens per second of training (non-pad tokens
of the 16 rows of each step, counted the same way for both), and peak extra memory (the process's peak resident
set minus its resident set after its imports, before the model is loaded); then the ratios spl / TRL, and the
first step's loss and mean log-probs of chosen and rejected from both.

Training time is, for spl, the sum of train.py's `step_s` (each step from fetching and collating its batch to
the optimizer's update), for TRL the wall time of `trainer.train()` (its loop: the same work plus its data
loader, logging and end-of-training bookkeeping; the per-step sum from a callback, which leaves out collation, is
printed beside it as "the steps alone"). Each side's CPU time over the same span (`time.process_time`, all of the
process's threads) is printed too: on a machine shared with other jobs, a process waits for a core for part of
its wall time, differently in every run, while its CPU time barely moves, so the CPU-time ratio is the steadier
estimate of what the wall-time ratio is on an idle machine.

--model runs both sides on a real checkpoint instead (what train.py's --model takes: a directory, a .gguf file, or
`smollm2`, SmolLM2-135M-Instruct converted from its GGUF file by models/gguf.py): spl reads it with its own
tokenizer and chat format (models/), TRL with transformers' AutoModelForCausalLM and AutoTokenizer on the same
directory, the prompt rendered by the checkpoint's chat template (apply_chat_template, its default system prompt
included) and the response followed by the tokenizer's EOS, <|im_end|> for SmolLM2 (TRL's conversational path would
also train on the "\n" the template writes after it, a token spl's pairs do not have).

At step 0 the LoRA B matrices are zero on both sides, so the two compute the same function of the same tokens:
the first step's figures must agree whenever the tokens agree, which is checked pair by pair (TRL tokenises
prompt + response as one string, spl each segment on its own; with ASCII text they coincide), and the loss and both
mean log-probs are compared: the largest relative difference is printed against 1e-5.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from eval.bench.measure import resident_kb  # noqa: E402  (after the path line above)
from models.lora import TARGET_NAMES as TARGETS  # noqa: E402  all seven projections
# torch, the TRL stack and spl's training modules are imported inside each side's function: every side runs in its
# own process and imports only its own stack, so the resident set it measures from counts its own imports alone.

SIDES = ("spl", "trl", "trl-precompute")
WORDS = ("the a of to and in is it you that he was for on are with as I his they be at one have this from or had by "
         "hot word but what some we can out other were all there when up use your how said an each she which do "
         "their time if will way about many then them write would like so these her long make thing see him two "
         "has look more day could go come did number sound no most people my over know water than call first who "
         "may down side been now find any new work part take get place made live where after back little only "
         "round man year came show every good me give our under name very through just form sentence great think "
         "say help low line differ turn cause much mean before move right boy old too same tell does set three "
         "want air well also play small end put home read hand port large spell add even land here must big high "
         "such follow act why ask men change went light kind off need house picture try us again animal point "
         "mother world near build self earth father head stand own page should country found answer school grow "
         "study still learn plant cover food sun four between state keep eye never last let thought city tree "
         "cross farm hard start might story saw far sea draw left late run while press close night real life few "
         "north open seem together next white children begin got walk example ease paper group always music those "
         "both mark often letter until mile river car feet care second book carry took science eat room friend "
         "began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl "
         "usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song "
         "measure door product black short numeral class wind question happen complete ship area half rock order "
         "fire south problem piece told knew pass since top whole king space heard best hour better true during "
         "hundred five remember step early hold west ground interest reach fast verb sing listen six table travel "
         "less morning ten simple several vowel toward war lay against pattern slow center love person money serve "
         "appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry "
         "dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood "
         "contain front teach week final gave green oh quick develop ocean warm free minute strong special mind "
         "behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object "
         "decide surface deep moon island foot system busy test record boat common gold possible plane stead dry "
         "wonder laugh thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill "
         "east paint language among").split()


# ---------------------------------------------------------------------------------------------------- the inputs

def text(rng, words: int) -> str:
    """`words` random words in sentences of 6-14 words, capitalised, ending in '.' or '?'."""
    out, left = [], words
    while left > 0:
        n = min(left, int(rng.integers(6, 15)))
        sentence = " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))
        out.append(sentence[0].upper() + sentence[1:] + ("?" if rng.random() < 0.2 else "."))
        left -= n
    return " ".join(out)


def write_inputs(workdir: Path, args) -> None:
    """The checkpoint (workdir/model), the pairs (workdir/pairs.jsonl), both sides' views of them."""
    import torch

    from data.batching import PreferenceBatches
    from data.tokenization import load_preference_data
    from models import MistralConfig, build_model, save_pretrained
    from models.tokenizer import load_tokenizer

    if args.model:  # a real checkpoint: the directory resolve_model gives train.py (smollm2: the converted GGUF)
        from models.gguf import resolve_model
        (workdir / "model").symlink_to(resolve_model(args.model).resolve(), target_is_directory=True)
    else:
        import mistral_common
        tokenizer_path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
        heads = args.dim // 64
        config = MistralConfig(vocab_size=32000, hidden_size=args.dim, intermediate_size=args.dim * 7 // 2,
                               num_hidden_layers=args.layers, num_attention_heads=heads,
                               num_key_value_heads=max(1, heads // 4), head_dim=64, rms_norm_eps=1e-5,
                               rope_theta=1e4, sliding_window=4096, tie_word_embeddings=False,
                               max_position_embeddings=32768)
        torch.manual_seed(0)
        save_pretrained(build_model(config, seed=0), workdir / "model", tokenizer_path=tokenizer_path)

    rng = np.random.default_rng(0)

    def words(median):  # log-normal lengths, in words (about 1.3 tokens each)
        return max(2, round(median * np.exp(0.6 * rng.standard_normal())))

    pairs = [{"prompt": text(rng, words(args.prompt_words)), "chosen": text(rng, words(args.response_words)),
              "rejected": text(rng, words(args.response_words))} for _ in range(args.pairs)]
    (workdir / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")

    # spl's tokens and epoch-0 batch order, as train.py computes them.
    tokenizer, _ = load_tokenizer(workdir / "model")
    examples, _ = load_preference_data(workdir / "pairs.jsonl", tokenizer, args.max_length,
                                       args.max_length - 1)
    if len(examples) != len(pairs):
        raise SystemExit(f"bench_trl: spl kept {len(examples)} of {len(pairs)} pairs")
    order = [i for batch in PreferenceBatches(examples, args.batch_size, tokenizer.pad_id, seed=0).epoch_order(0)
             for i in batch]
    # TRL's view: the same text, in spl's order. With the v1 tokenizer the prompt is rendered in the v1 chat format
    # as plain text here (TRL's non-conversational path tokenises prompt + chosen as one string, BOS added, "</s>"
    # appended); with a real checkpoint run_trl renders it with the checkpoint's own chat template (HF's
    # apply_chat_template), so "chat" holds the user's turn.
    if args.model:
        trl_rows = [{"chat": pairs[i]["prompt"], "chosen": pairs[i]["chosen"], "rejected": pairs[i]["rejected"]}
                    for i in order]
    else:
        trl_rows = [{"prompt": f"[INST] {pairs[i]['prompt']} [/INST]", "chosen": " " + pairs[i]["chosen"],
                     "rejected": " " + pairs[i]["rejected"]} for i in order]
    (workdir / "trl_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl_rows), encoding="utf-8")
    spl_tokens = [{"prompt_ids": examples[i].prompt_ids, "chosen_ids": examples[i].chosen_ids,
                   "rejected_ids": examples[i].rejected_ids} for i in order]
    (workdir / "spl_tokens.json").write_text(json.dumps(spl_tokens), encoding="utf-8")


def training_tokens(tokens: list[dict], batch_size: int, steps: int) -> int:
    """Non-pad tokens of the rows prompt + chosen and prompt + rejected of the first `steps` batches."""
    used = tokens[:batch_size * steps]
    return sum(2 * len(t["prompt_ids"]) + len(t["chosen_ids"]) + len(t["rejected_ids"]) for t in used)


# ---------------------------------------------------------------------------------------------------- one side

def run_spl(workdir: Path, args) -> dict:
    """train.py run as the script it is (runpy, as `python train.py ...` would; eval/ never imports the scripts
    as libraries), in this process so that its memory is measured from here."""
    import runpy

    import torch
    torch.set_num_threads(1)
    baseline_kb = resident_kb("VmRSS")  # after torch's import; spl's own modules add a few MB
    out = workdir / "spl_run"
    argv = ["--model", str(workdir / "model"), "--data", str(workdir / "pairs.jsonl"), "--loss", "dpo",
            "--beta", "0.1", "--lora-rank", "16", "--lora-alpha", "16", "--lora-dropout", "0",
            "--lora-targets", ",".join(TARGETS), "--lr", "1e-5", "--warmup-steps", "0", "--steps", str(args.steps),
            "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
            "--max-prompt-length", str(args.max_length - 1), "--threads", "1", "--no-compile", "--out", str(out),
            "--overwrite", "--no-progress"] + args.spl_args
    start = time.perf_counter()
    sys.argv = [str(ROOT / "train.py"), *argv]
    try:
        runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    total_s = time.perf_counter() - start
    if code:
        raise SystemExit(f"bench_trl: train.py exited with {code}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "step" in r]
    training_s = sum(r["step_s"] for r in steps)  # train.py's own timing of each optimizer step
    first = steps[0]
    return {"training_s": training_s, "training_cpu_s": sum(r["step_cpu_s"] for r in steps),
            "steps_s": training_s, "setup_s": total_s - training_s, "baseline_kb": baseline_kb,
            "peak_kb": resident_kb("VmHWM"), "loss": first["loss"], "logps_chosen": first["logps_chosen"],
            "logps_rejected": first["logps_rejected"], "steps": len(steps)}


def StepTimes():
    """A transformers TrainerCallback timing each optimizer step from its on_step_begin to its on_step_end (the
    forward, backward and update; the batch is fetched and collated before on_step_begin): `seconds`, a list."""
    import transformers

    class _StepTimes(transformers.TrainerCallback):
        def __init__(self):
            self.seconds, self.started = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self.started)

    return _StepTimes()


def render_chat_rows(rows: list[dict], tokenizer) -> list[dict]:
    """TRL's text rows for a real checkpoint, from {"chat": user turn, "chosen", "rejected"}: the prompt is the
    checkpoint's chat template's generation prompt (HF's apply_chat_template, `tokenizer` an HF tokenizer) and each
    response its plain text; TRL appends the tokenizer's EOS to it, which for a ChatML model such as SmolLM2-Instruct
    is <|im_end|>, the end of the assistant's turn (TRL's conversational path would also keep the template's "\n"
    after <|im_end|>, a token spl's pairs do not train on)."""
    return [{"prompt": tokenizer.apply_chat_template([{"role": "user", "content": row["chat"]}],
                                                     add_generation_prompt=True, tokenize=False),
             "chosen": row["chosen"], "rejected": row["rejected"]} for row in rows]


def run_trl(workdir: Path, args, precompute: bool) -> dict:
    import torch
    torch.set_num_threads(1)
    import datasets
    import peft
    import transformers
    import trl
    baseline_kb = resident_kb("VmRSS")

    start = time.perf_counter()
    rows = [json.loads(line) for line in (workdir / "trl_pairs.jsonl").read_text().splitlines()]
    if args.model:
        tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "model")
        rows = render_chat_rows(rows, tokenizer)
    else:
        tokenizer = transformers.LlamaTokenizer.from_pretrained(workdir / "model", add_bos_token=True,
                                                                add_eos_token=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "model", dtype=torch.float32,
                                                              attn_implementation="sdpa")
    dataset = datasets.Dataset.from_list(rows)
    config = trl.DPOConfig(
        output_dir=str(workdir / "trl_run"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=1e-5, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.1, loss_type=["sigmoid"], max_length=args.max_length, precompute_ref_log_probs=precompute,
        precompute_ref_batch_size=args.batch_size, bf16=False, gradient_checkpointing=False, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        train_sampling_strategy="sequential", seed=0)
    lora = peft.LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS), bias="none",
                           task_type="CAUSAL_LM")
    steps = StepTimes()
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora, callbacks=[steps])
    setup_s = time.perf_counter() - start
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer.train()
    training_s, training_cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    logged = [entry for entry in trainer.state.log_history if "loss" in entry and "logps/chosen" in entry]
    trained = trainer.train_dataset
    tokens = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}
              for p, c, r in zip(trained["prompt_ids"], trained["chosen_ids"], trained["rejected_ids"])]
    return {"training_s": training_s, "training_cpu_s": training_cpu_s, "steps_s": sum(steps.seconds),
            "setup_s": setup_s, "baseline_kb": baseline_kb, "peak_kb": resident_kb("VmHWM"),
            "loss": logged[0]["loss"], "logps_chosen": logged[0]["logps/chosen"],
            "logps_rejected": logged[0]["logps/rejected"], "steps": len(logged), "tokens": tokens}


# ---------------------------------------------------------------------------------------------------- the parent

def model_name(args) -> str:
    return args.model if args.model else f"random Mistral D={args.dim}, {args.layers} layers, V=32000"


def first_step_difference(spl: dict, trl: dict) -> float:
    """The largest of |spl - trl| / |trl| over the first step's loss and mean chosen and rejected log-probs."""
    return max(abs(spl[key] - trl[key]) / abs(trl[key]) for key in ("loss", "logps_chosen", "logps_rejected"))


def run_child(side: str, workdir: Path, args) -> dict:
    """One side in a fresh process with one thread; its wall time from here, its record from its last line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_CACHE=tempfile.mkdtemp(dir=workdir), TQDM_DISABLE="1")
    command = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--workdir", str(workdir),
               *child_args(args)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    wall_s = time.perf_counter() - start
    if done.returncode:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"bench_trl: the {side} side exited with {done.returncode}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return {**record, "wall_s": wall_s}


def child_args(args) -> list[str]:
    out = ["--pairs", str(args.pairs), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--max-length", str(args.max_length)] + (["--model", args.model] if args.model else [])
    return out + [f"--spl-arg={a}" for a in args.spl_args]


def compare(workdir: Path, args) -> int:
    write_inputs(workdir, args)
    spl_tokens = json.loads((workdir / "spl_tokens.json").read_text())
    tokens = training_tokens(spl_tokens, args.batch_size, args.steps)
    runs = {side: [] for side in args.sides}
    for repeat in range(args.repeats):
        order = args.sides[repeat % len(args.sides):] + args.sides[:repeat % len(args.sides)]
        for side in order:
            record = run_child(side, workdir, args)
            runs[side].append(record)
            print(f"  repeat {repeat + 1} {side}: wall {record['wall_s']:.1f} s, training {record['training_s']:.1f} s "
                  f"(CPU {record['training_cpu_s']:.1f} s; the steps alone {record['steps_s']:.1f} s), load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)

    def median(side, key):
        return statistics.median(r[key] for r in runs[side])

    def extra_mb(r):
        return (r["peak_kb"] - r["baseline_kb"]) / 1024

    print(f"\n{args.pairs} pairs, {args.steps} DPO steps of {args.batch_size} pairs, LoRA r=16 on {len(TARGETS)} "
          f"projections, {model_name(args)}, float32, 1 thread per process, "
          f"{args.repeats} alternating repeat(s), medians; {tokens} training tokens")
    print(f"{'side':<16}{'wall s':>9}{'training s':>12}{'training CPU s':>16}{'setup s':>9}{'tokens/s':>10}"
          f"{'peak extra MB':>15}")
    for side in args.sides:
        extra = statistics.median(extra_mb(r) for r in runs[side])
        print(f"{side:<16}{median(side, 'wall_s'):>9.1f}{median(side, 'training_s'):>12.1f}"
              f"{median(side, 'training_cpu_s'):>16.1f}{median(side, 'setup_s'):>9.1f}"
              f"{tokens / median(side, 'training_s'):>10.0f}{extra:>15.0f}")
    if "spl" in runs:
        for other in (s for s in args.sides if s != "spl"):
            spl_extra = statistics.median(extra_mb(r) for r in runs["spl"])
            other_extra = statistics.median(extra_mb(r) for r in runs[other])
            print(f"spl / {other}: wall {median('spl', 'wall_s') / median(other, 'wall_s'):.2f}x, training "
                  f"{median('spl', 'training_s') / median(other, 'training_s'):.2f}x (target <= 0.2x; CPU time "
                  f"{median('spl', 'training_cpu_s') / median(other, 'training_cpu_s'):.2f}x), peak extra "
                  f"memory {spl_extra / other_extra:.2f}x (target <= 0.3x)")
    print("first step (before any update; means over the batch's pairs):")
    for side in args.sides:
        r = runs[side][0]
        print(f"  {side:<16} loss {r['loss']:.7f}  logps chosen {r['logps_chosen']:.5f}  "
              f"rejected {r['logps_rejected']:.5f}")
    summary = {"model": model_name(args), "training_tokens": tokens, "runs": runs}
    for side in (s for s in args.sides if s != "spl"):
        trl_tokens = runs[side][0].pop("tokens")
        for r in runs[side][1:]:
            r.pop("tokens")
        agree = sum(a == b for a, b in zip(trl_tokens, spl_tokens))
        print(f"tokens: {agree} of {len(spl_tokens)} pairs identical between spl and {side}")
        if "spl" in runs:
            worst = first_step_difference(runs["spl"][0], runs[side][0])
            print(f"first step, spl vs {side}: largest relative difference {worst:.2e} over loss and both log-probs "
                  f"({'within' if worst <= 1e-5 else 'NOT within'} 1e-5)")
            summary[f"first_step_relative_difference_{side}"] = worst
    if args.json:
        print(json.dumps(summary))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--side", choices=SIDES, help="run one side in this process (the parent's child)")
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated sides to compare")
    p.add_argument("--workdir", help="where the checkpoint, data and runs go (default: a temporary directory)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--model", help="a real checkpoint for both sides, as train.py's --model takes it (a directory, "
                                   "a .gguf file, or smollm2) instead of the random Mistral")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--prompt-words", type=int, default=85, help="median prompt length in words (~1.3 tokens each)")
    p.add_argument("--response-words", type=int, default=28, help="median response length in words")
    p.add_argument("--json", action="store_true", help="end with one JSON line of every run's record")
    p.add_argument("--spl-arg", dest="spl_args", action="append", default=[],
                   help="an extra train.py argument (repeatable), e.g. --spl-arg=--no-shared-prefix")
    args = p.parse_args(argv)
    args.sides = args.sides.split(",")
    if args.side:
        workdir = Path(args.workdir)
        if args.side == "spl":
            record = run_spl(workdir, args)
        else:
            record = run_trl(workdir, args, precompute=args.side == "trl-precompute")
        print(json.dumps(record))
        return 0
    if args.workdir:
        workdir = Path(args.workdir)
        if workdir.exists() and any(workdir.iterdir()):
            raise SystemExit(f"bench_trl: --workdir {workdir} is not empty (it gets a fresh checkpoint and data)")
        workdir.mkdir(parents=True, exist_ok=True)
        return compare(workdir, args)
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as workdir:
        return compare(Path(workdir), args)


if __name__ == "__main__":
    sys.exit(main())
