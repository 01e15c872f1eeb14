"""Experiment 1, representation (Props. 3.1, 3.2, Cor. 3.1): where the theory holds, where it breaks, and by how much.

    python -m eval.experiments.representation          # six data sets' exact minimisers; three trained, two ratios
    python -m eval.experiments.representation --quick  # the polarised population, DPO and alpha = 1, a few steps

The propositions predict, for raters whose preferences are Bradley-Terry / Plackett-Luce in their top-choice shares
p_best, the optimum over a prompt's options (Prop. A.1; 3.1 is alpha = beta, 3.2 alpha > beta, Cor. 3.1 alpha = 1)

    predicted   pi(y) ∝ pi_ref(y)^(beta/alpha) p_best(y)^(1/alpha).

What training minimises is the loss (Eq. 5) on the pairs of a file. Over a prompt's K options with log-probs l and
the reference's rho, each record (chosen c, rejected r, label q) costs -q log σ(z) - (1 - q) log σ(-z),
z = alpha (l_c - l_r) - beta (rho_c - rho_r): convex in l, flat along l + const (the anchor fixes that direction
and nothing else), and with s = alpha l - beta rho it is the Bradley-Terry likelihood of the file's pairwise shares.
So its exact minimiser is

    exact       pi(y) ∝ pi_ref(y)^(beta/alpha) exp(s(y)/alpha),   s the Bradley-Terry fit of the pairwise shares,

which equals the prediction when the shares are Bradley-Terry in p_best and not otherwise; it exists when the file's
win graph is strongly connected (Zermelo 1929, Ford 1957) and not when some options never beat the rest. This script
computes it by Newton's method on the loss itself (spl.losses.spl_loss, float64), and trains a policy on the file with
the main job's recipe (eval.experiments.policies.main_job_options: anchor, whole prompts, LoRA on the output head).

Data sets (the world's 30 opinion questions, their p as the top-choice shares; data/world/rankings.py):
  bradley-terry/soft      the world's opinion_pairs_soft.jsonl: P = p_i / (p_i + p_j), where the theory is exact
  bradley-terry/sampled   the world's opinion_pairs_sampled.jsonl: K = 20 hard labels per pair drawn from that P
  consensus/soft, single-peaked/soft, polarised/soft: rater groups with whole rankings, soft labels = their shares
  polarised/sampled       K = 20 hard labels per pair, each one rater drawn from the polarised groups

Per data set and alpha/beta it reports TV(exact, predicted) (how far the theory is from the loss's own optimum),
TV(., p_best) (Cor. 3.1: does alpha = 1 give the population's top-choice shares?), the mass on the majority's
favourite and how many questions the exact optimum hands to a minority's favourite (Prop. 3.1's collapse, onto
whom?), and for the trained policies TV(learned, exact) (did training reach the loss's minimiser?).

Outputs in --out: exact.csv, trained.csv, distributions.csv (per data set, alpha, question and option: p_best,
reference, predicted, exact, learned), representation.png (with matplotlib), run.json (the commit, the recipe,
the command). Training runs live in --out/runs/ and are reused when the configuration is unchanged.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from eval.experiments.common import (alpha_for, check_arguments, experiment_parser, git_commit, option, parse_list,
                                     pyplot, run_name, save_figure, write_csv, write_json)
# torch, and the library modules that load it, are imported inside the functions that use them: --help and usage
# errors then answer before torch's seconds of start-up.

EXACT_RATIOS = (1.0, 1.5, 2.0, 4.0, 10.0)  # alpha / beta for the exact minimiser (no training: milliseconds)
TRAIN_RATIOS = (1.0, 10.0)  # DPO (Prop. 3.1) and alpha = 1 (Cor. 3.1) at beta 0.1; Prop. 3.2 between them is
# checked on the exact minimiser, which the trained policies are measured against
BETA = 0.1
STEPS = 200  # the main job's
DATASETS = ("bradley-terry/soft", "bradley-terry/sampled", "consensus/soft", "single-peaked/soft", "polarised/soft",
            "polarised/sampled")
TRAINED = ("bradley-terry/soft", "polarised/soft", "polarised/sampled")  # the theory's case and where it breaks most
SAMPLED_K = 20  # hard labels per pair in a generated sampled file, as the world's own (world.json)
QUICK = dict(trained=("polarised/soft",), ratios=(1.0, 10.0), exact_ratios=(1.0, 10.0), steps=4)
FOCUS = "opinion-00"  # 0.55 / 0.20 / 0.15 / 0.10, the paper's own example and the audit


# ---- the math: pure functions over a prompt's options -----------------------------------------------------------

def entropy(probs) -> float:
    """Shannon entropy in nats, H(p) = -sum_i p_i log p_i (0 log 0 = 0)."""
    return -sum(p * math.log(p) for p in probs if p > 0)


def total_variation(p, q) -> float:
    """TV(p, q) = 1/2 sum_i |p_i - q_i|."""
    return 0.5 * sum(abs(float(a) - float(b)) for a, b in zip(p, q))


def pair_arrays(records, options):
    """A question's records as (chosen [N], rejected [N]) option indices and the label q [N] (float64; 1 for a
    hard label)."""
    import torch

    index = {text: i for i, text in enumerate(options)}
    chosen = torch.tensor([index[r["chosen"]] for r in records])
    rejected = torch.tensor([index[r["rejected"]] for r in records])
    label = torch.tensor([float(r.get("chosen_prob", 1.0)) for r in records], dtype=torch.float64)
    return chosen, rejected, label


def win_matrix(k: int, chosen, rejected, label) -> list[list[float]]:
    """wins[i][j]: the weight of records saying y_i beats y_j (a record says its chosen wins with weight q, its
    rejected with 1 - q). Divided by the comparisons of the pair it is the pairwise share the file encodes."""
    wins = [[0.0] * k for _ in range(k)]
    for c, r, q in zip(chosen.tolist(), rejected.tolist(), label.tolist()):
        wins[c][r] += q
        wins[r][c] += 1.0 - q
    return wins


def strongly_connected(wins) -> bool:
    """Whether every option reaches every other along edges i -> j with wins[i][j] > 0: the condition for the
    Bradley-Terry likelihood, hence the loss, to have a finite minimiser (Ford 1957). Otherwise some set of options
    beats the rest every time it meets them and the loss falls forever as their log-ratios grow."""
    k = len(wins)

    def reach(edge) -> set:
        seen, todo = {0}, [0]
        while todo:
            i = todo.pop()
            for j in range(k):
                if j not in seen and edge(i, j):
                    seen.add(j)
                    todo.append(j)
        return seen

    return len(reach(lambda i, j: wins[i][j] > 0)) == k == len(reach(lambda i, j: wins[j][i] > 0))


def loss_minimiser(ref_logps, chosen, rejected, label, alpha: float, beta: float, tol: float = 1e-11,
                   max_steps: int = 100):
    """The exact minimiser over the options of SPL's loss (Eq. 5) on one prompt's records, as the normalised
    distribution pi [K] (float64), or None when the infimum is not attained (win graph not strongly connected).

    L(l) = sum_n -q_n log σ(z_n) - (1 - q_n) log σ(-z_n),   z = alpha D l - beta D rho,   D [N, K] with +1 at the
    chosen and -1 at the rejected option (spl.losses.spl_loss summed; the tests check its autograd gradient
    vanishes at the result). Gradient alpha D^T (σ(z) - q), Hessian alpha^2 D^T diag(σ(1 - σ)) D: positive
    semi-definite with null space 1 (a connected comparison graph), so Newton's step solves (H + 1 1^T / K) d = -g,
    which keeps d ⟂ 1 since g ⟂ 1; an Armijo backtracking line search makes each step a descent. Stops when
    max |g| < tol."""
    import torch
    import torch.nn.functional as F

    k = len(ref_logps)
    if not strongly_connected(win_matrix(k, chosen, rejected, label)):
        return None
    rho = torch.as_tensor(ref_logps, dtype=torch.float64)  # [K]
    d = torch.zeros(len(chosen), k, dtype=torch.float64)  # [N, K]
    d[torch.arange(len(chosen)), chosen] = 1.0
    d[torch.arange(len(chosen)), rejected] = -1.0
    offset = beta * (d @ rho)  # [N]
    gauge = torch.ones(k, k, dtype=torch.float64) / k

    def loss(z):  # [N] -> the summed loss (spl.losses._preference_loss)
        return float(-(label * F.logsigmoid(z) + (1 - label) * F.logsigmoid(-z)).sum())

    logps = rho * (beta / alpha)  # every z = 0
    z = alpha * (d @ logps) - offset  # [N]
    current = loss(z)
    for _ in range(max_steps):
        sig = torch.sigmoid(z)  # [N]
        grad = alpha * d.T @ (sig - label)  # [K]
        if float(grad.abs().max()) < tol:
            break
        step = -torch.linalg.solve(alpha ** 2 * d.T @ (d * (sig * (1 - sig))[:, None]) + gauge, grad)  # [K]
        dz, slope, size = alpha * (d @ step), float(grad @ step), 1.0
        while size > 1e-12 and loss(z + size * dz) > current + 1e-4 * size * slope:
            size /= 2  # Armijo backtracking
        logps, z = logps + size * step, z + size * dz
        current = loss(z)
    return torch.softmax(logps, 0)


def bt_misfit(pi, ref_probs, wins, alpha: float, beta: float) -> float:
    """Mean over compared pairs of |(s_i - s_j) - logit P_ij| at the minimiser, s = alpha log pi - beta log
    pi_ref: 0 when the file's pairwise shares are Bradley-Terry, how far from it they are otherwise (nats)."""
    s = [alpha * math.log(float(a)) - beta * math.log(float(b)) for a, b in zip(pi, ref_probs)]
    gaps = [abs(s[i] - s[j] - math.log(wins[i][j] / wins[j][i]))
            for i in range(len(s)) for j in range(i + 1, len(s)) if wins[i][j] > 0 and wins[j][i] > 0]
    return sum(gaps) / len(gaps)


