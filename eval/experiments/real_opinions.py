"""SPL on a real model: the world's 30 opinion questions asked to SmolLM2-135M-Instruct, trained with the main job's
recipe (DPO and SPL), then compared with the closed-form optimum over the options and sampled.

    python -m eval.experiments.real_opinions                     # wordings, pairs, the three runs, the table
    python -m eval.experiments.real_opinions --runs dpo          # one run (dpo, spl2, spl10; comma-separated)
    python -m eval.experiments.real_opinions --quick             # 2 questions, 2 steps, a few samples (the test)

SmolLM2 answers "The best pet for a family is:" with sentences ("The best pet for a family is a dog."), so the
options as responses hold almost none of its probability. The question is therefore put in a wording that makes
it answer with an option (WORDINGS; its chat template adds the default system prompt unless the wording has
one), and the probability SmolLM2 puts on the exact options (option text + <|im_end|>) is measured for each:
the one that keeps the most is CHOSEN, a few-shot conversation (earlier turns answered with an exact option)
under a system prompt that asks for an option.

The preference data are the world's Bradley-Terry soft pairs (data/world/opinion_pairs_soft.jsonl: the same pairs
and labels) with the prompt replaced by that conversation, written to --out (pairs.jsonl). Each run is train.py
with --model smollm2 and the main job's recipe (spl/config.py WORLD_MAIN_JOB: anchor 0.1, whole prompts per batch,
LoRA on the seven projections and the tied lm_head; --anchor and --prompts-per-batch), fewer steps at a larger
step size so that a run fits the 2-core machine. What makes a step affordable: the 30 conversations share their
first ~200 of ~250 tokens (system prompt, few-shot turns), which models/prefix.py's prefix tree computes once per
batch (and train.py's reference pass, each distinct prompt once). The report is the main job's
(data/world/report.py opinion_report) with SmolLM2 as the reference:
per question the population, SmolLM2's distribution over the options, the learned one, the closed form
pi* ∝ pi_ref^(beta/alpha) p^(1/alpha) (Prop. A.1) and the option masses. Then each policy is sampled (and SmolLM2
itself): per question until ~100 samples are exactly an option (or a cap), the shared opening prefilled once and
a sample dropped from the batch as soon as it can no longer be an option; the share that are an option (against
the option mass), and the option samples' frequencies against the closed form, beside their sampling noise.
sample.py reads one user turn per prompt, not a conversation, so the few-shot prompts are sampled here with
models.generate (the same function sample.py calls).

The coefficients: the issue asks for DPO and SPL "at alpha/beta in {2, 10} (alpha = 1)": SPL alpha = 1 with
beta = 0.5 and 0.1; DPO is SPL with alpha = beta, at beta = 0.1.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from data.world import DEFAULT_DIR
from data.world.opinions import opinion_questions
from data.world.report import conversation_option_logprobs, opinion_report, total_variation
from eval.experiments.common import experiment_parser, option, write_csv, write_json, write_jsonl
from eval.experiments.policies import train_policy
from models import load_adapter, load_pretrained, load_tokenizer
from models.generate import common_prefix, generate, prefill_prefix
from models.lora import HEAD_TARGET, TARGET_NAMES
from spl.theory import optimal_policy

# ---- wordings --------------------------------------------------------------------------------------------------

SYSTEM = ("You answer multiple-choice questions. Reply with exactly one of the given options, copied word for "
          "word, and nothing else.")
# Few-shot turns: questions that are not the world's, each answered with one of its options exactly.
SHOTS = (("The best color for a car is:", ("Red", "Blue", "Black", "White"), "Blue"),
         ("The best fruit for a snack is:", ("An apple", "A banana", "Grapes"), "Grapes"),
         ("The best way to get to work is:", ("Walking", "Cycling", "Driving", "Taking the bus"), "Cycling"))


def listed(prompt: str, options) -> str:
    return prompt + "\n\nOptions:\n" + "\n".join(f"- {option}" for option in options)


def option_only(prompt: str, options) -> str:
    return listed(prompt, options) + "\n\nAnswer with the option only, exactly as written."


def few_shot(user, system: str | None = None):
    """A wording whose conversation first answers SHOTS, each with its exact option, in `user`'s wording."""
    def conversation(prompt, options):
        messages = [{"role": "system", "content": system}] if system else []
        for shot_prompt, shot_options, answer in SHOTS:
            messages += [{"role": "user", "content": user(shot_prompt, shot_options)},
                         {"role": "assistant", "content": answer}]
        return messages + [{"role": "user", "content": user(prompt, options)}]
    return conversation


