"""Experiment 3, best-of-N (the paper's Figure 3, Tables 1-3, Figures 9 and 10) on the world's arithmetic.

    python eval/experiments/best_of_n.py            # DPO at T in {1, 1.1, 1.2}, SPL at alpha/beta in {1.1, 1.2}: Tables 1-3
    python eval/experiments/best_of_n.py --quick    # DPO at T = 1 and 1.2, SPL at 1.2; 3 problems at levels 1-3, 8 samples
    python eval/experiments/best_of_n.py --levels 1,2,3,4,5 --problems 32    # every held-out problem
    python eval/experiments/best_of_n.py --reference-only --levels 1,2,3,4,5 --problems 32 --num-samples 32  # the model

The world has five levels of arithmetic (1: a + b with one digit each ... 5: a * b with two digits each), each
with held-out "test" problems that neither the SFT text nor the preference pairs contain, and several solution
strategies (direct, split, round, ...). The reference is the arithmetic model (data/world/arithmetic_model,
`python -m data.world.build --train-arithmetic-model`), not the world's model, which solves 13% of level 1.
LoRA policies are trained by train.py on its preference pairs (`arithmetic_model_pairs_soft.jsonl`: each training
problem's correct solutions against the model's own wrong samples, chosen_prob 0.95; `--pairs world`: the world's
strategy pairs, where raters prefer short solutions): DPO (alpha = beta = 0.1) and SPL at global temperatures
alpha/beta > 1, beta = 0.1 (Eq. 5). Settings, as in Tables 1-3: DPO sampled at token temperatures T (Eq. 6) and
SPL sampled at T = 1 (Eq. 7-10); plus the reference model at T = 1 for scale.

For each setting and problem, n = 128 samples; c of them end in the right '#### N' (`data.world.check_answer`);
pass@k = 1 - C(n - c, k) / C(n, k) (Chen et al. 2021, `eval.metrics.pass_at_k`) for k = 1, 2, 4, ..., 128,
averaged over the level's problems, with a 95% percentile bootstrap interval over the problems
(`eval.metrics.bootstrap_interval`, which covers both the choice of problems and each problem's sampling noise,
not the training seed's). Also per level: the unique-final-answer fraction (distinct final answers among the n
samples / n, a missing answer counting as one value; Figure 10) and the answered fraction; each setting minus DPO
at T = 1 on the same problems with a paired interval; and the samples each setting needs to match DPO T = 1's
best-of-N (Figure 9).

Problems: `--problems` of the 32 held-out ones at each of `--levels` (default 1, 4, 5: the model's easy, medium
and hard levels, pass@1 70%, 16%, 0.6%; levels 2 and 3 are about as easy as 1, see the README). Outputs in --out:
`pass_at_k.csv` (per setting and level: pass@k with its interval, unique and answered fractions: the printed
tables), `problems.csv` (per setting and problem: n, correct, unique fraction), `samples.jsonl` (every sample's
text and final answer: the tables are recomputed from it in the tests), `differences.csv`, `matching.csv`,
`experiment.json` and `best_of_n.png` when matplotlib is installed. Training runs live in --out/runs/ and are
reused when the configuration is unchanged.

Training: LoRA r = 8 (lora_alpha 16) on all seven projections, lr 1e-3, 10 warmup steps, 100 steps of 8 whole
prompts with the option-mass anchor 0.1 (the likelihood-displacement remedy; `--anchor 0`: random batches of 16
pairs), given explicitly so that changes to train.py's defaults do not change this experiment. Preference training
costs this small model accuracy on held-out problems; the anchor limits that (README's Experiments section).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from eval.experiments.common import (alpha_for, check_arguments, experiment_parser, first_records, option, parse_list, pyplot,
                             save_figure, write_csv, write_json, write_jsonl)
# torch, and the library modules that load it, are imported inside the functions that use them: --help and usage
# errors then answer before torch's seconds of start-up.

BETA = 0.1
TEMPERATURES = (1.0, 1.1, 1.2)  # DPO's token temperatures (Tables 1-3)
SPL_RATIOS = (1.1, 1.2)  # alpha / beta (Tables 1-3)
STEPS = 100
LR = 1e-3
# LoRA on the model; lengths within its 256 positions (with --model, train.py takes the paper's 512 otherwise, which
# it refuses for this model; no problem and solution of the world comes near 256 tokens, so nothing is cut)
TRAIN_ARGS = ("--lora-rank", 8, "--lora-alpha", 16, "--warmup-steps", 10, "--log-every", 10, "--max-length", 256,
              "--max-prompt-length", 128)
# The likelihood-displacement remedy (spl/losses.py anchored_spl_loss): whole prompts per batch and an anchor that
# holds each prompt's probability on its responses at the reference's. --anchor 0: random pairs, batch 16.
ANCHOR, PROMPTS_PER_BATCH, BATCH_SIZE = 0.1, 8, 16
NUM_SAMPLES = 128
PAPER_KS = (1, 4, 16, 64, 128)  # the rows of Tables 1-3
LEVELS = (1, 4, 5)  # easy, medium, hard for the arithmetic model (levels 2 and 3 are as easy as 1)
PROBLEMS = 16  # per level, of the 32 held-out ones
MAX_NEW_TOKENS = 112  # the longest SFT solution is 104 tokens
LEVEL, RESAMPLES = 0.95, 2000  # the bootstrap intervals
QUICK = dict(temperatures=(1.0, 1.2), ratios=(1.2,), steps=2, max_pairs=32, problems=3, num_samples=8,
             max_new_tokens=64, levels=(1, 2, 3))


@dataclasses.dataclass(frozen=True)
class Setting:
    method: str  # reference, dpo or spl
    ratio: float  # the policy's global temperature alpha/beta (1 for DPO and the reference)
    temperature: float  # token temperature at sampling

    @property
    def policy(self) -> str:
        return "reference" if self.method == "reference" else "dpo" if self.method == "dpo" else f"spl-{self.ratio:g}"

    @property
    def label(self) -> str:
        return f"spl a/b={self.ratio:g}" if self.method == "spl" else f"{self.method} T={self.temperature:g}"


# ---- pure functions ---------------------------------------------------------------------------------------------

def ks_up_to(n: int) -> list[int]:
    """1, 2, 4, ... up to n (the paper's best-of-N axis)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"ks_up_to: n must be a positive integer, got {n!r}")
    return [2 ** i for i in range(n.bit_length()) if 2 ** i <= n]


def problem_row(problem, texts) -> dict:
    """n, correct, unique-final-answer and answered fractions of one problem's samples."""
    from data.world import check_answer, extract_answer
    from eval.metrics import unique_fraction

    answers = [extract_answer(text) for text in texts]
    return {"problem": problem.id, "level": problem.level, "n": len(texts),
            "correct": sum(check_answer(problem, text) for text in texts),
            "unique_fraction": unique_fraction(answers),
            "answered": sum(a is not None for a in answers) / len(answers)}


def problem_pass_at_k(problems: list[dict], ks) -> "np.ndarray":
    """[K, P]: each problem's unbiased pass@k (`eval.metrics.pass_at_k`) for each k, problems in the given order."""
    import numpy as np

    from eval.metrics import pass_at_k

    return np.array([[pass_at_k(p["n"], p["correct"], k) for p in problems] for k in ks], dtype=np.float64)


def level_rows(setting: "Setting", problems: list[dict], ks, level: float = LEVEL, resamples: int = RESAMPLES,
               seed: int = 0) -> list[dict]:
    """Per level: pass@k averaged over its problems (the unbiased estimator per problem) with a percentile
    bootstrap interval over the problems (`eval.metrics.bootstrap_interval`, seeded by level), and the mean unique
    and answered fractions."""
    from eval.metrics import bootstrap_interval

    rows = []
    for level_id in sorted({p["level"] for p in problems}):
        at_level = [p for p in problems if p["level"] == level_id]
        values = problem_pass_at_k(at_level, ks)  # (K, P)
        low, high = bootstrap_interval(values, level, resamples, seed=seed + level_id)
        row = {"setting": setting.label, **dataclasses.asdict(setting), "level": level_id, "problems": len(at_level)}
        for i, k in enumerate(ks):
            row[f"pass@{k}"] = float(values[i].mean())
            row[f"pass@{k}_low"], row[f"pass@{k}_high"] = float(low[i]), float(high[i])
        row["unique_fraction"] = sum(p["unique_fraction"] for p in at_level) / len(at_level)
        row["answered"] = sum(p["answered"] for p in at_level) / len(at_level)
        rows.append(row)
    return rows


def difference_rows(problem_rows: list[dict], baseline: str, others, ks, level: float = LEVEL,
                    resamples: int = RESAMPLES, seed: int = 0) -> list[dict]:
    """Per level, setting and k: mean pass@k of `setting` minus that of `baseline` on the same problems, with a
    paired bootstrap interval (both settings resampled with the same problems). An interval that holds 0 means the
    two cannot be told apart on these problems."""
    from eval.metrics import bootstrap_interval

    rows = []
    for level_id in sorted({p["level"] for p in problem_rows}):
        def values(label):
            at_level = sorted((p for p in problem_rows if p["setting"] == label and p["level"] == level_id),
                              key=lambda p: p["problem"])
            return [p["problem"] for p in at_level], problem_pass_at_k(at_level, ks)

        base_ids, base = values(baseline)
        for other in others:
            other_ids, theirs = values(other)
            if other_ids != base_ids:
                raise ValueError(f"difference_rows: {other!r} and {baseline!r} were run on different problems")
            low, high = bootstrap_interval(theirs - base, level, resamples, seed=seed + level_id)
            rows += [{"level": level_id, "setting": other, "baseline": baseline, "k": k,
                      "difference": float((theirs[i] - base[i]).mean()), "low": float(low[i]),
                      "high": float(high[i])} for i, k in enumerate(ks)]
    return rows


def samples_to_match(curve, target: float) -> int | None:
    """The smallest N with curve[N - 1] >= target (curve[i] = best-of-(i + 1) accuracy), None when the curve
    never reaches it (Figure 9: the samples a method needs to match DPO's best-of-N)."""
    for index, value in enumerate(curve):
        if value >= target - 1e-12:
            return index + 1
    return None


def matching_rows(problem_rows: list[dict], baseline: str, others, num_samples: int, at_ks) -> list[dict]:
    """Figure 9 per level: for each N in at_ks, the samples each other setting needs for the baseline's pass@N
    (pass@k of every k = 1..n, from the same per-problem counts)."""
    all_ks = list(range(1, num_samples + 1))
    rows = []
    for level_id in sorted({p["level"] for p in problem_rows}):
        curve = {label: problem_pass_at_k([p for p in problem_rows if p["setting"] == label
                                           and p["level"] == level_id], all_ks).mean(axis=1)
                 for label in (baseline, *others)}
        for n in at_ks:
            target = float(curve[baseline][n - 1])
            rows += [{"level": level_id, "setting": other, "baseline": baseline, "baseline_samples": n,
                      "baseline_pass": target, "samples_needed": samples_to_match(curve[other], target) or ""}
                     for other in others]
    return rows


# ---- running it -------------------------------------------------------------------------------------------------

def held_out_problems(world, levels, per_level: int) -> list:
    """The first per_level held-out problems of each of the levels, level by level."""
    return [p for level in sorted(levels)
            for p in [q for q in world.arithmetic if q.split == "test" and q.level == level][:per_level]]


def training_args(anchor: float) -> tuple:
    """train.py's options for every policy: TRAIN_ARGS and the batches (whole prompts when anchored)."""
    if anchor > 0:
        return TRAIN_ARGS + ("--prompts-per-batch", PROMPTS_PER_BATCH, "--anchor", anchor)
    return TRAIN_ARGS + ("--batch-size", BATCH_SIZE)


def run_experiment(out: Path, settings, steps: int, lr: float, beta: float, num_samples: int, levels,
                   per_level: int, max_pairs: int | None, max_new_tokens: int, seed: int, anchor: float = ANCHOR,
                   pairs: str = "model", progress: bool = False):
    """Train (or reuse) the policies, sample every problem under every setting. -> (level rows, problem rows,
    samples, runs)."""
    import torch

    from data.world.build import ARITHMETIC_PAIRS
    from data.world import extract_answer, load_world
    from data.world.arithmetic import ARITHMETIC_MODEL_DIR
    from eval.experiments.policies import load_policy, train_policy
    from models.generate import sample_completions

    world = load_world()
    data = first_records(out, world.directory / ARITHMETIC_PAIRS if pairs == "model" else
                         world.files["arithmetic_pairs_soft"], max_pairs)
    problems = held_out_problems(world, levels, per_level)
    ks = ks_up_to(num_samples)
    runs, table, problem_rows, samples = {}, [], [], []
    for setting in settings:
        if setting.policy not in runs and setting.method != "reference":
            started = time.perf_counter()
            alpha = alpha_for(setting.ratio, beta)
            runs[setting.policy] = str(train_policy(
                out / "runs" / setting.policy, data, alpha, beta, loss=setting.method, steps=steps,
                extra=("--model", ARITHMETIC_MODEL_DIR) + training_args(anchor) + ("--lr", lr, "--seed", seed),
                progress=progress))
            print(f"  trained {setting.policy} (alpha = {alpha:g}, beta = {beta:g}): "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        started = time.perf_counter()
        model, tokenizer = load_policy(runs.get(setting.policy), model_dir=ARITHMETIC_MODEL_DIR)
        generator = torch.Generator().manual_seed(seed)
        rows = []
        for problem in problems:
            completions = sample_completions(model, tokenizer, [problem.prompt], num_samples, max_new_tokens,
                                             setting.temperature, chat=True, generator=generator)
            texts = [c.text for c in completions]
            rows.append({"setting": setting.label, **problem_row(problem, texts)})
            samples += [{"setting": setting.label, "problem": problem.id, "level": problem.level, "text": text,
                         "answer": extract_answer(text)} for text in texts]
        problem_rows += rows
        setting_levels = level_rows(setting, rows, ks, seed=seed)
        table += setting_levels
        by_level = " ".join(f"{row['pass@1']:.3f}" for row in setting_levels)
        print(f"  {setting.label:<16} pass@1 by level {by_level}  ({time.perf_counter() - started:.0f} s)", flush=True)
    return table, problem_rows, samples, runs


def format_tables(table, ks) -> str:
    """Tables 1-3's layout, one per level: best-of-N rows (the paper's k that were run), a column per setting, in
    percent, each with its 95% bootstrap interval over problems."""
    labels = list(dict.fromkeys(r["setting"] for r in table))
    width = max(20, *(len(label) + 2 for label in labels))
    lines = []
    for level in sorted({r["level"] for r in table}):
        by_setting = {r["setting"]: r for r in table if r["level"] == level}
        problems = next(iter(by_setting.values()))["problems"]
        lines.append(f"level {level} ({problems} problems; [95% bootstrap interval over problems])")
        lines.append(f"{'best-of-N':>10}" + "".join(f"{label:>{width}}" for label in labels))
        for k in [k for k in PAPER_KS if k in ks] or ks:
            cells = [f"{100 * r[f'pass@{k}']:.1f} [{100 * r[f'pass@{k}_low']:.0f}, {100 * r[f'pass@{k}_high']:.0f}]"
                     for r in (by_setting[label] for label in labels)]
            lines.append(f"{k:>10}" + "".join(f"{cell:>{width}}" for cell in cells))
        for key, name in (("unique_fraction", "unique"), ("answered", "answered")):
            lines.append(f"{name:>10}" + "".join(f"{100 * by_setting[label][key]:>{width - 1}.1f}%"
                                                 for label in labels))
        lines.append("")
    return "\n".join(lines)


def format_differences(differences, matching, num_samples: int) -> str:
    """SPL minus DPO (paired intervals) at the largest k, and Figure 9's samples to match DPO T = 1's best-of-n."""
    top = max(r["k"] for r in differences)
    lines = [f"pass@{top} difference from the baseline, percentage points [paired 95% interval]:"]
    for r in (r for r in differences if r["k"] == top):
        lines.append(f"  level {r['level']}  {r['setting']:<14} - {r['baseline']:<10} {100 * r['difference']:+6.1f} "
                     f"[{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]")
    n = max(r["baseline_samples"] for r in matching)
    lines.append(f"samples needed to match {matching[0]['baseline']}'s best-of-{n} (Figure 9; '-': not within "
                 f"{num_samples}):")
    for r in (r for r in matching if r["baseline_samples"] == n):
        lines.append(f"  level {r['level']}  {r['setting']:<14} {r['samples_needed'] or '-':>4}  "
                     f"(target {100 * r['baseline_pass']:.1f}%)")
    return "\n".join(lines)


def plot(path: Path, table, ks) -> bool:
    """pass@k against k, a panel per level, a line per setting (Figure 3's left columns)."""
    plt = pyplot()
    if plt is None:
        return False
    level_ids = sorted({r["level"] for r in table})
    figure, axes = plt.subplots(1, len(level_ids), figsize=(3.2 * len(level_ids), 3.2), squeeze=False)
    for axis, level in zip(axes[0], level_ids):
        for r in (r for r in table if r["level"] == level):
            axis.plot(ks, [r[f"pass@{k}"] for k in ks], "o-" if r["method"] == "spl" else "x--", label=r["setting"])
        axis.set_xscale("log", base=2)
        axis.set_title(f"level {level}")
        axis.set_xlabel("N (samples)")
    axes[0][0].set_ylabel("best-of-N accuracy")
    axes[0][-1].legend(fontsize=7)
    save_figure(plt, figure, path, dpi=110)
    return True


def main(argv=None) -> int:
    p = experiment_parser(__doc__, "runs/exp_best_of_n", "DPO at T = 1 and 1.2, SPL at 1.2; 3 problems at levels 1-3, "
                                                       "8 samples, a few training steps",
                          "SPL alpha/beta values (default %s)" % ",".join(f"{r:g}" for r in SPL_RATIOS),
                          BETA, STEPS, LR, "training steps per policy")
    p.add_argument("--temperatures", help="DPO's token temperatures (default %s)"
                   % ",".join(f"{t:g}" for t in TEMPERATURES))
    p.add_argument("--no-reference", dest="reference", action="store_false", help="leave out the reference model")
    p.add_argument("--reference-only", action="store_true", help="only the reference model (no training): its "
                                                                  "pass@k by level")
    p.add_argument("--num-samples", type=int, help=f"n samples per problem (default {NUM_SAMPLES})")
    p.add_argument("--levels", help="difficulty levels, comma-separated (default %s)" % ",".join(map(str, LEVELS)))
    p.add_argument("--problems", type=int, help=f"held-out problems per level, of 32 (default {PROBLEMS})")
    p.add_argument("--max-new-tokens", type=int, help=f"default {MAX_NEW_TOKENS}")
    p.add_argument("--anchor", type=float, default=ANCHOR, help=f"the option-mass anchor's weight, with whole prompts "
                   f"per batch (default {ANCHOR:g}; 0: plain loss on random batches of {BATCH_SIZE} pairs)")
    p.add_argument("--pairs", choices=("model", "world"), default="model",
                   help="preference pairs: the arithmetic model's own samples judged correct vs incorrect (default) "
                        "or the world's strategy pairs (arithmetic_pairs_soft.jsonl: short solutions preferred)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = QUICK if args.quick else {}
    temperatures = parse_list(p, "--temperatures", args.temperatures, quick.get("temperatures", TEMPERATURES))
    ratios = parse_list(p, "--ratios", args.ratios, quick.get("ratios", SPL_RATIOS))
    steps = option(args.steps, quick, "steps", STEPS)
    num_samples = option(args.num_samples, quick, "num_samples", NUM_SAMPLES)
    per_level = option(args.problems, quick, "problems", PROBLEMS)
    levels = tuple(sorted(set(parse_list(p, "--levels", args.levels, quick.get("levels", LEVELS), int))))
    max_new_tokens = option(args.max_new_tokens, quick, "max_new_tokens", MAX_NEW_TOKENS)
    checks = [(all(t > 0 for t in temperatures), f"--temperatures must be > 0, got {temperatures}"),
              (all(r > 1 for r in ratios), f"--ratios: SPL needs alpha/beta > 1 (1 is DPO), got {ratios}"),
              (args.beta > 0 and args.lr > 0, f"--beta and --lr must be > 0, got {args.beta}, {args.lr}"),
              (steps > 0 and num_samples >= 1 and max_new_tokens >= 1,
               f"need --steps > 0, --num-samples >= 1, --max-new-tokens >= 1 "
               f"(got {steps}, {num_samples}, {max_new_tokens})"),
              (1 <= per_level <= 32, f"--problems must be in 1..32, got {per_level}"),
              (args.anchor >= 0, f"--anchor must be >= 0, got {args.anchor}"),
              (set(levels) <= {1, 2, 3, 4, 5}, f"--levels must be among 1..5, got {levels}")]
    check_arguments(p, checks)

    import torch

    from spl.cli import checkpoint_parameters, choose_threads
    from data.world.arithmetic import ARITHMETIC_MODEL_DIR

    if not (ARITHMETIC_MODEL_DIR / "config.json").is_file():
        p.error(f"{ARITHMETIC_MODEL_DIR}: no arithmetic model; build it with `python -m data.world.build "
                f"--train-arithmetic-model`")
    choose_threads(args.threads, checkpoint_parameters(ARITHMETIC_MODEL_DIR), "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = ([Setting("reference", 1.0, 1.0)] if args.reference or args.reference_only else []) + \
        ([] if args.reference_only else [Setting("dpo", 1.0, t) for t in temperatures]
         + [Setting("spl", r, 1.0) for r in ratios])
    ks = ks_up_to(num_samples)
    print(f"experiment 3, best-of-N: {len(settings)} settings x {per_level} held-out problems at each of levels "
          f"{', '.join(map(str, levels))} x "
          f"{num_samples} samples; policies: DPO and SPL at alpha/beta in {', '.join(f'{r:g}' for r in ratios)} "
          f"(beta = {args.beta:g}), {steps} steps at lr {args.lr:g}", flush=True)
    started = time.perf_counter()
    table, problems, samples, runs = run_experiment(out, settings, steps, args.lr, args.beta, num_samples, levels,
                                                    per_level, quick.get("max_pairs"), max_new_tokens, args.seed,
                                                    args.anchor, args.pairs, args.progress)
    seconds = time.perf_counter() - started
    write_results(out, settings, table, problems, samples, num_samples, ks, args.seed, {
        "runs": runs, "model": str(ARITHMETIC_MODEL_DIR), "pairs": args.pairs, "beta": args.beta, "steps": steps, "lr": args.lr,
        "train_args": [str(a) for a in training_args(args.anchor)], "num_samples": num_samples,
        "levels": list(levels),
        "problems_per_level": per_level, "max_new_tokens": max_new_tokens, "seed": args.seed, "ks": ks,
        "interval": {"level": LEVEL, "resamples": RESAMPLES, "seed": args.seed}, "seconds": round(seconds, 1)})
    return 0


def write_results(out: Path, settings, table, problems, samples, num_samples: int, ks, seed: int,
                  experiment: dict) -> None:
    """Print the tables and write pass_at_k.csv, problems.csv, samples.jsonl, differences.csv and matching.csv
    (when DPO T = 1 and another policy were run), experiment.json and best_of_n.png."""
    labels = [s.label for s in settings]
    dpo = Setting("dpo", 1.0, 1.0).label  # the baseline of the differences and of Figure 9
    baseline = dpo if dpo in labels else None
    others = [label for label in labels if label != baseline and not label.startswith("reference")]
    shown_ks = [k for k in PAPER_KS if k in ks] or ks
    differences = difference_rows(problems, baseline, others, shown_ks, seed=seed) if baseline and others else []
    matching = matching_rows(problems, baseline, others, num_samples, shown_ks) if differences else []
    print("\nbest-of-N accuracy (pass@k), unique final answers and answered fraction (Tables 1-3, Figure 10):\n")
    print(format_tables(table, ks))
    if differences:
        print(format_differences(differences, matching, num_samples) + "\n")
    written = [write_csv(out / "pass_at_k.csv", table), write_csv(out / "problems.csv", problems),
               write_jsonl(out / "samples.jsonl", samples)]
    if differences:
        written += [write_csv(out / "differences.csv", differences), write_csv(out / "matching.csv", matching)]
    experiment = {"settings": [dataclasses.asdict(s) | {"label": s.label} for s in settings], **experiment}
    written.append(write_json(out / "experiment.json", experiment))
    if plot(out / "best_of_n.png", table, ks):
        written.append(out / "best_of_n.png")
    print(f"wrote {', '.join(map(str, written))} ({experiment['seconds']:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