# ---- the data sets --------------------------------------------------------------------------------------------

def dataset_files(out: Path, world, names, seed: int = 0) -> dict:
    """name -> (path of its pair file, the top-choice shares p_best per question id). The world's own files for
    bradley-terry; the ranking populations' files are written into out/data/ (a pure function of the seed)."""
    from data.world.rankings import group_rankings, ranking_records, top_choice_shares
    from eval.experiments.common import write_jsonl

    files = {}
    for name in names:
        structure, labels = name.split("/")
        if structure == "bradley-terry":
            path = world.files["opinion_pairs_soft" if labels == "soft" else "opinion_pairs_sampled"]
            files[name] = (path, {q.id: list(q.population) for q in world.opinions})
            continue
        rng = random.Random(f"{seed}:{structure}-sampled")
        records = ranking_records(world.opinions, structure, labels, SAMPLED_K, rng)
        (out / "data").mkdir(parents=True, exist_ok=True)
        path = write_jsonl(out / "data" / f"opinion_pairs_{structure}_{labels}.jsonl", records)
        files[name] = (path, {q.id: top_choice_shares(group_rankings(q.population, structure), len(q.options))
                              for q in world.opinions})
    return files


def read_pairs(path: Path, questions) -> dict:
    """question id -> (chosen, rejected, label) arrays (pair_arrays) of the file's records."""
    by_id = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        by_id.setdefault(record["id"], []).append(record)
    return {q.id: pair_arrays(by_id[q.id], q.options) for q in questions}