# name -> (prompt, options) -> chat messages ending with the question's user turn. Without a system message
# SmolLM2's template adds its default one ("You are a helpful AI assistant named SmolLM, ...").
WORDINGS = {
    "plain": lambda prompt, options: [{"role": "user", "content": prompt}],
    "listed": lambda prompt, options: [{"role": "user", "content": listed(prompt, options)}],
    "listed+only": lambda prompt, options: [{"role": "user", "content": option_only(prompt, options)}],
    "system+listed+only": lambda prompt, options: [{"role": "system", "content": SYSTEM},
                                                   {"role": "user", "content": option_only(prompt, options)}],
    "fewshot3+listed": few_shot(listed),
    "fewshot3+listed+only": few_shot(option_only),
    "system+fewshot3+listed+only": few_shot(option_only, SYSTEM),
}
CHOSEN = "system+fewshot3+listed+only"  # the most option mass of WORDINGS (docs/real-weights.md)

# ---- runs --------------------------------------------------------------------------------------------------------

# name -> (loss, alpha, beta): DPO is SPL at alpha = beta; SPL at alpha/beta 2 and 10 with alpha = 1 (the issue).
RUNS = {"dpo": ("dpo", 0.1, 0.1), "spl2": ("spl", 1.0, 0.5), "spl10": ("spl", 1.0, 0.1)}
# Each run's steps, peak learning rate and whole prompts per batch, the defaults of --steps, --lr and
# --prompts-per-batch: what met the issue's targets on the 2-core machine (docs/real-weights.md). DPO's optimum
# pi_ref p^10 is nearly one-hot and ten times as sensitive to an error in a log-ratio as SPL alpha = 1's: with 15
# prompts a step (alternating halves) it stopped at mean TV 0.117-0.207 (lr 1.5e-3 to 5e-3); every question in
# every step (exact gradients) reached 0.049.
SCHEDULES = {"dpo": (48, 3e-3, 30), "spl2": (36, 1.5e-3, 15), "spl10": (36, 1.5e-3, 15)}
# The main job's recipe (spl/config.py WORLD_MAIN_JOB) on SmolLM2: --model would otherwise take paper-chat's values
# (the anchor's weight and the prompts per batch are options of the command: --anchor, --prompts-per-batch).
RECIPE = ("--lora-targets", ",".join([*TARGET_NAMES, HEAD_TARGET]),
          "--lora-rank", "16", "--lora-alpha", "32", "--lora-dropout", "0", "--max-length", "512",
          "--max-prompt-length", "448")
SOFT_PAIRS = DEFAULT_DIR / "opinion_pairs_soft.jsonl"


def conversations(questions, wording: str = CHOSEN) -> list[list[dict]]:
    return [WORDINGS[wording](q.prompt, q.options) for q in questions]


def wording_masses(model, tokenizer, questions, names=tuple(WORDINGS)) -> list[dict]:
    """Per wording, SmolLM2's probability on the exact options (sum over a question's options of
    pi(option + <|im_end|> | prompt)): mean, min and max over the questions, and the prompt's length."""
    rows = []
    for name in names:
        chats = conversations(questions, name)
        logps = conversation_option_logprobs(model, tokenizer, chats, [q.options for q in questions],
                                             shared_prefix=True)
        mass = torch.stack([lp.logsumexp(0).exp() for lp in logps])  # (Q,)
        rows.append({"wording": name, "mean_option_mass": float(mass.mean()), "min_option_mass": float(mass.min()),
                     "max_option_mass": float(mass.max()),
                     "prompt_tokens_first_question": len(tokenizer.encode_prompt(chats[0]))})
    return rows


def write_pairs(path: Path, questions, wording: str = CHOSEN) -> Path:
    """The world's soft pairs of `questions`, in order, each prompt replaced by its conversation in `wording`."""
    chats = {q.id: chat for q, chat in zip(questions, conversations(questions, wording))}
    records = []
    for line in SOFT_PAIRS.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["id"] in chats:
            records.append({**record, "prompt": chats[record["id"]]})
    return write_jsonl(path, records)


