"""Experiment 1, representation: learned vs closed-form distributions over the world's opinion options.

    python eval/experiments/representation.py          # alpha/beta in {1, 1.1, 1.2, 1.5, 2, 4, 11} at beta 0.1; alpha = 1
    python eval/experiments/representation.py --quick  # DPO and alpha = 1 only, a few steps (the test's run)

One LoRA policy per (alpha, beta) is trained by train.py on the opinion preference pairs (soft labels by default:
one record per option pair with chosen_prob = p_i / (p_i + p_j), the exact Bradley-Terry form of the population
p; `--pairs counts` reads opinion_pairs.jsonl, K = 20 comparisons per pair, and the closed form then uses the
Bradley-Terry fit of those rounded counts). Each question's learned distribution over its options (sequence
probabilities normalised over the options, `data.world.report.option_distributions`) is set beside the closed-form
optimum (Prop. A.1)

    pi*(y) ∝ pi_ref(y)^(beta/alpha) p(y)^(1/alpha)

with pi_ref the reference model's normalised distribution. What the paper predicts:
  Prop. 3.1  alpha = beta (DPO): pi* ∝ pi_ref p^(1/beta) = pi_ref p^10 at beta = 0.1; the majority takes almost all.
  Prop. 3.2  alpha > beta: preferences raised to 1/alpha only; the distribution flattens as alpha/beta grows.
  Cor. 3.1   alpha = 1: pi* ∝ pi_ref^beta p, the population itself up to a mild reference prior.
For a fixed beta, pi* = softmax(log(pi_ref^beta p) / alpha) is one distribution at temperature alpha, so its
entropy rises monotonically with alpha (an exact invariant the test checks on the saved closed forms).

Outputs in --out: `runs.csv` (the printed table: per run the mean / max total variation learned vs closed form,
and, averaged over questions, the probability of the population's majority option, the entropy in nats and the
total variation from the population, learned and closed form, and the option mass (the probability the policy
keeps on the options at all, which the loss does not determine: see data/world/report.py); plus rows for the
population and the reference),
`distributions.csv` (per run, question and option: population, reference, learned, closed form), and
`representation.png` when matplotlib is installed. Training runs live in --out/runs/ and are reused when the
configuration is unchanged.

Training: LoRA r = 8 (lora_alpha 16) on all seven projections, 10 warmup steps then cosine decay, batch 16,
600 steps at a peak lr of 6e-3, given explicitly so that changes to train.py's defaults do not change this
experiment (why these: the README's Experiments section). The probability the policies keep on the options
falls as they train: the loss fixes only ratios between options (see data/world/report.py).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from eval.experiments.common import (alpha_for, check_arguments, experiment_parser, option, parse_list, pyplot, run_name,
                             save_figure, write_csv)
# torch, and the library modules that load it, are imported inside the functions that use them: --help and usage
# errors then answer before torch's seconds of start-up.

RATIOS = (1.0, 1.1, 1.2, 1.5, 2.0, 4.0, 11.0)  # alpha / beta, the paper's sweep (Appendix B.3) less 1.3
BETA = 0.1
STEPS = 600
LR = 6e-3
TRAIN_ARGS = ("--lora-rank", 8, "--lora-alpha", 16, "--warmup-steps", 10, "--batch-size", 16, "--log-every", 50)
QUICK = dict(ratios=(1.0,), steps=30)  # DPO and alpha = 1 only


# ---- the math: pure functions over distributions ----------------------------------------------------------------

def entropy(probs) -> float:
    """Shannon entropy in nats, H(p) = -sum_i p_i log p_i (0 log 0 = 0)."""
    return -sum(p * math.log(p) for p in probs if p > 0)


def total_variation(p, q) -> float:
    """TV(p, q) = 1/2 sum_i |p_i - q_i|."""
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


def sweep(ratios, beta: float, alpha_one: bool = True) -> list[tuple[float, float]]:
    """(alpha, beta) per run: alpha = ratio * beta for each ratio, and alpha = 1 (ratio 1 / beta) if asked and not
    already there; sorted by alpha. Rounded so that 1.1 * 0.1 is 0.11, the run's name and config."""
    alphas = {alpha_for(ratio, beta) for ratio in ratios}
    if alpha_one:
        alphas.add(1.0)
    return [(alpha, beta) for alpha in sorted(alphas)]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _majority(question: dict, key: str) -> float:
    """The probability that distribution `key` gives the option most of the population prefers."""
    population = question["population"]
    return question[key][max(range(len(population)), key=population.__getitem__)]