def exact_rows(name: str, questions, ref_logps, pairs, p_best, alpha: float, beta: float):
    """Per question of one data set: predicted (Prop. A.1 on p_best) and exact (loss_minimiser), or exact None."""
    import torch

    from spl.theory import optimal_policy

    rows = []
    for q, rho in zip(questions, ref_logps):
        chosen, rejected, label = pairs[q.id]
        top = torch.tensor(p_best[q.id], dtype=torch.float64)
        wins = win_matrix(len(q.options), chosen, rejected, label)
        exact = loss_minimiser(rho, chosen, rejected, label, alpha, beta)
        rows.append({"dataset": name, "question": q, "p_best": top, "reference": rho.softmax(0),
                     "predicted": optimal_policy(rho.softmax(0), top, alpha, beta), "exact": exact,
                     "misfit": None if exact is None else bt_misfit(exact, rho.softmax(0), wins, alpha, beta)})
    return rows


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def _argmax(values) -> int:
    values = [float(v) for v in values]
    return max(range(len(values)), key=values.__getitem__)


def summarise_exact(rows, alpha: float, beta: float) -> dict:
    """One row of exact.csv: means over the questions with a finite minimiser."""
    found = [r for r in rows if r["exact"] is not None]
    structure, labels = rows[0]["dataset"].split("/")
    majority = [_argmax(r["p_best"]) for r in found]
    return {"dataset": rows[0]["dataset"], "structure": structure, "labels": labels, "alpha": alpha, "beta": beta,
            "alpha_over_beta": alpha / beta, "questions": len(found), "no_minimiser": len(rows) - len(found),
            "tv_exact_vs_predicted": _mean(total_variation(r["exact"], r["predicted"]) for r in found),
            "max_tv_exact_vs_predicted": max(total_variation(r["exact"], r["predicted"]) for r in found),
            "tv_exact_vs_top_choice": _mean(total_variation(r["exact"], r["p_best"]) for r in found),
            "tv_predicted_vs_top_choice": _mean(total_variation(r["predicted"], r["p_best"]) for r in found),
            "majority_predicted": _mean(float(r["predicted"][m]) for r, m in zip(found, majority)),
            "majority_exact": _mean(float(r["exact"][m]) for r, m in zip(found, majority)),
            "minority_top_predicted": sum(_argmax(r["predicted"]) != m for r, m in zip(found, majority)),
            "minority_top_exact": sum(_argmax(r["exact"]) != m for r, m in zip(found, majority)),
            "bt_misfit": _mean(r["misfit"] for r in found)}