# ---- samples -----------------------------------------------------------------------------------------------------

def option_stop(tokenizer, options):
    """`generate`'s stop for sampling a question: a row ends as soon as its text is no prefix of any option (it can
    no longer be one), so only rows still spelling an option cost a forward."""
    def stop(so_far):  # so_far [n, t] -> [n] bool
        return [not any(option.startswith(tokenizer.decode(row)) for option in options) for row in so_far.tolist()]
    return stop


def shared_opening(model, tokenizer, chats, prefix=None):
    """(each conversation's prompt ids, the prefill of the tokens they all open with): `prefix` if given."""
    prompts = [tokenizer.encode_prompt(chat) for chat in chats]
    return prompts, prefix if prefix is not None else prefill_prefix(model, common_prefix(prompts))


def sample_both(model, tokenizer, questions, chats, sampling: dict) -> tuple[list[dict], list[list[str]]]:
    """`sample_options` and `sample_texts` with `sampling`'s counts, the conversations' opening prefilled once."""
    _, prefix = shared_opening(model, tokenizer, chats)
    rows = sample_options(model, tokenizer, questions, chats, sampling["option_samples"], sampling["max_samples"],
                          prefix=prefix)
    return rows, sample_texts(model, tokenizer, chats, sampling["text_samples"], prefix=prefix)


def sample_options(model, tokenizer, questions, chats, option_samples: int, max_samples: int, seed: int = 0,
                   round_size: int = 100, max_new_tokens: int = 16, prefix=None) -> list[dict]:
    """Per question, samples at temperature 1 in rounds of `round_size` until `option_samples` of them are exactly
    an option (the text then <|im_end|>) or `max_samples` are drawn: how many were drawn and each option's count.
    The rounds stop on the count of option samples, not on which options they are, so the counts' frequencies are
    unbiased draws from the model's distribution over the options; samples / drawn estimates the option mass.
    Each conversation's shared opening (system prompt, few-shot turns) is prefilled once for all of them, and a
    row stops as soon as it is no prefix of an option (`option_stop`). prefix: that opening's prefill, if the
    caller has it (`shared_opening`)."""
    generator = torch.Generator().manual_seed(seed)
    prompts, prefix = shared_opening(model, tokenizer, chats, prefix)
    rows = []
    for q, ids in zip(questions, prompts):
        counts, drawn, stop = [0] * len(q.options), 0, option_stop(tokenizer, q.options)
        while sum(counts) < option_samples and drawn < max_samples:
            n = min(round_size, max_samples - drawn)
            out = generate(model, ids, max_new_tokens, n, temperature=1.0, eos_id=tokenizer.end_of_turn_id,
                           generator=generator, prefix=prefix, stop=stop)
            for tokens in out.tokens:
                text = tokenizer.decode(tokens[:-1])
                if tokens and tokens[-1] == tokenizer.end_of_turn_id and text in q.options:
                    counts[q.options.index(text)] += 1
            drawn += n
        rows.append({"counts": counts, "samples": drawn})
    return rows


def sample_texts(model, tokenizer, chats, num_samples: int, seed: int = 0, max_new_tokens: int = 16, prefix=None):
    """Per conversation, `num_samples` whole completions at temperature 1 (up to max_new_tokens): what it says."""
    generator = torch.Generator().manual_seed(seed)
    prompts, prefix = shared_opening(model, tokenizer, chats, prefix)
    return [[tokenizer.decode(tokens) for tokens in generate(
        model, ids, max_new_tokens, num_samples, temperature=1.0, eos_id=tokenizer.end_of_turn_id,
        generator=generator, prefix=prefix).tokens] for ids in prompts]


