"""Experiment 4, calibration (Section 4.3, Figure 4): ECE, Brier and accuracy on multiple choice, held-out items first.

    python -m eval.experiments.calibration               # the world's 48 items, 24 held out; DPO, SPL 2, 10; 3 seeds
    python -m eval.experiments.calibration --items 96    # 96 new items and a base fine-tuned on them (see below)
    python -m eval.experiments.calibration --quick       # 16 new items, 8 held out, one seed, DPO and alpha = 1

The paper scores its base model (Mistral-7B after SFT) and the DPO and SPL policies trained from it with MMLU and
TruthfulQA, items none of them was trained on. The analogue here: multiple-choice items whose raters hold beliefs p
over the four letters, the true letter drawn from p (so p is calibrated by construction), a base model that knows
the items only through SFT text answering with p^(1/2) (hedging writers), and DPO and SPL trained from that base with
the main job's recipe (eval.experiments.policies: anchor, whole prompts, LoRA on the output head) on the soft-label
pairs of the first items only, over three training seeds; the last items are held out of preference training.

  --items world (default): the world's 48 items and its reference model (data/world/mcq.py, trained on them);
  --items N: N new items of the same law about towns the world never named (data/world/calibration_items.py) and a
     base made here, the world's reference after LoRA SFT on their answers, merged. Measured 2026-12-07: at 400 steps
     of 32 answers the base had not begun to learn them (docs/claims.md), so the
     default stays the world's own items.

Every policy and the base are scored on each split by the letters' probabilities after Appendix D's prompt
(eval.metrics.multiple_choice_probabilities), in expectation over the true letter y ~ p (Brier and accuracy in
closed form, ECE by Monte-Carlo over label draws):

    E[Brier(q)] = 1 - 2 p.q + |q|^2,   E[acc] = p[argmax q],   overconfidence = mean max q - E[acc]

with a 95% percentile bootstrap over the split's items (each resample draws the items with replacement and a fresh
label for each; the seeds' mean is taken inside, and a policy's difference from the base uses the same resamples,
so it is paired). On the trained items the closed form pi ∝ base^(beta/alpha) p^(1/alpha) (Prop. A.1) says what
each policy should reach (its TV is the convergence check). Held out, nothing predicts the policy; the diagnostics
say what training did to items it never saw: the confidence shift, the sharpening exponent gamma (the least-squares
slope of the policy's centred letter log-probs on the base's, pooled over the split's items: a policy that is the
base at temperature 1/gamma has exactly gamma), the share R^2 of the policy's centred log-probs that a sharpened
base explains, the share of items whose top letter moved, and the share of the change common to every item (a
letter habit carried from the trained items).

Outputs in --out: calibration.csv (per policy and split: metrics, intervals, diagnostics), seeds.csv (per seed),
probabilities.csv (per policy, seed and item), calibration.png (with matplotlib), run.json (commit, recipes).
"""
from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from eval.experiments.common import (alpha_for, check_arguments, experiment_parser, git_commit, option, parse_list,
                                     pyplot, run_name, save_figure, write_csv, write_json, write_jsonl)
# torch, and the library modules that load it, are imported inside the functions that use them.

RATIOS = (1.0, 2.0, 10.0)  # alpha / beta: DPO, global temperature 2, alpha = 1
BETA = 0.1
STEPS = 200  # the main job's
HELD_OUT = {"world": 24}  # half; generated items: half of --items
SEEDS = (0, 1, 2)
BASE_STEPS = 400  # LoRA SFT of the base: 13 epochs of the 960 answers at batch 32
LETTERS = "ABCD"
N_BINS = 15
LABEL_DRAWS = 2000  # label draws from p for the expected ECE
RESAMPLES = 1000  # bootstrap resamples of the items
MAX_PROMPT = 96  # the items' prompts run to 68 tokens with the new towns, past train.py's 64: nothing is cut
QUICK = dict(ratios=(1.0, 10.0), steps=4, items="16", held_out=8, seeds=(0,), base_steps=6, draws=200, resamples=200)


# ---- the math: pure functions over [N, C] probabilities and beliefs -------------------------------------------