def summarise_trained(rows, learned, masses, alpha: float, beta: float) -> dict:
    """One row of trained.csv: the learned distributions against the exact minimiser, the prediction and p_best
    (means over the questions with a finite minimiser; TV from the prediction over all)."""
    found = [(r, pi) for r, pi in zip(rows, learned) if r["exact"] is not None]
    majority = [_argmax(r["p_best"]) for r, _ in found]
    return {"dataset": rows[0]["dataset"], "alpha": alpha, "beta": beta, "alpha_over_beta": alpha / beta,
            "tv_learned_vs_exact": _mean(total_variation(pi, r["exact"]) for r, pi in found),
            "max_tv_learned_vs_exact": max(total_variation(pi, r["exact"]) for r, pi in found),
            "tv_learned_vs_predicted": _mean(total_variation(pi, r["predicted"]) for r, pi in zip(rows, learned)),
            "tv_learned_vs_top_choice": _mean(total_variation(pi, r["p_best"]) for r, pi in zip(rows, learned)),
            "majority_learned": _mean(float(pi[m]) for (_, pi), m in zip(found, majority)),
            "minority_top_learned": sum(_argmax(pi) != m for (_, pi), m in zip(found, majority)),
            "option_mass": _mean(masses), "entropy_learned": _mean(entropy(pi.tolist()) for pi in learned)}