def sample_summary(report: dict, rows: list[dict], closed_form_key: str = "closed_form") -> dict:
    """The share of samples that are an option (the mean over questions of each question's share, an estimate of
    the mean option mass, and the pooled share), and the option samples' frequencies against the closed form: the
    total variation of the pooled (question, option) frequencies from the closed form given the same per-question
    counts (the mean of each question's TV weighted by its option samples), beside the same figure for as many
    draws from the closed form itself (its sampling noise; 200 simulations) and the TV from the model's own
    distribution over the options (`learned`: what the samples should follow)."""
    generator = torch.Generator().manual_seed(1)
    total = sum(r["samples"] for r in rows)
    hits = sum(sum(r["counts"]) for r in rows)
    tv, noise, tv_learned = 0.0, 0.0, 0.0
    for q, r in zip(report["questions"], rows):
        n = sum(r["counts"])
        if n == 0:
            continue
        target = torch.tensor(q[closed_form_key], dtype=torch.float64)
        frequencies = torch.tensor(r["counts"], dtype=torch.float64) / n
        tv += n * total_variation(frequencies, target)
        tv_learned += n * total_variation(frequencies, torch.tensor(q["learned"], dtype=torch.float64))
        draws = torch.multinomial(target.expand(200, -1), n, replacement=True, generator=generator)  # (200, n)
        freq = torch.nn.functional.one_hot(draws, len(target)).double().mean(1)  # (200, K)
        noise += n * float(0.5 * (freq - target).abs().sum(-1).mean())
    return {"samples": total, "option_samples": hits,
            "option_share": sum(sum(r["counts"]) / r["samples"] for r in rows) / len(rows),
            "pooled_option_share": hits / total, "min_option_samples": min(sum(r["counts"]) for r in rows),
            "tv_samples_vs_closed_form": tv / max(hits, 1), "tv_noise_floor": noise / max(hits, 1),
            "tv_samples_vs_learned": tv_learned / max(hits, 1)}


# ---- the command -------------------------------------------------------------------------------------------------

def evaluate(model, tokenizer, questions, chats, loss: str, alpha: float, beta: float, sampling: dict,
             reference=None) -> dict:
    """The main job's report for the LoRA model (reference: adapters off, or `reference`, SmolLM2's option
    log-probs computed once for every run) plus its samples' summary (sampling: `sample_options`' option_samples
    and max_samples, and text_samples whole completions per question to read)."""
    report_alpha = beta if loss == "dpo" else alpha  # DPO's optimum is SPL's at alpha = beta (train.py's rule)
    report = opinion_report(model, tokenizer, questions, report_alpha, beta, conversations=chats,
                            reference=reference)
    start = time.perf_counter()
    rows, texts = sample_both(model, tokenizer, questions, chats, sampling)
    report["sampling"] = {**sample_summary(report, rows), "seconds": time.perf_counter() - start}
    for q, row, decoded in zip(report["questions"], rows, texts):
        q["sample_counts"], q["samples_drawn"], q["sample_texts"] = row["counts"], row["samples"], decoded
    return report


def question_rows(run: str, report: dict) -> list[dict]:
    """One CSV row per (question, option)."""
    return [{"run": run, "question": q["prompt"], "option": option, "population": q["population"][i],
             "reference": q["reference"][i], "learned": q["learned"][i], "closed_form": q["closed_form"][i],
             "sample_count": q["sample_counts"][i], "tv_learned_vs_closed_form": q["tv_learned_vs_closed_form"],
             "reference_option_mass": q["reference_option_mass"], "learned_option_mass": q["learned_option_mass"]}
            for q in report["questions"] for i, option in enumerate(q["options"])]