def expected_brier_each(probs: np.ndarray, beliefs: np.ndarray) -> np.ndarray:
    """Per item E_{y ~ p}[sum_c (q_c - [c = y])^2] = 1 - 2 p.q + |q|^2  ([..., N])."""
    return 1.0 - 2.0 * (beliefs * probs).sum(-1) + (probs ** 2).sum(-1)


def expected_accuracy_each(probs: np.ndarray, beliefs: np.ndarray) -> np.ndarray:
    """Per item P_{y ~ p}(y = argmax q) = p[argmax q] (the first argmax on ties, as eval.metrics) ([..., N])."""
    return np.take_along_axis(beliefs, probs.argmax(-1)[..., None], -1)[..., 0]


def bin_index(confidence: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Bin b - 1 of confidence in ((b - 1) / n_bins, b / n_bins], as eval.metrics.expected_calibration_error."""
    return np.searchsorted(np.arange(n_bins + 1) / n_bins, confidence, side="left") - 1


def ece_rows(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """ECE of each row of [R, N] confidences and 0/1 correctness: (1/N) sum_b |sum_{i in b} (correct_i - conf_i)|,
    which is sum_b |B_b| / N |acc(B_b) - conf(B_b)| (eval.metrics) for R label draws or resamples at once."""
    rows, n = confidence.shape
    flat = (np.arange(rows)[:, None] * n_bins + bin_index(confidence, n_bins)).ravel()  # [R * N]
    sums = np.bincount(flat, weights=(correct - confidence).ravel(), minlength=rows * n_bins)  # [R * n_bins]
    return np.abs(sums.reshape(rows, n_bins)).sum(1) / n


def draw_labels(beliefs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One letter per row of beliefs [..., C] by inverse CDF ([...] integers)."""
    u = rng.random(beliefs.shape[:-1] + (1,))
    return np.minimum((u > beliefs.cumsum(-1)).sum(-1), beliefs.shape[-1] - 1)


def expected_ece(probs: np.ndarray, beliefs: np.ndarray, draws: int, seed: int = 0) -> float:
    """Monte-Carlo mean of ECE(probs, y) over `draws` label vectors y_n ~ p_n."""
    labels = draw_labels(np.broadcast_to(beliefs, (draws,) + beliefs.shape), np.random.default_rng(seed))  # [D, N]
    confidence = np.broadcast_to(probs.max(1), labels.shape)
    return float(ece_rows(confidence, (labels == probs.argmax(1)).astype(np.float64)).mean())


def bootstrap(probs: np.ndarray, base: np.ndarray, beliefs: np.ndarray, resamples: int, seed: int = 0) -> dict:
    """95% percentile intervals over items for one policy's seed-mean ECE, expected Brier and expected accuracy,
    and for their differences from the base on the same resamples. probs [S, N, C] (S seeds), base [N, C].
    Each resample draws N items with replacement and one fresh label per drawn item."""
    rng = np.random.default_rng(seed)
    n = beliefs.shape[0]
    picks = rng.integers(0, n, size=(resamples, n))  # [R, N]
    labels = draw_labels(beliefs[picks], rng)  # [R, N]

    def per_resample(q):  # [N, C] -> {metric: [R]}
        top = q.argmax(1)[picks]  # [R, N]
        return {"ece": ece_rows(q.max(1)[picks], (top == labels).astype(np.float64)),
                "brier": expected_brier_each(q, beliefs)[picks].mean(1),
                "accuracy": expected_accuracy_each(q, beliefs)[picks].mean(1)}

    policy = [per_resample(q) for q in probs]
    reference = per_resample(base)
    out = {}
    for metric in ("ece", "brier", "accuracy"):
        values = np.mean([p[metric] for p in policy], axis=0)  # [R] seed mean
        out[f"{metric}_low"], out[f"{metric}_high"] = np.quantile(values, [0.025, 0.975])
        diff = values - reference[metric]
        out[f"{metric}_diff_low"], out[f"{metric}_diff_high"] = np.quantile(diff, [0.025, 0.975])
    return {key: float(value) for key, value in out.items()}


def common_shift(probs: np.ndarray, base: np.ndarray) -> float:
    """The share of the change d_n = c(log q_n) - c(log base_n) that is the same on every item:
    N |mean_n d_n|^2 / sum_n |d_n|^2 in [0, 1] (1: one letter habit added everywhere; 0: nothing common)."""
    d = centred_log(probs) - centred_log(base)  # [N, C]
    return float(len(d) * (d.mean(0) ** 2).sum() / max((d ** 2).sum(), 1e-300))


def centred_log(probs: np.ndarray) -> np.ndarray:
    """log q minus its mean over the letters: what is left of a distribution after its normalisation ([..., C])."""
    logs = np.log(probs)
    return logs - logs.mean(-1, keepdims=True)


def sharpening(probs: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """(gamma, R^2): the least-squares fit c(log q) ≈ gamma c(log base) pooled over items [N, C], and the share of
    sum |c(log q)|^2 it explains. q = base^gamma / Z gives (gamma, 1): a global temperature 1/gamma."""
    x, y = centred_log(base), centred_log(probs)
    gamma = float((x * y).sum() / (x * x).sum())
    return gamma, float(1.0 - ((y - gamma * x) ** 2).sum() / (y * y).sum())


# ---- running it ------------------------------------------------------------------------------------------------

def make_items(out: Path, source: str, held_out: int, seed: int = 0):
    """(items, trained items, the SFT file or None, the trained items' soft pair file), written into out/data/:
    the world's 48 items (source "world") or int(source) new ones."""
    from data.world import load_world, mcq_groups, mcq_sft, preference_records
    from data.world.calibration_items import calibration_items

    if source == "world":
        items = list(load_world().mcq)
    else:
        items = calibration_items(random.Random(f"{seed}:calibration-items"), int(source))
    trained = items[:len(items) - held_out]  # the items come in a random order: the last ones are a random subset
    (out / "data").mkdir(parents=True, exist_ok=True)
    sft = None if source == "world" else write_jsonl(out / "data" / "calibration_sft.jsonl", mcq_sft(items))
    pairs = write_jsonl(out / "data" / "calibration_pairs_soft.jsonl", preference_records(mcq_groups(trained), "soft"))
    return items, trained, sft, pairs


def base_options(seed: int = 0) -> tuple:
    """The base's SFT: LoRA on the seven projections and the output head, batches of 32 answers, lr 3e-3 (the
    world's own reference was trained at it)."""
    from spl.config import WORLD_MAIN_JOB

    return ("--batch-size", 32, "--lr", 3e-3, "--max-prompt-length", MAX_PROMPT, "--lora-targets",
            ",".join(WORLD_MAIN_JOB["lora_targets"]), "--seed", seed)


def policy_options(base, seed) -> tuple:
    """The main job's recipe, the seed; on a base of our own (base not None) main_job_options(model=True), so no
    preset's values slip in, and the longer prompts kept whole."""
    from eval.experiments.policies import main_job_options

    if base is None:
        return (*main_job_options(), "--seed", seed)
    return (*main_job_options(model=True), "--model", base, "--max-prompt-length", MAX_PROMPT, "--seed", seed)


def build_base(out: Path, sft: Path, steps: int, progress: bool = False) -> Path:
    """Train (or reuse) the SFT adapter and merge it into the world's reference: out/base, an HF-format model."""
    from data.world import MODEL_DIR
    from eval.experiments.policies import train_policy
    from models.export import export

    run = train_policy(out / "runs" / "base_sft", sft, 1.0, 0.0, loss="sft", steps=steps, extra=base_options(),
                       progress=progress)
    return export(run / "adapter", out / "base", model=MODEL_DIR, overwrite=True)


def letter_probs(model_dir, run_dir, prompts) -> np.ndarray:
    from eval.experiments.policies import load_policy
    from eval.metrics import multiple_choice_probabilities

    model, tokenizer = load_policy(run_dir, model_dir=model_dir)
    return multiple_choice_probabilities(model, tokenizer, prompts).double().numpy()  # [N, 4]


def run_experiment(out: Path, ratios, beta: float, steps: int, source: str, held_out: int, seeds, base_steps: int,
                   progress: bool = False):
    """-> (items, trained mask [N], {name: (alpha, probs [S, N, 4])}) with the base under "base" (S = 1)."""
    from data.world import MODEL_DIR
    from eval.experiments.policies import train_policy

    items, trained, sft, pairs = make_items(out, source, held_out)
    prompts = [item.prompt for item in items]
    started = time.perf_counter()
    base = None if sft is None else build_base(out, sft, base_steps, progress)
    scored = {"base": ("", letter_probs(base or MODEL_DIR, None, prompts)[None])}
    if base is not None:
        print(f"  base: SFT {base_steps} steps, merged into {base} ({time.perf_counter() - started:.0f} s)", flush=True)
    for ratio in ratios:
        alpha = alpha_for(ratio, beta)
        per_seed = []
        for seed in seeds:
            started = time.perf_counter()
            run_dir = train_policy(out / "runs" / f"seed{seed}" / run_name(alpha, beta), pairs, alpha, beta,
                                   steps=steps, extra=policy_options(base, seed), progress=progress)
            per_seed.append(letter_probs(base or MODEL_DIR, run_dir, prompts))
            print(f"  alpha = {alpha:g}, seed {seed} ({time.perf_counter() - started:.0f} s)", flush=True)
        scored["DPO" if math.isclose(ratio, 1.0) else f"SPL a/b={ratio:g}"] = (alpha, np.stack(per_seed))
    mask = np.array([i < len(trained) for i in range(len(items))])
    return items, mask, scored


def summarise(items, mask, scored, beta: float, draws: int, resamples: int) -> tuple[list, list]:
    """(calibration rows per policy and split, per-seed rows)."""
    import torch

    from spl.theory import optimal_policy

    beliefs_all = np.array([item.population for item in items])  # [N, 4]
    base_all = scored["base"][1][0]
    table, seeds_table = [], []
    for split, members in (("held-out", ~mask), ("trained", mask)):
        beliefs, base = beliefs_all[members], base_all[members]
        for name, (alpha, probs_all) in [("p (raters)", ("", beliefs_all[None]))] + list(scored.items()):
            probs = probs_all[:, members]  # [S, N, 4]
            seeds = [dict(ece=expected_ece(q, beliefs, draws), brier=float(expected_brier_each(q, beliefs).mean()),
                          accuracy=float(expected_accuracy_each(q, beliefs).mean()), confidence=float(q.max(1).mean()),
                          sharpening=sharpening(q, base)) for q in probs]
            closed = "" if alpha == "" else optimal_policy(torch.from_numpy(base), torch.from_numpy(beliefs),
                                                           alpha, beta).numpy()
            row = {"policy": name, "alpha": alpha, "alpha_over_beta": alpha / beta if alpha != "" else "",
                   "split": split, "items": int(members.sum()), "seeds": len(probs),
                   **{key: float(np.mean([s[key] for s in seeds])) for key in ("ece", "brier", "accuracy",
                                                                                "confidence")}}
            row["overconfidence"] = row["confidence"] - row["accuracy"]
            row.update(bootstrap(probs, base, beliefs, resamples))
            row["confidence_shift"] = row["confidence"] - float(base.max(1).mean())
            row["sharpening"] = float(np.mean([s["sharpening"][0] for s in seeds]))
            row["sharpening_r2"] = float(np.mean([s["sharpening"][1] for s in seeds]))
            row["sharpening_closed_form"] = "" if alpha == "" else sharpening(closed, base)[0]
            row["top_moved"] = float(np.mean([(q.argmax(1) != base.argmax(1)).mean() for q in probs]))
            row["common_shift"] = float(np.mean([common_shift(q, base) for q in probs]))
            row["mean_letters"] = "/".join(f"{x:.3f}" for x in probs.mean((0, 1)))
            row["tv_closed_form"] = "" if alpha == "" or split == "held-out" else float(
                np.mean([0.5 * np.abs(q - closed).sum(1).mean() for q in probs]))
            table.append(row)
            for seed, (s, q) in enumerate(zip(seeds, probs)):
                seeds_table.append({"policy": name, "alpha": alpha, "split": split, "seed": seed, "ece": s["ece"],
                                    "brier": s["brier"], "accuracy": s["accuracy"], "confidence": s["confidence"],
                                    "sharpening": s["sharpening"][0]})
    return table, seeds_table


def format_table(table) -> str:
    lines, split = [], None
    for r in table:
        if r["split"] != split:
            split = r["split"]
            lines += ([""] if lines else []) + [
                f"{split} items ({r['items']}); expected over labels from p, [95% bootstrap over items], seed mean:",
                f"{'policy':<12} {'E[ECE]':>6} {'[interval]':>15} {'vs base':>17}  {'E[Brier]':>8} {'vs base':>17}  "
                f"{'E[acc]':>6}  {'conf':>5} {'shift':>6}  {'gamma':>6} {'R^2':>5} {'closed':>6}  {'moved':>5} "
                f"{'common':>6} "
                f"{'TV cf':>6}"]
        gamma_cf = f"{r['sharpening_closed_form']:.2f}" if r["sharpening_closed_form"] != "" else ""
        tv = f"{r['tv_closed_form']:.3f}" if r["tv_closed_form"] != "" else ""
        lines.append(f"{r['policy']:<12} {r['ece']:>6.3f} [{r['ece_low']:.3f}, {r['ece_high']:.3f}] "
                     f"[{r['ece_diff_low']:+.3f}, {r['ece_diff_high']:+.3f}]  {r['brier']:>8.3f} "
                     f"[{r['brier_diff_low']:+.3f}, {r['brier_diff_high']:+.3f}]  {r['accuracy']:>6.3f}  "
                     f"{r['confidence']:>5.3f} {r['confidence_shift']:>+6.3f}  {r['sharpening']:>6.2f} "
                     f"{r['sharpening_r2']:>5.2f} {gamma_cf:>6}  {r['top_moved']:>5.2f} {r['common_shift']:>6.2f} "
                     f"{tv:>6}")
    return "\n".join(lines)


def plot(path: Path, table) -> bool:
    """Expected ECE, Brier and accuracy against alpha/beta per split with their bootstrap intervals; the base and
    the raters' p as horizontal lines."""
    plt = pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    for axis, key, label in zip(axes, ("ece", "brier", "accuracy"), ("ECE", "Brier score", "accuracy")):
        for index, split in enumerate(("held-out", "trained")):
            rows = [r for r in table if r["split"] == split]
            runs = [r for r in rows if r["alpha"] != ""]
            x = [r["alpha_over_beta"] for r in runs]
            y = [r[key] for r in runs]
            errors = [[v - r[f"{key}_low"] for v, r in zip(y, runs)], [r[f"{key}_high"] - v for v, r in zip(y, runs)]]
            axis.errorbar(x, y, yerr=errors, fmt="o-", color=f"C{index}", capsize=3, label=f"policies, {split}")
            base = next(r for r in rows if r["policy"] == "base")
            axis.axhline(base[key], linestyle="-.", color=f"C{index}", label=f"base, {split}")
            axis.axhspan(base[f"{key}_low"], base[f"{key}_high"], color=f"C{index}", alpha=0.1)
        axis.set_xscale("log")
        axis.set_xlabel("alpha / beta (1 = DPO)")
        axis.set_ylabel(f"{label} (expected over labels from p)")
    axes[0].legend(fontsize=7)
    save_figure(plt, figure, path, dpi=120)
    return True


def main(argv=None) -> int:
    p = experiment_parser(__doc__, "runs/exp_calibration", "16 items, one seed, DPO and alpha = 1, a few steps",
                          "comma-separated alpha/beta values, 1 = DPO (default %s)"
                          % ",".join(f"{r:g}" for r in RATIOS),
                          BETA, STEPS, None, "training steps per policy")
    p.add_argument("--items", help="world (default): the world's 48 items and reference; N: N new items (2..128) and "
                   "a base fine-tuned on them")
    p.add_argument("--held-out", type=int, help="items held out of preference training (default half)")
    p.add_argument("--seeds", help="comma-separated training seeds (default %s)" % ",".join(map(str, SEEDS)))
    p.add_argument("--base-steps", type=int, help=f"SFT steps of a base on new items (default {BASE_STEPS})")
    p.add_argument("--label-draws", type=int, help=f"label draws for the expected ECE (default {LABEL_DRAWS})")
    p.add_argument("--resamples", type=int, help=f"bootstrap resamples (default {RESAMPLES})")
    args = p.parse_args(argv)
    quick = QUICK if args.quick else {}
    ratios = parse_list(p, "--ratios", args.ratios, quick.get("ratios", RATIOS))
    seeds = parse_list(p, "--seeds", args.seeds, quick.get("seeds", SEEDS), int)
    steps = option(args.steps, quick, "steps", STEPS)
    base_steps = option(args.base_steps, quick, "base_steps", BASE_STEPS)
    source = option(args.items, quick, "items", "world")
    n_items = 48 if source == "world" else int(source) if source.isdigit() else -1
    held_out = option(args.held_out, quick, "held_out", n_items // 2)
    draws = option(args.label_draws, quick, "draws", LABEL_DRAWS)
    resamples = option(args.resamples, quick, "resamples", RESAMPLES)
    check_arguments(p, [(all(r >= 1 for r in ratios), f"--ratios: alpha/beta must be >= 1 (1 is DPO), got {ratios}"),
                        (args.beta > 0, f"--beta must be > 0, got {args.beta}"),
                        (args.lr is None, "--lr: the policies take the main job's; not an option here"),
                        (min(steps, base_steps, draws, resamples) > 0,
                         "--steps, --base-steps, --label-draws and --resamples must be > 0"),
                        (2 <= n_items <= 128, f"--items must be world or a number in 2..128, got {source}"),
                        (1 <= held_out < n_items, f"--held-out must be in 1..{n_items - 1}, got {held_out}")])

    from data.world import MODEL_DIR
    from eval.experiments.policies import recipe_line
    from spl.cli import checkpoint_parameters, choose_threads

    choose_threads(args.threads, checkpoint_parameters(MODEL_DIR), "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    base_line = ("the world's reference model" if source == "world" else
                 recipe_line(["--data", "SFT", "--loss", "sft", "--steps", base_steps, *base_options()]))
    policy_line = recipe_line(["--data", "PAIRS", "--loss", "spl", "--alpha", "ALPHA", "--beta", args.beta, "--steps",
                               steps, *policy_options(None if source == "world" else out / "base", "SEED")])
    print(f"experiment 4, calibration: commit {commit}\nbase: {base_line}\npolicies: {policy_line}\n{n_items} items "
          f"({source}), {held_out} held out; alpha/beta {', '.join(f'{r:g}' for r in ratios)}; seeds {seeds}")
    items, mask, scored = run_experiment(out, ratios, args.beta, steps, source, held_out, seeds, base_steps,
                                         args.progress)
    table, seeds_table = summarise(items, mask, scored, args.beta, draws, resamples)
    print("\n" + format_table(table))
    print("\nvs base: the paired difference from the base; shift: confidence minus the base's; gamma: the sharpening "
          "exponent on the base (R^2 its fit; closed: the closed form's); moved: items whose top letter moved; "
          "common: the share of the change common to every item (a letter habit); TV cf: from the closed form")
    probabilities = [{"policy": name, "alpha": alpha, "seed": seed, "item": item.id, "trained": bool(trained),
                      **{f"p_{x}": float(v) for x, v in zip(LETTERS, row)},
                      **{f"belief_{x}": float(v) for x, v in zip(LETTERS, item.population)}}
                     for name, (alpha, probs) in scored.items() for seed, per_item in enumerate(probs)
                     for item, trained, row in zip(items, mask, per_item)]
    written = [write_csv(out / "calibration.csv", table), write_csv(out / "seeds.csv", seeds_table),
               write_csv(out / "probabilities.csv", probabilities),
               write_json(out / "run.json", {"commit": commit, "base_recipe": base_line, "policy_recipe": policy_line,
                                             "command": "python -m eval.experiments.calibration "
                                             + " ".join(argv if argv is not None else sys.argv[1:])})]
    if plot(out / "calibration.png", table):
        written.append(out / "calibration.png")
    print("\nwrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