# ---- running it ------------------------------------------------------------------------------------------------

def train_options(lr=None) -> tuple:
    """What every policy here takes beside --data, --alpha, --beta and --steps: the main job's recipe (and --lr
    when one is given; otherwise train.py's default, the main job's)."""
    from eval.experiments.policies import main_job_options

    return (*(("--lr", lr) if lr is not None else ()), *main_job_options())


def run_experiment(out: Path, datasets, trained, ratios, exact_ratios, beta: float, steps: int, lr=None,
                   seed: int = 0, progress: bool = False):
    """The exact table for every data set and ratio, then train the `trained` data sets at `ratios`.
    -> (exact rows, trained rows, distribution rows)."""
    from data.world import load_world
    from data.world.report import option_logprobs
    from eval.experiments.policies import load_policy, train_policy

    world = load_world()
    questions = list(world.opinions)
    model, tokenizer = load_policy()
    ref_logps = option_logprobs(model, tokenizer, questions)  # per question [K]
    files = dataset_files(out, world, datasets, seed)
    exact_table, trained_table, distributions = [], [], []
    for name in datasets:
        path, p_best = files[name]
        pairs = read_pairs(path, questions)
        for ratio in sorted(set(exact_ratios) | (set(ratios) if name in trained else set())):
            alpha = alpha_for(ratio, beta)
            rows = exact_rows(name, questions, ref_logps, pairs, p_best, alpha, beta)
            if ratio in exact_ratios:
                exact_table.append(summarise_exact(rows, alpha, beta))
            learned = [None] * len(rows)
            if name in trained and ratio in ratios:
                started = time.perf_counter()
                run_dir = train_policy(out / "runs" / name.replace("/", "_") / run_name(alpha, beta), path, alpha, beta,
                                       steps=steps, extra=train_options(lr), progress=progress)
                model, tokenizer = load_policy(run_dir)
                logps = option_logprobs(model, tokenizer, questions)
                learned = [x.softmax(0) for x in logps]
                row = summarise_trained(rows, learned, [float(x.logsumexp(0).exp()) for x in logps], alpha, beta)
                trained_table.append(row)
                print(f"  {name}, alpha = {alpha:g}: TV learned vs exact {row['tv_learned_vs_exact']:.4f}, vs "
                      f"predicted {row['tv_learned_vs_predicted']:.4f} ({time.perf_counter() - started:.0f} s)",
                      flush=True)
            distributions += distribution_rows(rows, learned, alpha, beta)
    reference_mass = _mean(float(x.logsumexp(0).exp()) for x in ref_logps)
    return exact_table, trained_table, distributions, reference_mass


def distribution_rows(rows, learned, alpha: float, beta: float) -> list[dict]:
    out = []
    for r, pi in zip(rows, learned):
        for i, text in enumerate(r["question"].options):
            out.append({"dataset": r["dataset"], "alpha": alpha, "beta": beta, "question": r["question"].id,
                        "option": text, **{key: float(r[key][i]) for key in ("p_best", "reference", "predicted")},
                        "exact": "" if r["exact"] is None else float(r["exact"][i]),
                        "learned": "" if pi is None else float(pi[i])})
    return out