def summarise(report: dict) -> dict:
    """One run's row of the table from `data.world.report.opinion_report`'s output: means over questions."""
    rows, alpha, beta = report["questions"], report["alpha"], report["beta"]
    return {"policy": "DPO" if math.isclose(alpha, beta) else "SPL", "alpha": alpha, "beta": beta,
            "alpha_over_beta": alpha / beta,
            "mean_tv_learned_vs_closed_form": report["mean_tv_learned_vs_closed_form"],
            "max_tv_learned_vs_closed_form": report["max_tv_learned_vs_closed_form"],
            **{f"majority_{key}": _mean(_majority(q, key) for q in rows) for key in ("learned", "closed_form")},
            **{f"entropy_{key}": _mean(entropy(q[key]) for q in rows) for key in ("learned", "closed_form")},
            **{f"tv_{key}_vs_population": _mean(total_variation(q[key], q["population"]) for q in rows)
               for key in ("learned", "closed_form")},
            "option_mass": report["mean_learned_option_mass"]}


def baseline_rows(report: dict) -> list[dict]:
    """Rows for the population and the reference model (the same in every run) in the table's columns: their
    values fill both the learned and the closed-form columns, the run-only columns are empty."""
    rows, out = report["questions"], []
    for name in ("population", "reference"):
        majority = _mean(_majority(q, name) for q in rows)
        ent = _mean(entropy(q[name]) for q in rows)
        tv = _mean(total_variation(q[name], q["population"]) for q in rows)
        out.append({"policy": name, "alpha": "", "beta": "", "alpha_over_beta": "",
                    "mean_tv_learned_vs_closed_form": "", "max_tv_learned_vs_closed_form": "",
                    "majority_learned": majority, "majority_closed_form": majority,
                    "entropy_learned": ent, "entropy_closed_form": ent,
                    "tv_learned_vs_population": tv, "tv_closed_form_vs_population": tv,
                    "option_mass": report["mean_reference_option_mass"] if name == "reference" else ""})
    return out


# ---- running it ------------------------------------------------------------------------------------------------

def training_questions(world, pairs: str):
    """The questions with the population the training file encodes: p itself for soft labels; for the counts file
    (K comparisons per pair, each split rounded to 1/K) the Bradley-Terry fit of those counts."""
    from data.world import counts_population

    if pairs == "soft":
        return list(world.opinions)
    k = world.comparisons_per_pair["opinion"]
    return [dataclasses.replace(q, population=tuple(counts_population(q.population, k))) for q in world.opinions]