def step_times(run_dir: Path) -> dict:
    """Median wall and CPU seconds of a run's steps (train.py's metrics.jsonl: step_s, step_cpu_s): the CPU figure
    is the one the machine's other load does not inflate."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "step_s" in r]
    return {key: statistics.median(r[key] for r in records) if records else float("nan")
            for key in ("step_s", "step_cpu_s")}


def summary_row(run: str, report: dict, seconds: float, steps: int, times: dict) -> dict:
    s = report["sampling"]
    return {"run": run, "alpha": report["alpha"], "beta": report["beta"], "steps": steps,
            "train_seconds": round(seconds, 1), "median_step_s": round(times["step_s"], 1),
            "median_step_cpu_s": round(times["step_cpu_s"], 1),
            "mean_tv_learned_vs_closed_form": report["mean_tv_learned_vs_closed_form"],
            "max_tv_learned_vs_closed_form": report["max_tv_learned_vs_closed_form"],
            "reference_option_mass": report["mean_reference_option_mass"],
            "learned_option_mass": report["mean_learned_option_mass"],
            "mass_ratio": report["mean_learned_option_mass"] / report["mean_reference_option_mass"],
            "sample_option_share": s["option_share"], "pooled_option_share": s["pooled_option_share"],
            "samples": s["samples"], "option_samples": s["option_samples"],
            "min_option_samples": s["min_option_samples"], "tv_samples_vs_closed_form": s["tv_samples_vs_closed_form"],
            "tv_noise_floor": s["tv_noise_floor"], "tv_samples_vs_learned": s["tv_samples_vs_learned"],
            "sampling_seconds": round(s["seconds"], 1)}


def format_summary(rows: list[dict]) -> str:
    lines = [f"{'run':6s} {'alpha':>5s} {'beta':>5s} {'steps':>5s} {'train s':>7s} {'step s':>6s} {'cpu s':>5s} "
             f"{'TV':>6s} {'mass ref':>8s} {'mass':>6s} {'ratio':>5s} {'share':>6s} {'n opt':>5s} {'TV smp':>6s} "
             f"{'noise':>6s}"]
    for r in rows:
        lines.append(f"{r['run']:6s} {r['alpha']:5g} {r['beta']:5g} {r['steps']:5d} {r['train_seconds']:7.0f} "
                     f"{r['median_step_s']:6.1f} {r['median_step_cpu_s']:5.1f} "
                     f"{r['mean_tv_learned_vs_closed_form']:6.3f} {r['reference_option_mass']:8.3f} "
                     f"{r['learned_option_mass']:6.3f} {r['mass_ratio']:5.2f} {r['sample_option_share']:6.3f} "
                     f"{r['option_samples']:5d} {r['tv_samples_vs_closed_form']:6.3f} {r['tv_noise_floor']:6.3f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = experiment_parser(__doc__, "runs/real_opinions", "2 questions, 2 steps, a few samples (the test's form)",
                          "unused (the runs are fixed: --runs)", beta=0.1, steps="each run's, SCHEDULES", lr=None,
                          lr_help="peak learning rate (default: each run's, SCHEDULES)")
    p.add_argument("--runs", default="spl10,dpo,spl2", help=f"comma-separated, of {', '.join(RUNS)}; none: "
                   f"only the wordings and SmolLM2's own report")
    p.add_argument("--option-samples", type=int, help="per question and policy, sample until this many are an "
                   "option (default 50; --quick 3)")
    p.add_argument("--max-samples", type=int, help="per question and policy, at most this many samples (default "
                   "300; --quick 6)")
    p.add_argument("--text-samples", type=int, help="whole completions per question and policy, to read (default 4; "
                   "--quick 2)")
    p.add_argument("--warmup-steps", type=int, help="train.py's warm-up steps (default 2; --quick 1)")
    p.add_argument("--prompts-per-batch", type=int,
                   help="whole prompts per batch (default: each run's, SCHEDULES; 30 is every question each step)")
    p.add_argument("--anchor", type=float, default=0.1, help="the option-mass anchor's weight (default 0.1, the "
                   "main job's)")
    p.add_argument("--model", default="smollm2", help="the model (train.py's --model; default smollm2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--wording", default=CHOSEN, choices=tuple(WORDINGS), help=f"the wording trained and reported "
                   f"(default {CHOSEN})")
    p.add_argument("--wordings", help=f"comma-separated wordings to measure, or none (default: all; --quick: "
                   f"{CHOSEN})")
    args = p.parse_args(argv)
    unknown = [w for w in (args.wordings or "").split(",") if w and w != "none" and w not in WORDINGS]
    if unknown:
        p.error(f"--wordings: unknown {', '.join(unknown)} (known: {', '.join(WORDINGS)})")
    args.runs = [r for r in args.runs.split(",") if r and r != "none"]
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {', '.join(unknown)} (known: {', '.join(RUNS)})")
    return args


def main(argv=None) -> int:
    from models.gguf import resolve_model

    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    questions = opinion_questions()[:2] if args.quick else opinion_questions()
    quick = {"option_samples": 3, "max_samples": 6, "text_samples": 2} if args.quick else {}
    sampling = {key: option(getattr(args, key), quick, key, default)
                for key, default in (("option_samples", 50), ("max_samples", 300), ("text_samples", 4))}
    model_dir = resolve_model(args.model)
    model = load_pretrained(model_dir).eval()
    tokenizer, _ = load_tokenizer(model_dir)
    names = [w for w in (args.wordings or (CHOSEN if args.quick else ",".join(WORDINGS))).split(",")
             if w and w != "none"]
    if names:
        start = time.perf_counter()
        masses = wording_masses(model, tokenizer, questions, names)
        write_csv(out / "wordings.csv", masses)
        for row in masses:
            print(f"{row['wording']:30s} option mass mean {row['mean_option_mass']:.3f} (min "
                  f"{row['min_option_mass']:.3f}, max {row['max_option_mass']:.3f}), "
                  f"{row['prompt_tokens_first_question']} prompt tokens", flush=True)
        print(f"wordings measured in {time.perf_counter() - start:.0f} s", flush=True)
    chats = conversations(questions, args.wording)
    data = write_pairs(out / "pairs.jsonl", questions, args.wording)
    summaries, per_question = [], []
    reference = conversation_option_logprobs(model, tokenizer, chats, [q.options for q in questions],
                                             shared_prefix=True)  # SmolLM2's own, once for every run
    write_json(out / "reference.json", {q.prompt: lp.tolist() for q, lp in zip(questions, reference)})
    own_path = out / "reference_samples.json"  # SmolLM2's own samples, before training (drawn once per setting)
    settings = {"sampling": sampling, "wording": args.wording, "questions": [q.prompt for q in questions]}
    if own_path.is_file() and json.loads(own_path.read_text(encoding="utf-8")).get("settings") == settings:
        summary = json.loads(own_path.read_text(encoding="utf-8"))["summary"]
    else:
        start = time.perf_counter()
        own = {"alpha": 1.0, "beta": 1.0, "questions": [{"closed_form": lp.softmax(0).tolist(),
                                                          "learned": lp.softmax(0).tolist()} for lp in reference]}
        rows, texts = sample_both(model, tokenizer, questions, chats, sampling)
        summary = {**sample_summary(own, rows), "seconds": time.perf_counter() - start,
                   "option_mass": float(sum(lp.logsumexp(0).exp() for lp in reference) / len(reference))}
        write_json(own_path, {"settings": settings, "summary": summary, "questions": [
            {"question": q.prompt, "options": list(q.options), **r, "texts": t}
            for q, r, t in zip(questions, rows, texts)]})
    print(f"SmolLM2's samples: option share {summary['option_share']:.3f} (its option mass "
          f"{summary['option_mass']:.3f}), {summary['option_samples']} option samples of {summary['samples']}, "
          f"TV of their frequencies vs its own distribution {summary['tv_samples_vs_closed_form']:.3f} (noise "
          f"{summary['tv_noise_floor']:.3f}), {summary['seconds']:.0f} s", flush=True)
    warmup = option(args.warmup_steps, {"warmup_steps": 1} if args.quick else {}, "warmup_steps", 2)
    for run in args.runs:
        loss, alpha, beta = RUNS[run]
        steps, lr, prompts = SCHEDULES[run]
        steps = option(args.steps, {"steps": 2} if args.quick else {}, "steps", steps)
        lr = args.lr if args.lr is not None else lr
        prompts = args.prompts_per_batch if args.prompts_per_batch is not None else prompts
        extra = [*RECIPE, "--model", args.model, "--lr", lr, "--warmup-steps", warmup, "--dtype", args.dtype,
                 "--batch-size", 170, "--threads", args.threads, "--prompts-per-batch", prompts,
                 "--anchor", args.anchor]
        start = time.perf_counter()
        run_dir = train_policy(out / run, data, alpha, beta, loss, steps, extra=tuple(extra), progress=args.progress)
        seconds = time.perf_counter() - start
        policy = load_adapter(load_pretrained(model_dir), run_dir / "adapter").eval()
        report = evaluate(policy, tokenizer, questions, chats, loss, alpha, beta, sampling, reference)
        write_json(run_dir / "real_report.json", report)
        summaries.append(summary_row(run, report, seconds, steps, step_times(run_dir)))
        per_question += question_rows(run, report)
        write_csv(out / "summary.csv", summaries)
        write_csv(out / "questions.csv", per_question)
        print(format_summary(summaries), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