def format_tables(exact_table, trained_table) -> str:
    lines = ["exact minimiser of the loss vs the prediction pi_ref^(beta/alpha) p_best^(1/alpha) (question means):",
             f"{'data set':<22} {'a/b':>4}  {'TV(exact, pred)':>16}  {'TV from p_best':>15}  {'p(majority fav.)':>16}"
             f"  {'minority top':>12}  {'BT':>6}  {'no min':>6}",
             f"{'':<22} {'':>4}  {'mean':>7} {'max':>8}  {'exact':>7} {'pred':>7}  {'pred':>7} {'exact':>8}"
             f"  {'pred':>5} {'exact':>6}  {'misfit':>6}  {'':>6}"]
    for r in exact_table:
        lines.append(f"{r['dataset']:<22} {r['alpha_over_beta']:>4g}  {r['tv_exact_vs_predicted']:>7.4f} "
                     f"{r['max_tv_exact_vs_predicted']:>8.4f}  {r['tv_exact_vs_top_choice']:>7.4f} "
                     f"{r['tv_predicted_vs_top_choice']:>7.4f}  {r['majority_predicted']:>7.3f} "
                     f"{r['majority_exact']:>8.3f}  {r['minority_top_predicted']:>5d} {r['minority_top_exact']:>6d}  "
                     f"{r['bt_misfit']:>6.3f}  "
                     f"{r['no_minimiser']:>6d}")
    lines += ["", "trained policies (main job's recipe) vs the exact minimiser and the prediction:",
              f"{'data set':<22} {'a/b':>4}  {'TV(learned, exact)':>18}  {'TV(learned, pred)':>17}  "
              f"{'TV from p_best':>14}  {'p(maj. fav.)':>12}  {'minority top':>12}  {'option mass':>11}"]
    for r in trained_table:
        lines.append(f"{r['dataset']:<22} {r['alpha_over_beta']:>4g}  {r['tv_learned_vs_exact']:>8.4f} "
                     f"(max {r['max_tv_learned_vs_exact']:.3f})  {r['tv_learned_vs_predicted']:>17.4f}  "
                     f"{r['tv_learned_vs_top_choice']:>14.4f}  {r['majority_learned']:>12.3f}  "
                     f"{r['minority_top_learned']:>12d}  {r['option_mass']:>11.3f}")
    return "\n".join(lines)


def plot(path: Path, exact_table, distributions) -> bool:
    """Left: TV(exact, predicted) against alpha/beta per data set. Right: the first question (0.55 / 0.20 /
    0.15 / 0.10) at alpha = 1 and under DPO, p_best beside predicted, exact and learned, per data set."""
    plt = pyplot()
    if plt is None:
        return False
    names = list(dict.fromkeys(r["dataset"] for r in exact_table))
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [1, 1.4, 1.4]})
    for name in names:
        rows = [r for r in exact_table if r["dataset"] == name]
        axes[0].plot([r["alpha_over_beta"] for r in rows], [r["tv_exact_vs_predicted"] for r in rows], "o-",
                     label=name)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("alpha / beta")
    axes[0].set_ylabel("mean TV(exact minimiser, prediction)")
    axes[0].legend(fontsize=7)
    alphas = sorted({r["alpha"] for r in distributions})
    for axis, alpha in zip(axes[1:], (max(alphas), min(alphas))):
        rows = [r for r in distributions if r["question"] == FOCUS and r["alpha"] == alpha]
        options = list(dict.fromkeys(r["option"] for r in rows))
        width = 0.8 / (3 * len(names) + 1)
        top = [next(r["p_best"] for r in rows if r["option"] == o) for o in options]
        axis.bar([i - 0.4 for i in range(len(options))], top, width, color="black", label="p_best")
        for n, name in enumerate(names):
            for m, key in enumerate(("predicted", "exact", "learned")):
                values = [next((r[key] for r in rows if r["option"] == o and r["dataset"] == name), "")
                          for o in options]
                values = [v if v != "" else 0.0 for v in values]
                axis.bar([i - 0.4 + width * (1 + 3 * n + m) for i in range(len(options))], values, width,
                         color=f"C{n}", alpha=(0.35, 0.7, 1.0)[m], label=f"{name} {key}" if axis is axes[1] else None)
        axis.set_xticks(range(len(options)))
        axis.set_xticklabels([o[:18] for o in options], fontsize=7)
        axis.set_title(f"{FOCUS}, alpha = {alpha:g}", fontsize=9)
    axes[1].legend(fontsize=5, ncol=2)
    save_figure(plt, figure, path, dpi=120)
    return True


