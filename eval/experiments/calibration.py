"""Experiment 4, calibration (the paper's Section 4.3, Figure 4): ECE, Brier and accuracy on multiple choice.

    python eval/experiments/calibration.py            # reference, DPO, SPL at alpha/beta in {2, 4, 10, 20}, beta = 0.1
    python eval/experiments/calibration.py --quick    # reference, DPO and alpha/beta = 10, a few steps (the test's run)
    python eval/experiments/calibration.py --held-out 0   # train on all 48 items' pairs, score them all

The world's multiple-choice items are questions about made-up towns in the paper's Appendix D prompt, with four
lettered options. Raters hold beliefs p over the options (top belief in [0.3, 0.9]) and each item's true letter
was drawn from p, so a policy equal to p is calibrated by construction. The SFT text answered with p^(1/2)
normalised, ten answers per item, and the 2.34M reference model learned that only weakly: its letter
probabilities are 0.19 in total variation from p^(1/2) on average and its expected accuracy is 0.33 against the
raters' 0.62, so it is a weak prior whose confidence roughly matches its accuracy. LoRA policies are trained by
train.py on the items' preference pairs (`mcq_pairs_soft.jsonl` by default: chosen_prob = p_i / (p_i + p_j),
Eq. 2; `--pairs counts` reads mcq_pairs.jsonl, 4 comparisons per pair, and the closed form then uses the
Bradley-Terry fit of those rounded counts). Their optimum over the letters (Prop. A.1) is

    pi* ∝ pi_ref^(beta/alpha) p^(1/alpha):

DPO (alpha = beta = 0.1) raises p to the 10th power and is overconfident; alpha = 1 (alpha/beta = 10) gives p
times a mild prior pi_ref^0.1, calibrated (Cor. 3.1); alpha/beta = 20 gives about p^(1/2), underconfident. So
calibration should improve with the global temperature up to alpha = 1 and not beyond. The argmax of p^c is the
argmax of p for any c > 0, so, up to the prior, accuracy should not move.

Two splits. The policies train on the pairs of the first 32 items only ("trained": how the learned distribution
over the letters relates to the raters' beliefs it was trained on, where the closed form applies); the last 16
(`--held-out`, the items having been drawn at random when the world was built) have no pairs in training
("held-out": whether the change in confidence carries over to questions the preference data never asked, as in
the paper, where the policies are trained on chat preferences and scored on MMLU and TruthfulQA; here the
reference model has seen those items only in its SFT text). The probabilities are Appendix D's: the model's
next-token probabilities of the letters A-D after the prompt (as a user turn in the chat format), normalised
over the four (`eval.metrics.multiple_choice_probabilities`).

Metrics per policy, against the items' drawn true letters: ECE (15 equal-width bins on top-label confidence),
Brier (summed over classes, in [0, 2]) and accuracy (`eval.metrics`). With 32 and 16 items one draw of the
labels is noisy (even the raters' own beliefs p, calibrated by construction, score a high ECE on it), so the
table also gives the same metrics in expectation over labels drawn from p (noise-free for Brier and accuracy, Monte-Carlo
over label draws for ECE) and the mean confidence (the mean top-label probability) minus the expected accuracy:
positive is overconfident. Even in expectation ECE is biased upwards with so few items in 15 bins, the more so
the more the confidences spread over bins: p's own score (a row of the table) is the floor for a sharp
calibrated predictor here, while a predictor whose confidences all sit near one value (like the
reference) can score lower.

    E_y~p[Brier(q, y)] = 1 - 2 p.q + |q|^2,      E_y~p[acc] = p[argmax q]

Outputs in --out: `calibration.csv` (the printed tables, a row per policy and split), `probabilities.csv` (per
policy and item: its split, the letter probabilities, the raters' beliefs and the true letter) and
`calibration.png` when matplotlib is installed. Training runs live in --out/runs/ and are reused when the
configuration is unchanged.

Training: LoRA r = 8 (lora_alpha 16) on all seven projections, 10 warmup steps then cosine decay, batch 16,
300 steps at a peak lr of 3e-3, given explicitly so that changes to train.py's defaults do not change this
experiment (why these: the README's Experiments section).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from eval.experiments.common import (alpha_for, check_arguments, experiment_parser, option, parse_list, pyplot, run_name,
                             save_figure, write_csv)
# torch, and the library modules that load it, are imported inside the functions that use them: --help and usage
# errors then answer before torch's seconds of start-up.

RATIOS = (1.0, 2.0, 4.0, 10.0, 20.0)  # alpha / beta; 1 is DPO
BETA = 0.1
STEPS = 300
LR = 3e-3
TRAIN_ARGS = ("--lora-rank", 8, "--lora-alpha", 16, "--warmup-steps", 10, "--batch-size", 16, "--log-every", 50)
QUICK = dict(ratios=(1.0, 10.0), steps=14)
LETTERS = "ABCD"
N_BINS = 15
LABEL_DRAWS = 2000  # label draws from p for the expected ECE
HELD_OUT = 16  # the last items (ids mcq-32 .. mcq-47) get no preference pairs in training


# ---- the math: pure functions over [N, C] probabilities ---------------------------------------------------------

def expected_brier(probs: np.ndarray, beliefs: np.ndarray) -> float:
    """Mean over items of E_{y ~ p}[sum_c (q_c - [c = y])^2] = 1 - 2 p.q + |q|^2 (q = probs, p = beliefs)."""
    return float((1.0 - 2.0 * (beliefs * probs).sum(1) + (probs ** 2).sum(1)).mean())


def expected_accuracy(probs: np.ndarray, beliefs: np.ndarray) -> float:
    """Mean over items of P_{y ~ p}(y = argmax q) = p[argmax q] (the first argmax on ties, as eval.metrics)."""
    return float(beliefs[np.arange(len(probs)), probs.argmax(1)].mean())


def expected_ece(probs: np.ndarray, beliefs: np.ndarray, draws: int, seed: int = 0, n_bins: int = N_BINS) -> float:
    """Monte-Carlo mean of ECE(probs, y) over `draws` label vectors y_n ~ p_n (independent per item)."""
    from eval.metrics import expected_calibration_error

    rng = np.random.default_rng(seed)
    cumulative = beliefs.cumsum(1)  # (N, C)
    total = 0.0
    for _ in range(draws):
        u = rng.random((len(beliefs), 1))  # (N, 1)
        labels = np.minimum((u > cumulative).sum(1), beliefs.shape[1] - 1)  # (N,) inverse-CDF draw
        total += expected_calibration_error(probs, labels, n_bins)
    return total / draws


def policy_row(name: str, alpha, beta, split: str, probs: np.ndarray, labels: np.ndarray, beliefs: np.ndarray,
               closed_form: np.ndarray | None, draws: int) -> dict:
    """One row of the table: the paper's metrics on the drawn labels, their expectations over y ~ p, confidence,
    on the items of one split ("trained" or "held-out")."""
    from eval.metrics import accuracy, brier_score, expected_calibration_error

    confidence = float(probs.max(1).mean())
    tv = float(0.5 * np.abs(probs - closed_form).sum(1).mean()) if closed_form is not None else ""
    return {"policy": name, "alpha": alpha, "beta": beta,
            "alpha_over_beta": alpha / beta if alpha != "" else "", "split": split, "items": len(probs),
            "ece": expected_calibration_error(probs, labels, N_BINS), "brier": brier_score(probs, labels),
            "accuracy": accuracy(probs, labels),
            "expected_ece": expected_ece(probs, beliefs, draws), "expected_brier": expected_brier(probs, beliefs),
            "expected_accuracy": expected_accuracy(probs, beliefs), "mean_confidence": confidence,
            "overconfidence": confidence - expected_accuracy(probs, beliefs),
            "tv_vs_closed_form": tv}


# ---- running it ------------------------------------------------------------------------------------------------

def split_items(items, held_out: int) -> dict:
    """{"trained": the first len(items) - held_out items, "held-out": the last held_out} (the items were drawn at
    random when the world was built, so the last ones are a random subset); no "held-out" key when it is 0."""
    if not 0 <= held_out < len(items):
        raise ValueError(f"split_items: held_out must be in 0..{len(items) - 1}, got {held_out}")
    splits = {"trained": list(items[:len(items) - held_out])}
    if held_out:
        splits["held-out"] = list(items[len(items) - held_out:])
    return splits


def training_pairs(out: Path, source: Path, item_ids) -> Path:
    """The records of `source` whose "id" is one of item_ids, copied into out (the whole file if that is all)."""
    wanted = set(item_ids)
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["id"] in wanted]
    if len(kept) == len(lines):
        return source
    path = out / f"{source.stem}_{len(item_ids)}items.jsonl"
    path.write_text("".join(kept), encoding="utf-8")
    return path


def run_experiment(out: Path, ratios, beta: float, steps: int, lr: float = LR, pairs: str = "soft",
                   draws: int = LABEL_DRAWS, held_out: int = HELD_OUT, progress: bool = False):
    """Train on the pairs of the trained split's items; score the population, the reference and every trained
    policy on each split. -> (table rows, probability rows)."""
    import torch

    from data.world import counts_population, load_world
    from eval.metrics import multiple_choice_probabilities
    from eval.experiments.policies import load_policy, train_policy
    from spl.theory import optimal_policy

    world = load_world()
    items = list(world.mcq)
    prompts = [item.prompt for item in items]
    labels = np.array([LETTERS.index(item.correct) for item in items])  # (N,)
    beliefs = np.array([item.population for item in items], dtype=np.float64)  # (N, 4)
    splits = split_items(items, held_out)
    split_of = {item.id: name for name, members in splits.items() for item in members}
    in_split = {name: np.array([split_of[item.id] == name for item in items]) for name in splits}  # (N,) masks
    data = training_pairs(out, world.files["mcq_pairs" + ("_soft" if pairs == "soft" else "")],
                          [item.id for item in splits["trained"]])
    # What the training file encodes: p itself, or for the counts file (K comparisons per pair, each split rounded
    # to 1/K) the Bradley-Terry fit of those counts. Only the closed form uses it; the labels stay drawn from p.
    k = world.comparisons_per_pair["mcq"]
    encoded = beliefs if pairs == "soft" else np.array([counts_population(item.population, k) for item in items])

    model, tokenizer = load_policy()
    reference = multiple_choice_probabilities(model, tokenizer, prompts).double().numpy()  # (N, 4)
    scored = [("population", "", "", beliefs, None), ("reference", "", "", reference, None)]
    for ratio in ratios:
        alpha = alpha_for(ratio, beta)
        started = time.perf_counter()
        run_dir = train_policy(out / "runs" / run_name(alpha, beta), data, alpha, beta, steps=steps,
                               extra=TRAIN_ARGS + ("--lr", lr), progress=progress)
        model, tokenizer = load_policy(run_dir)
        probs = multiple_choice_probabilities(model, tokenizer, prompts).double().numpy()  # (N, 4)
        closed_form = optimal_policy(torch.from_numpy(reference), torch.from_numpy(encoded), alpha, beta).numpy()
        tv = 0.5 * np.abs(probs - closed_form)[in_split["trained"]].sum(1).mean()
        print(f"  alpha = {alpha:g}, beta = {beta:g}: mean TV from the closed form over the trained items' letters "
              f"{tv:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
        scored.append(("DPO" if math.isclose(alpha, beta) else "SPL", alpha, beta, probs, closed_form))

    table, probabilities = [], []
    for split, members in in_split.items():
        for name, alpha, beta_, probs, closed_form in scored:
            table.append(policy_row(name, alpha, beta_, split, probs[members], labels[members], beliefs[members],
                                    None if closed_form is None else closed_form[members], draws))
    for name, alpha, beta_, probs, closed_form in scored:
        for item, label, row, belief in zip(items, labels, probs, beliefs):
            probabilities.append({"policy": name, "alpha": alpha, "beta": beta_, "item": item.id,
                                  "split": split_of[item.id], "label": int(label),
                                  **{f"p_{letter}": float(x) for letter, x in zip(LETTERS, row)},
                                  **{f"belief_{letter}": float(x) for letter, x in zip(LETTERS, belief)}})
    return table, probabilities


def format_table(table) -> str:
    lines, split = [], None
    for row in table:
        if row["split"] != split:
            split = row["split"]
            lines += ([""] if lines else []) + [f"{split} items ({row['items']}):",
                      f"{'policy':<10} {'a/b':>5}  {'ECE':>6} {'Brier':>6} {'acc':>6}  {'E[ECE]':>6} {'E[Brier]':>8} "
                      f"{'E[acc]':>6}  {'conf':>6} {'overconf':>8}  {'TV closed form':>14}"]
        ratio = f"{row['alpha_over_beta']:g}" if row["alpha_over_beta"] != "" else ""
        tv = f"{row['tv_vs_closed_form']:.4f}" if row["tv_vs_closed_form"] != "" else ""
        lines.append(f"{row['policy']:<10} {ratio:>5}  {row['ece']:>6.3f} {row['brier']:>6.3f} "
                     f"{row['accuracy']:>6.3f}  {row['expected_ece']:>6.3f} {row['expected_brier']:>8.3f} "
                     f"{row['expected_accuracy']:>6.3f}  {row['mean_confidence']:>6.3f} "
                     f"{row['overconfidence']:>+8.3f}  {tv:>14}")
    return "\n".join(lines)


def plot(path: Path, table) -> bool:
    """Expected ECE, Brier and accuracy against alpha/beta (Figure 4's panels), a line per split; the reference
    as a horizontal line in its split's colour."""
    plt = pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    for axis, key, label in zip(axes, ("ece", "brier", "accuracy"), ("ECE", "Brier score", "accuracy")):
        for index, split in enumerate(dict.fromkeys(row["split"] for row in table)):
            rows = [row for row in table if row["split"] == split]
            runs = [row for row in rows if row["alpha"] != ""]
            reference = next(row for row in rows if row["policy"] == "reference")
            axis.plot([row["alpha_over_beta"] for row in runs], [row[f"expected_{key}"] for row in runs], "o-",
                      color=f"C{index}", label=f"policies, {split} items")
            axis.axhline(reference[f"expected_{key}"], linestyle="-.", color=f"C{index}",
                         label=f"reference, {split} items")
        axis.set_xscale("log")
        axis.set_xlabel("alpha / beta (1 = DPO)")
        axis.set_ylabel(f"{label} (expected over labels from p)")
    axes[0].legend(fontsize=8)
    save_figure(plt, figure, path, dpi=120)
    return True


def main(argv=None) -> int:
    p = experiment_parser(__doc__, "runs/exp_calibration", "DPO and alpha/beta = 10 only, %d steps" % QUICK["steps"],
                          "comma-separated alpha/beta values, 1 = DPO (default %s)"
                   % ",".join(f"{r:g}" for r in RATIOS),
                          BETA, STEPS, LR, "training steps per run")
    p.add_argument("--pairs", choices=("soft", "counts"), default="soft",
                   help="mcq_pairs_soft.jsonl (exact soft labels) or mcq_pairs.jsonl (4 counts per pair)")
    p.add_argument("--label-draws", type=int, help=f"label draws for the expected ECE (default {LABEL_DRAWS}; "
                                                   f"--quick 200)")
    p.add_argument("--held-out", type=int, default=HELD_OUT,
                   help=f"items (the last ones) left out of training, scored apart (default {HELD_OUT}; 0: none)")
    args = p.parse_args(argv)
    ratios = parse_list(p, "--ratios", args.ratios, QUICK["ratios"] if args.quick else RATIOS)
    steps = option(args.steps, QUICK if args.quick else {}, "steps", STEPS)
    draws = args.label_draws if args.label_draws is not None else (200 if args.quick else LABEL_DRAWS)
    check_arguments(p, [(all(r >= 1 for r in ratios), f"--ratios: alpha/beta must be >= 1 (1 is DPO), got {ratios}"),
                        (args.beta > 0 and args.lr > 0, f"--beta and --lr must be > 0, got {args.beta}, {args.lr}"),
                        (steps > 0 and draws > 0, f"--steps and --label-draws must be > 0, got {steps}, {draws}"),
                        (0 <= args.held_out <= 40, f"--held-out must be in 0..40, got {args.held_out}")])

    import torch

    from spl.cli import checkpoint_parameters, choose_threads
    from data.world import MODEL_DIR

    choose_threads(args.threads, checkpoint_parameters(MODEL_DIR), "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"experiment 4, calibration: reference, then alpha/beta in {', '.join(f'{r:g}' for r in ratios)} at "
          f"beta = {args.beta:g} (1 = DPO); {steps} steps each, {args.pairs} pairs of {48 - args.held_out} items, "
          f"{args.held_out} held out")
    table, probabilities = run_experiment(out, ratios, args.beta, steps, args.lr, args.pairs, draws, args.held_out,
                                          args.progress)
    print("\n" + format_table(table))
    print("\nECE, Brier, acc: against each item's drawn true letter; E[...]: in expectation over letters drawn from "
          "the raters' beliefs p; conf: mean top-letter probability; overconf = conf - E[acc]")
    write_csv(out / "calibration.csv", table)
    write_csv(out / "probabilities.csv", probabilities)
    written = [out / "calibration.csv", out / "probabilities.csv"]
    if plot(out / "calibration.png", table):
        written.append(out / "calibration.png")
    print("\nwrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