def run_experiment(out: Path, ratios, beta: float, steps: int, lr: float = LR, pairs: str = "soft",
                   alpha_one: bool = True, progress: bool = False):
    """Train (or reuse) every run of the sweep and compare. -> (table rows, distribution rows)."""
    from data.world import load_world
    from data.world.report import opinion_report
    from eval.experiments.policies import load_policy, train_policy

    world = load_world()
    data = world.files["opinion_pairs" + ("_soft" if pairs == "soft" else "")]
    questions = training_questions(world, pairs)
    table, distributions, report = [], [], None
    for alpha, beta_ in sweep(ratios, beta, alpha_one):
        started = time.perf_counter()
        run_dir = train_policy(out / "runs" / run_name(alpha, beta_), data, alpha, beta_, steps=steps,
                               extra=TRAIN_ARGS + ("--lr", lr), progress=progress)
        model, tokenizer = load_policy(run_dir)
        report = opinion_report(model, tokenizer, questions, alpha, beta_)
        table.append(summarise(report))
        print(f"  alpha = {alpha:g}, beta = {beta_:g}: mean TV learned vs closed form "
              f"{report['mean_tv_learned_vs_closed_form']:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
        for q in report["questions"]:
            for i, option in enumerate(q["options"]):
                distributions.append({"alpha": alpha, "beta": beta_, "alpha_over_beta": alpha / beta_,
                                      "question": q["prompt"], "option": option,
                                      **{key: q[key][i] for key in ("population", "reference", "learned",
                                                                    "closed_form")}})
    return baseline_rows(report) + table, distributions


def _mass(row) -> str:
    return f"{row['option_mass']:>6.3f}" if row["option_mass"] != "" else f"{'':>6}"


def format_table(table) -> str:
    head = (f"{'policy':<10} {'a/b':>5} {'alpha':>6}  {'TV(learned, closed form)':>24}  {'p(majority)':>17}  "
            f"{'entropy (nats)':>17}  {'TV from population':>18}  {'option':>6}")
    sub = f"{'':<10} {'':>5} {'':>6}  {'mean':>11} {'max':>12}  {'learned':>8} {'closed':>8}  " \
          f"{'learned':>8} {'closed':>8}  {'learned':>8} {'closed':>9}  {'mass':>6}"
    lines = [head, sub]
    for row in table:
        if row["alpha"] == "":
            lines.append(f"{row['policy']:<10} {'':>5} {'':>6}  {'':>11} {'':>12}  {row['majority_learned']:>8.3f} "
                         f"{'':>8}  {row['entropy_learned']:>8.3f} {'':>8}  {row['tv_learned_vs_population']:>8.3f}"
                         f"{'':>10}  {_mass(row)}")
            continue
        lines.append(f"{row['policy']:<10} {row['alpha_over_beta']:>5g} {row['alpha']:>6g}  "
                     f"{row['mean_tv_learned_vs_closed_form']:>11.4f} {row['max_tv_learned_vs_closed_form']:>12.4f}  "
                     f"{row['majority_learned']:>8.3f} {row['majority_closed_form']:>8.3f}  "
                     f"{row['entropy_learned']:>8.3f} {row['entropy_closed_form']:>8.3f}  "
                     f"{row['tv_learned_vs_population']:>8.3f} {row['tv_closed_form_vs_population']:>9.3f}  "
                     f"{_mass(row)}")
    return "\n".join(lines)


def plot(path: Path, table) -> bool:
    """p(majority) and entropy against alpha/beta, learned and closed form, population and reference as lines."""
    plt = pyplot()
    if plt is None:
        return False
    runs = [row for row in table if row["alpha"] != ""]
    base = {row["policy"]: row for row in table if row["alpha"] == ""}
    ratios = [row["alpha_over_beta"] for row in runs]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, key, label in ((axes[0], "majority", "p(majority option)"), (axes[1], "entropy", "entropy (nats)")):
        axis.plot(ratios, [row[f"{key}_learned"] for row in runs], "o-", label="learned")
        axis.plot(ratios, [row[f"{key}_closed_form"] for row in runs], "x--", label="closed form (Prop. A.1)")
        for name, style in (("population", ":"), ("reference", "-.")):
            axis.axhline(base[name][f"{key}_learned"], linestyle=style, color="gray", label=name)
        axis.set_xscale("log")
        axis.set_xlabel("alpha / beta (beta = %g)" % runs[0]["beta"])
        axis.set_ylabel(label)
    axes[0].legend()
    save_figure(plt, figure, path, dpi=120)
    return True


def main(argv=None) -> int:
    p = experiment_parser(__doc__, "runs/exp_representation", "DPO and alpha = 1 only, %d steps" % QUICK["steps"],
                          "comma-separated alpha/beta values (default %s)" % ",".join(map(str, RATIOS)),
                          BETA, STEPS, LR, "training steps per run")
    p.add_argument("--no-alpha-one", dest="alpha_one", action="store_false", help="leave out the alpha = 1 run")
    p.add_argument("--pairs", choices=("soft", "counts"), default="soft",
                   help="opinion_pairs_soft.jsonl (exact soft labels) or opinion_pairs.jsonl (K counts per pair)")
    args = p.parse_args(argv)
    ratios = parse_list(p, "--ratios", args.ratios, QUICK["ratios"] if args.quick else RATIOS)
    steps = option(args.steps, QUICK if args.quick else {}, "steps", STEPS)
    check_arguments(p, [(all(r >= 1 for r in ratios), f"--ratios: alpha/beta must be >= 1 (1 is DPO), got {ratios}"),
                        (args.beta > 0 and args.lr > 0, f"--beta and --lr must be > 0, got {args.beta}, {args.lr}"),
                        (steps > 0, f"--steps must be > 0, got {steps}")])

    import torch

    from spl.cli import checkpoint_parameters, choose_threads
    from data.world import MODEL_DIR

    choose_threads(args.threads, checkpoint_parameters(MODEL_DIR), "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"experiment 1, representation: alpha/beta in {', '.join(f'{r:g}' for r in ratios)} at beta = "
          f"{args.beta:g}{' and alpha = 1' if args.alpha_one else ''}; {steps} steps each, {args.pairs} pairs")
    table, distributions = run_experiment(out, ratios, args.beta, steps, args.lr, args.pairs, args.alpha_one,
                                         args.progress)
    print("\n" + format_table(table))
    write_csv(out / "runs.csv", table)
    write_csv(out / "distributions.csv", distributions)
    written = [out / "runs.csv", out / "distributions.csv"]
    if plot(out / "representation.png", table):
        written.append(out / "representation.png")
    print("\nwrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