def main(argv=None) -> int:
    p = experiment_parser(__doc__, "runs/exp_representation",
                          "the polarised population, DPO and alpha = 1, %d steps" % QUICK["steps"],
                          "comma-separated alpha/beta values to train, 1 = DPO (default %s)"
                          % ",".join(f"{r:g}" for r in TRAIN_RATIOS), BETA, STEPS, None, "training steps per run")
    p.add_argument("--datasets", help="comma-separated data sets for the exact table (default all: %s)"
                   % ",".join(DATASETS))
    p.add_argument("--trained", help="comma-separated data sets to train policies on (default %s)" % ",".join(TRAINED))
    p.add_argument("--exact-ratios", help="alpha/beta values of the exact table (default %s)"
                   % ",".join(f"{r:g}" for r in EXACT_RATIOS))
    p.add_argument("--seed", type=int, default=0, help="seed of the generated sampled files")
    args = p.parse_args(argv)
    quick = QUICK if args.quick else {}
    ratios = parse_list(p, "--ratios", args.ratios, quick.get("ratios", TRAIN_RATIOS))
    exact_ratios = parse_list(p, "--exact-ratios", args.exact_ratios, quick.get("exact_ratios", EXACT_RATIOS))
    datasets = parse_list(p, "--datasets", args.datasets, DATASETS, str)
    trained = tuple(d for d in parse_list(p, "--trained", args.trained, quick.get("trained", TRAINED), str) if d)
    steps = option(args.steps, quick, "steps", STEPS)
    check_arguments(p, [(all(r >= 1 for r in ratios + exact_ratios),
                         f"--ratios, --exact-ratios: alpha/beta must be >= 1 (1 is DPO), got {ratios + exact_ratios}"),
                        (args.beta > 0 and (args.lr is None or args.lr > 0),
                         f"--beta and --lr must be > 0, got {args.beta}, {args.lr}"),
                        (steps > 0, f"--steps must be > 0, got {steps}"),
                        (all(d in DATASETS for d in datasets + trained),
                         f"--datasets, --trained: each must be one of {', '.join(DATASETS)}"),
                        (all(d in datasets for d in trained),
                         "--trained: every trained data set must be in --datasets")])

    from data.world import MODEL_DIR
    from eval.experiments.policies import recipe_line
    from spl.cli import checkpoint_parameters, choose_threads

    choose_threads(args.threads, checkpoint_parameters(MODEL_DIR), "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    line = recipe_line(["--data", "FILE", "--loss", "spl", "--alpha", "ALPHA", "--beta", args.beta, "--steps", steps,
                        *train_options(args.lr)])
    print(f"experiment 1, representation: commit {commit}\nrecipe: {line}\nexact minimiser at alpha/beta "
          f"{', '.join(f'{r:g}' for r in exact_ratios)}; trained at {', '.join(f'{r:g}' for r in ratios)} on "
          f"{', '.join(trained)}; beta = {args.beta:g}")
    exact_table, trained_table, distributions, reference_mass = run_experiment(
        out, datasets, trained, ratios, exact_ratios, args.beta, steps, args.lr, args.seed, args.progress)
    print("\n" + format_tables(exact_table, trained_table) + f"\n(reference option mass {reference_mass:.3f})")
    written = [write_csv(out / "exact.csv", exact_table), write_csv(out / "distributions.csv", distributions)]
    if trained_table:
        written.append(write_csv(out / "trained.csv", trained_table))
    command = "python -m eval.experiments.representation " + " ".join(argv if argv is not None else sys.argv[1:])
    written.append(write_json(out / "run.json", {"commit": commit, "recipe": line, "command": command,
                                                 "reference_option_mass": reference_mass}))
    if plot(out / "representation.png", exact_table, distributions):
        written.append(out / "representation.png")
    print("\nwrote " + ", ".join(map(str, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
