"""Experiment 3, best-of-N as a mechanism test (the paper's Figure 3, Tables 1-3, Figure 9) on the world's arithmetic.

    python -m eval.experiments.best_of_n            # the full run: 2 seeds x (DPO, SPL at alpha/beta 2, 4, 10)
    python -m eval.experiments.best_of_n --quick    # seconds: 2 seeds, DPO and SPL 2, 2 steps, 4 problems, n = 8
    # the full run as two processes, one seed each (one per core), then their one result:
    python -m eval.experiments.best_of_n --seeds 0 --out A & python -m eval.experiments.best_of_n --seeds 1 --out B
    python -m eval.experiments.best_of_n --merge A B --out runs/exp_best_of_n

The paper's claim: DPO collapses onto the strategies raters like best, SPL (global temperature alpha/beta > 1) keeps
the others, and on hard problems, where a correct sample is rare, that diversity raises best-of-N. Here the
mechanism is built in and checked step by step:

1. Preference data with a majority strategy: the world's strategy pairs (`data.world.arithmetic_groups`) at the
   evaluated levels: per training problem each strategy's correct solution, population weight 0.60 "direct"
   (one line), 0.25 "split", 0.15 "round", and a slipped (wrong) solution. The arithmetic reference model (data/world/
   arithmetic_model) writes split 50-60% of the time, and at levels 4-5 its one-line direct products are the least
   accurate of its strategies: collapsing onto direct should cost best-of-N there.
2. One recipe: each policy is trained by train.py through `eval.experiments.policies.train_policy` with
   `main_job_options(model=True)` (the main job's anchor, whole prompts, LoRA with the output head, and the world's
   step size and lengths pinned, not the paper-chat preset's); the recipe line is printed and saved.
3. A convergence gate before any pass@k: each policy's mix over its training problems' candidates against the
   closed form pi ∝ pi_ref^(beta/alpha) p^(1/alpha) (eval/experiments/strategy_mix.py); met or not, it is printed.
4. DPO sampled at token temperature T in {1, 1.2} against SPL at alpha/beta in {2, 4, 10} (beta = 0.1), T = 1.
5. Problems drawn fresh (never a world problem, never one of the model's SFT operands): easy = level 2, medium =
   level 4, hard = level 5 screened by the reference's exact probability of its correct solutions (the sum over
   strategies of pi_ref(solution | x), teacher-forced) in [1/512, 1/16]: above the floor, at most 1/16.
6. n samples per problem, every setting and seed; pass@k by the unbiased estimator, averaged over problems and
   training seeds, with two-way (seed x problem) paired bootstrap intervals (eval/experiments/best_of_n_stats.py);
   and the sampled strategy mix with each strategy's success rate, which is what explains a difference.

Outputs in --out (written after each level, so a cut run keeps what it finished): gate.csv, problems.csv (per
setting, seed and problem: n, correct, per-strategy counts), samples.jsonl, pass_at_k.csv, differences.csv,
matching.csv, strategies.csv, screen.csv, experiment.json (recipe, commit, seconds); training runs in --out/runs/.
"""
from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from eval.experiments.common import check_arguments, experiment_parser, option, parse_list, write_csv, write_json
# torch and the modules that load it are imported inside functions: --help and usage errors answer at once.

BETA = 0.1
TEMPERATURES = (1.0, 1.2)  # DPO's token temperatures
SPL_RATIOS = (2.0, 4.0, 10.0)  # alpha / beta
# Each policy's schedule (steps, peak lr), long enough to pass the gate (docs/claims.md, the pilots): the optimum
# pi_ref^(beta/alpha) p^(1/alpha) lies ~1/alpha nats of log-ratio per nat of log p from the reference (DPO, alpha =
# 0.1: ~9 nats at levels 2 and 4; alpha = 1: ~1), and Adam's steps are ~lr whatever the gradient's scale, so the
# small alphas need more steps. "spl" is every SPL ratio without a row of its own. --steps and --lr replace all.
SCHEDULES = {"dpo": (1500, 1e-2), "spl-2": (600, 1e-2), "spl": (300, 5e-3)}
SEEDS = (0, 1)
LEVELS = {"hard": 5, "medium": 4, "easy": 2}  # sampled in this order: the hard level is the claim
PROBLEMS = {"hard": 64, "medium": 32, "easy": 32}
SCREEN = (1 / 512, 1 / 16)  # the hard level's reference success window
MAX_DRAWS = 4000  # fresh draws tried per level before giving up
NUM_SAMPLES, REFERENCE_SAMPLES = 128, 32
MAX_NEW_TOKENS = 112  # the longest solution is 104 tokens
PAPER_KS = (1, 4, 16, 64, 128)
QUICK = dict(ratios=(2.0,), steps=2, max_pairs=24, problems={"hard": 2, "medium": 1, "easy": 1}, num_samples=8,
             reference_samples=4, max_new_tokens=48)


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


# ---- problems ---------------------------------------------------------------------------------------------------

def fresh_candidates(world, level: int, rng: random.Random, excluded: set):
    """Problems of `level` with operands drawn as the world draws them, never in `excluded` ((level, operands)
    pairs), each at most once; an endless generator."""
    from data.world.arithmetic import draw_operands, make_problem

    seen, index = set(excluded), 0
    while True:
        operands = draw_operands(level, rng)
        if (level, operands) not in seen:
            seen.add((level, operands))
            yield make_problem(level, operands, "fresh", index)
            index += 1


def reference_success(model, tokenizer, problem) -> float:
    """sum over strategies of pi_ref(correct solution | x): the reference's probability of writing one of the
    problem's correct solutions exactly (a lower bound on its success rate; other texts can end in the answer)."""
    import torch

    from eval.metrics import sequence_nll
    from models.generate import user_prompt_ids

    texts = [tokenizer.encode_response(t) for t in problem.solutions.values()]
    return float(torch.exp(-sequence_nll(model, user_prompt_ids(tokenizer, problem.prompt), texts)).sum())


def choose_problems(world, model, tokenizer, per_level: dict, window=SCREEN, max_draws: int = MAX_DRAWS):
    """Fresh problems per level name: the first per_level ones (the hard level's within `window` of reference
    success). -> (problems, screen rows: every draw tried, its success and whether kept)."""
    from data.world.arithmetic import model_sft_operands
    from data.world.build import ARITHMETIC_SFT_PER_LEVEL

    excluded = {(p.level, tuple(p.operands)) for p in world.arithmetic}
    excluded |= set(model_sft_operands(world.arithmetic, random.Random(f"{world.seed}:arithmetic-model-sft"),
                                       ARITHMETIC_SFT_PER_LEVEL))
    chosen, screen = [], []
    for name, level in LEVELS.items():
        kept = 0
        draws = fresh_candidates(world, level, random.Random(f"{world.seed}:best-of-n:{level}"), excluded)
        for tried in range(max_draws):
            if kept == per_level[name]:
                break
            problem = next(draws)
            success = reference_success(model, tokenizer, problem)
            keep = name != "hard" or window[0] <= success <= window[1]
            screen.append({"level_name": name, "level": level, "problem": problem.prompt, "success": success,
                           "kept": keep})
            if keep:
                chosen.append(dataclasses.replace(problem, id=f"{name}-{kept:03d}"))
                kept += 1
        if kept < per_level[name]:
            raise RuntimeError(f"choose_problems: only {kept} of {per_level[name]} {name} problems in {max_draws} draws")
    return chosen, screen


# ---- training and the gate --------------------------------------------------------------------------------------

def pairs_file(out: Path, world, levels, max_pairs: int | None) -> Path:
    """The world's strategy pairs (soft labels) of the training problems at `levels`, as train.py reads them."""
    from data.world.pairs import preference_records
    from eval.experiments.common import write_jsonl
    from eval.experiments.strategy_mix import world_groups

    records = preference_records([g for g in world_groups(world) if g_level(g) in levels], "soft")
    return write_jsonl(out / "strategy_pairs.jsonl", records[:max_pairs] if max_pairs else records)


def recipe(seed, lr) -> tuple:
    """train.py's options after --data/--loss/--alpha/--beta/--steps: the main job's recipe with --model, at
    peak learning rate `lr`."""
    from data.world.arithmetic import ARITHMETIC_MODEL_DIR
    from eval.experiments.policies import main_job_options

    options = list(main_job_options(model=True))
    options[options.index("--lr") + 1] = str(lr)
    return ("--model", str(ARITHMETIC_MODEL_DIR), *options, "--seed", str(seed))


def trained_groups(world, data: Path) -> list:
    """The world's strategy groups whose pairs are in the training file `data`."""
    from eval.experiments.strategy_mix import world_groups

    ids = {json.loads(line)["id"] for line in data.read_text(encoding="utf-8").splitlines()}
    return [g for g in world_groups(world) if g.id in ids]


def gate(world, groups, run: str, alpha: float, label: str, seed: int) -> list[dict]:
    """The gate's rows of one trained policy (per level: strategy mixes over its training candidates)."""
    from data.world.arithmetic import ARITHMETIC_MODEL_DIR
    from eval.experiments import strategy_mix as sm
    from eval.experiments.policies import load_policy
    from models.lora import disable_lora

    model, tokenizer = load_policy(run, model_dir=ARITHMETIC_MODEL_DIR)
    policy = sm.candidate_logps(model, tokenizer, groups)
    with disable_lora(model):
        reference = sm.candidate_logps(model, tokenizer, groups)
    rows = sm.gate_rows(world.arithmetic, groups, policy, reference, alpha, BETA)
    return [{"seed": seed, **r} for r in sm.gate_summary(rows, label, sorted({g_level(g) for g in groups}))]


def g_level(group) -> int:
    """A world arithmetic group's level, from its id 'arith-L5-train-003'."""
    return int(group.id.split("-")[1][1:])


# ---- sampling ---------------------------------------------------------------------------------------------------

def sample_problem(model, tokenizer, problem, setting: Setting, seed: int, n: int, max_new_tokens: int, generator):
    """(problems.csv row, sample records) of one problem under one setting and training seed."""
    from data.world import check_answer, extract_answer
    from data.world.arithmetic import STRATEGIES
    from eval.experiments.sampler import sample_texts
    from eval.experiments.strategy_mix import OTHER, strategy_of

    texts = sample_texts(model, tokenizer, problem.prompt, n, max_new_tokens, setting.temperature, generator)
    correct = [check_answer(problem, t) for t in texts]
    strategy = [strategy_of(problem, t) for t in texts]
    row = {"setting": setting.label, "seed": seed, "problem": problem.id, "level": problem.level,
           "prompt": problem.prompt, "n": n, "correct": sum(correct),
           "unique_fraction": len({extract_answer(t) for t in texts}) / n}
    for name in (*STRATEGIES[problem.level], OTHER):
        row[f"n_{name}"] = strategy.count(name)
        row[f"c_{name}"] = sum(c for c, s in zip(correct, strategy) if s == name)
    samples = [{"setting": setting.label, "seed": seed, "problem": problem.id, "text": t, "correct": c,
                "strategy": s} for t, c, s in zip(texts, correct, strategy)]
    return row, samples


def strategy_rows(problem_rows) -> list[dict]:
    """Per setting and level (all seeds): each strategy's share of the samples and its success rate."""
    out = []
    for (label, level) in dict.fromkeys((r["setting"], r["level"]) for r in problem_rows):
        at = [r for r in problem_rows if r["setting"] == label and r["level"] == level]
        total = sum(r["n"] for r in at)
        names = [k[2:] for k in at[0] if k.startswith("n_")]
        row = {"setting": label, "level": level, "samples": total}
        for name in names:
            count = sum(r[f"n_{name}"] for r in at)
            row[f"share_{name}"] = count / total
            row[f"success_{name}"] = sum(r[f"c_{name}"] for r in at) / count if count else ""
        out.append(row)
    return out


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---- the run ----------------------------------------------------------------------------------------------------

def train_all(out: Path, world, data: Path, settings, seeds, schedules: dict, progress: bool):
    """Train (or reuse) every policy for every seed with its schedule's (steps, lr) and print its gate.
    -> ({(policy, seed): run dir}, gate rows)."""
    from data.world.arithmetic import ARITHMETIC_MODEL_DIR  # noqa: F401 (checked by main)
    from eval.experiments.common import alpha_for
    from eval.experiments.policies import recipe_line, train_policy

    runs, gates = {}, []
    groups = trained_groups(world, data)
    for seed in seeds:
        for setting in settings:
            if setting.method == "reference" or (setting.policy, seed) in runs:
                continue
            started, alpha = time.perf_counter(), alpha_for(setting.ratio, BETA)
            steps, lr = schedules.get(setting.policy, schedules[setting.method])
            run = train_policy(out / "runs" / f"seed{seed}" / setting.policy, data, alpha, BETA, loss=setting.method,
                               steps=steps, extra=recipe(seed, lr), progress=progress)
            runs[setting.policy, seed] = str(run)
            rows = gate(world, groups, str(run), alpha, setting.policy, seed)
            gates += rows
            print(f"  trained {setting.policy} seed {seed} (alpha {alpha:g}, beta {BETA:g}, "
                  f"{time.perf_counter() - started:.0f} s); gate by level: " + "; ".join(
                      f"L{r['level']} TV {r['tv_strategy']:.3f} (candidates {r['tv']:.3f}) direct "
                      f"{r['policy_direct']:.2f} (closed "
                      f"{r['closed_direct']:.2f}){'' if r['gate_met'] else ' NOT MET'}" for r in rows), flush=True)
    for name, (steps, lr) in schedules.items():  # "dpo", "spl-2", "spl": the loss is the name's first word
        print(f"recipe ({name}): " + recipe_line(["--data", data, "--loss", name.split("-")[0], "--alpha", "ALPHA",
                                                  "--beta", BETA, "--steps", steps, *recipe("SEED", lr)]), flush=True)
    return runs, gates


def sample_all(out: Path, problems, settings, seeds, runs, n: int, n_reference: int, max_new_tokens: int,
               report, problem_rows: list, samples: list):
    """Sample every level (hard first), every setting and seed; `report()` after each level writes the tables."""
    import torch

    from data.world.arithmetic import ARITHMETIC_MODEL_DIR
    from eval.experiments.policies import load_policy
    from models.lora import merge_lora

    models = {}  # (policy, seed) -> (model, tokenizer): each policy loaded once, its LoRA merged for speed
    for name, level in LEVELS.items():
        started = time.perf_counter()
        at_level = [p for p in problems if p.level == level]
        for setting in settings:
            for seed in ([0] if setting.method == "reference" else seeds):
                if (setting.policy, seed) not in models:
                    run = runs.get((setting.policy, seed))
                    model, tokenizer = load_policy(run, model_dir=ARITHMETIC_MODEL_DIR)
                    models[setting.policy, seed] = (merge_lora(model) if run else model), tokenizer
                model, tokenizer = models[setting.policy, seed]
                generator = torch.Generator().manual_seed(1000 * seed + level)
                count = n_reference if setting.method == "reference" else n
                for problem in at_level:
                    row, texts = sample_problem(model, tokenizer, problem, setting, seed, count, max_new_tokens,
                                                generator)
                    problem_rows.append(row)
                    samples += texts
        print(f"  sampled the {name} level (level {level}, {len(at_level)} problems): "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        report()


def write_results(out: Path, settings, problem_rows, samples, gates, screen, n: int, experiment: dict) -> None:
    """Print the tables and write every output file (module docstring) from the rows so far."""
    from eval.experiments.best_of_n_stats import difference_rows, ks_up_to, level_rows, matching_rows
    from eval.experiments.common import write_jsonl

    labels = [s.label for s in settings]
    ks = ks_up_to(n)
    table = level_rows(problem_rows, labels, ks)
    baseline = Setting("dpo", 1.0, 1.0).label
    others = [s.label for s in settings if s.method != "reference" and s.label != baseline]
    policy_rows = [r for r in problem_rows if r["setting"] != "reference T=1"]
    shown = [k for k in PAPER_KS if k <= n] or ks
    differences = difference_rows(policy_rows, baseline, others, shown) if others else []
    matching = matching_rows(policy_rows, baseline, others, n, shown) if others else []
    strategies = strategy_rows(problem_rows)
    print(format_tables(table, labels, shown, strategies))
    if differences:
        print(format_differences(differences, matching))
    written = [write_csv(out / "pass_at_k.csv", padded(table)), write_csv(out / "problems.csv", padded(problem_rows)),
               write_csv(out / "strategies.csv", padded(strategies)), write_csv(out / "gate.csv", padded(gates)),
               write_csv(out / "screen.csv", screen), write_jsonl(out / "samples.jsonl", samples)]
    if differences:
        written += [write_csv(out / "differences.csv", differences), write_csv(out / "matching.csv", matching)]
    written.append(write_json(out / "experiment.json", experiment))
    print(f"wrote {', '.join(p.name for p in written)} in {out}", flush=True)


# ---- --merge: runs of some seeds each, as one ----------------------------------------------------------------------

INTEGER_COLUMNS = ("seed", "level", "n", "correct")


def read_part(part: Path) -> dict:
    """One run's outputs back from its files: problems.csv typed as sample_problem wrote it (the padding "" left
    out), samples.jsonl, gate.csv and screen.csv as text (written back as read), experiment.json."""
    from eval.experiments.common import read_csv

    rows = []
    for row in read_csv(part / "problems.csv")[1]:
        row = {k: v for k, v in row.items() if v != ""}
        rows.append({k: int(v) if k in INTEGER_COLUMNS or k[:2] in ("n_", "c_") else
                     float(v) if k == "unique_fraction" else v for k, v in row.items()})
    return {"experiment": json.loads((part / "experiment.json").read_text(encoding="utf-8")), "rows": rows,
            "samples": [json.loads(line) for line in (part / "samples.jsonl").read_text(encoding="utf-8").splitlines()],
            "gates": read_csv(part / "gate.csv")[1], "screen": read_csv(part / "screen.csv")[1]}


def merge(parts: list[Path], out: Path) -> None:
    """--merge PART ...: runs of this experiment that each trained and sampled some of the seeds (one process per
    core, `--seeds 0` and `--seeds 1`), written as the one run with all the seeds would write them. A seed's policies
    and draws do not depend on the other seeds (train.py --seed; the sampling generator is seeded by seed and
    level), so the union of the parts' rows, in the one run's order, is that run's; the reference (sampled with
    seed 0 in every part, the same draws) is kept once. The parts must agree on everything but their seeds."""
    read = [read_part(Path(part)) for part in parts]

    def same(e: dict) -> dict:  # what must agree: all but the seeds, the runs, the times, and where the pairs file is
        recipe = list(e["recipe"])
        recipe[recipe.index("--data") + 1] = "DATA"
        return {k: v for k, v in e.items() if k not in ("seeds", "runs", "seconds", "commit", "data")} | {
            "recipe": recipe, "pairs": Path(e["data"]).read_bytes()}

    first = same(read[0]["experiment"])
    for part, r in zip(parts[1:], read[1:]):
        if same(r["experiment"]) != first:
            raise ValueError(f"{part}: not the same experiment as {parts[0]} (settings, problems, schedules, pairs "
                             f"or recipe)")
    seeds = [s for r in read for s in r["experiment"]["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"a seed appears in two parts ({', '.join(map(str, seeds))})")
    experiment = dict(read[0]["experiment"], seeds=sorted(seeds), merged_from=[str(p) for p in parts],
                      commits={str(p): r["experiment"]["commit"] for p, r in zip(parts, read)},
                      runs={k: v for r in read for k, v in r["experiment"]["runs"].items()},
                      seconds={str(p): r["experiment"]["seconds"] for p, r in zip(parts, read)})
    settings = [Setting(s["method"], s["ratio"], s["temperature"]) for s in experiment["settings"]]
    labels, levels = [s.label for s in settings], list(LEVELS.values())
    reference = Setting("reference", 1.0, 1.0).label
    rows = [row for i, r in enumerate(read) for row in r["rows"] if i == 0 or row["setting"] != reference]
    rows.sort(key=lambda row: (levels.index(row["level"]), labels.index(row["setting"]), row["seed"]))  # stable
    level_of = {row["problem"]: row["level"] for row in rows}
    samples = [x for i, r in enumerate(read) for x in r["samples"] if i == 0 or x["setting"] != reference]
    samples.sort(key=lambda x: (levels.index(level_of[x["problem"]]), labels.index(x["setting"]), x["seed"]))
    gates = sorted((g for r in read for g in r["gates"]), key=lambda g: int(g["seed"]))
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, settings, rows, samples, gates, read[0]["screen"], experiment["num_samples"], experiment)


def padded(rows) -> list[dict]:
    """Rows with the union of their keys (in first-seen order), "" where a row has none (the reference's n is
    smaller, so it has fewer pass@k columns; levels have different strategies)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k, "") for k in keys} for r in rows]


def format_tables(table, labels, ks, strategies) -> str:
    """Tables 1-3: pass@k per level and setting [two-way 95% interval], then the sampled strategy mixes."""
    lines = []
    for level in sorted({r["level"] for r in table}, reverse=True):
        by = {r["setting"]: r for r in table if r["level"] == level}
        shown = [label for label in labels if label in by]
        first = by[shown[0]]
        lines.append(f"\nlevel {level} ({first['problems']} problems; mean over training seeds and problems "
                     f"[95% two-way bootstrap interval])")
        lines.append(f"{'N':>5}" + "".join(f"{label:>20}" for label in shown))
        for k in ks:
            cells = [f"{100 * by[s][f'pass@{k}']:.1f} [{100 * by[s][f'pass@{k}_low']:.0f},"
                     f"{100 * by[s][f'pass@{k}_high']:.0f}]" if f"pass@{k}" in by[s] else "-" for s in shown]
            lines.append(f"{k:>5}" + "".join(f"{c:>20}" for c in cells))
        for r in (r for r in strategies if r["level"] == level):
            lines.append(f"  {r['setting']:<14} samples: {mix_text(r)}")
    return "\n".join(lines)


def mix_text(row) -> str:
    """'split 60% (1.5% right), direct 30% (0.4% right)' from a strategies.csv row."""
    parts = []
    for key, share in row.items():
        name = key[len("share_"):]
        if key.startswith("share_") and share > 0:
            parts.append(f"{name} {100 * share:.0f}% ({100 * row['success_' + name]:.1f}% right)")
    return ", ".join(parts)


def format_differences(differences, matching) -> str:
    top = max(r["k"] for r in differences)
    lines = [f"\npass@{top} (and pass@1) minus DPO T=1's, points [paired two-way 95% interval]:"]
    for r in differences:
        if r["k"] in (1, top):
            lines.append(f"  level {r['level']} k={r['k']:<4} {r['setting']:<14} {100 * r['difference']:+6.1f} "
                         f"[{100 * r['low']:+.1f}, {100 * r['high']:+.1f}]{'  *' if r['excludes_zero'] else ''}")
    n = max(r["baseline_samples"] for r in matching)
    lines.append(f"samples needed to match DPO T=1's best-of-{n} (Figure 9; '-': not within {n}):")
    lines += [f"  level {r['level']} {r['setting']:<14} {r['samples_needed'] or '-':>4}"
              for r in matching if r["baseline_samples"] == n]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = experiment_parser(__doc__, "runs/exp_best_of_n", "seconds: 2 seeds, DPO and SPL 2, 2 training steps, 4 "
                          "problems, 8 samples", "SPL alpha/beta values (default %s)" % ",".join(
                              f"{r:g}" for r in SPL_RATIOS), BETA, "each policy's: " + ", ".join(
                              f"{m} {st}" for m, (st, _) in SCHEDULES.items()), None, "training steps per policy",
                          "peak learning rate (default: each policy's, " + ", ".join(
                              f"{m} {lr:g}" for m, (_, lr) in SCHEDULES.items()) + ")")
    p.add_argument("--temperatures", help="DPO's token temperatures (default %s)"
                   % ",".join(f"{t:g}" for t in TEMPERATURES))
    p.add_argument("--seeds", help="training seeds (default %s)" % ",".join(map(str, SEEDS)))
    p.add_argument("--problems", help="problems per level as hard,medium,easy (default %s)"
                   % ",".join(str(PROBLEMS[k]) for k in LEVELS))
    p.add_argument("--num-samples", type=int, help=f"n samples per problem, setting and seed (default {NUM_SAMPLES})")
    p.add_argument("--reference-samples", type=int, help=f"the reference's n, for scale (default {REFERENCE_SAMPLES})")
    p.add_argument("--max-new-tokens", type=int, help=f"default {MAX_NEW_TOKENS}")
    p.add_argument("--merge", nargs="+", metavar="PART", help="write into --out the one result of runs that each "
                   "did some of the seeds (e.g. --seeds 0 and --seeds 1 in two processes); trains and samples nothing")
    args = p.parse_args(argv)
    if args.merge:
        try:
            merge([Path(part) for part in args.merge], Path(args.out))
        except (OSError, ValueError, KeyError) as error:
            print(f"best_of_n: error: --merge: {error}", file=sys.stderr)
            return 1
        return 0
    quick = QUICK if args.quick else {}
    temperatures = parse_list(p, "--temperatures", args.temperatures, TEMPERATURES)
    ratios = parse_list(p, "--ratios", args.ratios, quick.get("ratios", SPL_RATIOS))
    seeds = tuple(dict.fromkeys(parse_list(p, "--seeds", args.seeds, SEEDS, int)))
    counts = parse_list(p, "--problems", args.problems, quick.get("problems", PROBLEMS).values(), int)
    schedules = {method: (option(args.steps, quick, "steps", steps), args.lr if args.lr is not None else lr)
                 for method, (steps, lr) in SCHEDULES.items()}
    n = option(args.num_samples, quick, "num_samples", NUM_SAMPLES)
    n_reference = option(args.reference_samples, quick, "reference_samples", REFERENCE_SAMPLES)
    max_new_tokens = option(args.max_new_tokens, quick, "max_new_tokens", MAX_NEW_TOKENS)
    check_arguments(p, [
        (all(t > 0 for t in temperatures) and 1.0 in temperatures,
         f"--temperatures must be > 0 and hold 1 (DPO T=1 is the baseline), got {temperatures}"),
        (all(r > 1 for r in ratios), f"--ratios: SPL needs alpha/beta > 1 (1 is DPO), got {ratios}"),
        (args.beta == BETA, f"--beta: this experiment's closed forms and runs use beta = {BETA}, got {args.beta}"),
        (all(s >= 0 for s in seeds), f"--seeds must be >= 0, got {seeds}"),
        (len(counts) == 3 and all(c >= 1 for c in counts), f"--problems: three counts >= 1, got {counts}"),
        (all(st > 0 and lr > 0 for st, lr in schedules.values()), f"need --steps and --lr > 0, got {args.steps}, "
         f"{args.lr}"),
        (n >= 1 and n_reference >= 1 and max_new_tokens >= 1,
         f"need --num-samples, --reference-samples, --max-new-tokens >= 1 (got {n}, {n_reference}, {max_new_tokens})")])

    from data.world import load_world
    from data.world.arithmetic import ARITHMETIC_MODEL_DIR
    from eval.experiments.policies import load_policy
    from spl.cli import checkpoint_parameters, choose_threads

    if not (ARITHMETIC_MODEL_DIR / "config.json").is_file():
        p.error(f"{ARITHMETIC_MODEL_DIR}: no arithmetic model; build it with `python -m data.world.build "
                f"--train-arithmetic-model`")
    choose_threads(args.threads, checkpoint_parameters(ARITHMETIC_MODEL_DIR), "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = ([Setting("reference", 1.0, 1.0)] + [Setting("dpo", 1.0, t) for t in temperatures]
                + [Setting("spl", r, 1.0) for r in ratios])
    started = time.perf_counter()
    world = load_world()
    print(f"experiment 3, best-of-N as a mechanism test: seeds {', '.join(map(str, seeds))}; DPO at T in "
          f"{', '.join(f'{t:g}' for t in temperatures)}, SPL at alpha/beta in {', '.join(f'{r:g}' for r in ratios)} "
          f"(beta {BETA:g}); steps and peak lr: " + ", ".join(f"{m} {st} at {lr:g}" for m, (st, lr) in
                                                                schedules.items()) + f"; {n} samples per problem",
          flush=True)
    reference, tokenizer = load_policy(None, model_dir=ARITHMETIC_MODEL_DIR)
    problems, screen = choose_problems(world, reference, tokenizer, dict(zip(LEVELS, counts)))
    hard = [r for r in screen if r["level_name"] == "hard"]
    print(f"problems: {', '.join(f'{c} {k} (level {LEVELS[k]})' for k, c in zip(LEVELS, counts))}; the hard ones "
          f"kept {sum(r['kept'] for r in hard)} of {len(hard)} fresh draws with reference success in "
          f"[1/{1 / SCREEN[0]:.0f}, 1/{1 / SCREEN[1]:.0f}]", flush=True)
    data = pairs_file(out, world, set(LEVELS.values()), quick.get("max_pairs"))
    runs, gates = train_all(out, world, data, settings, seeds, schedules, args.progress)
    experiment = {"settings": [dataclasses.asdict(s) | {"label": s.label} for s in settings], "seeds": list(seeds),
                  "schedules": {m: {"steps": st, "lr": lr} for m, (st, lr) in schedules.items()}, "beta": BETA,
                  "data": str(data), "levels": LEVELS,
                  "problems": dict(zip(LEVELS, counts)), "screen": list(SCREEN), "num_samples": n,
                  "reference_samples": n_reference, "max_new_tokens": max_new_tokens, "runs": {
                      f"{k[0]} seed {k[1]}": v for k, v in runs.items()},
                  "recipe": ["--data", str(data), "--loss", "dpo|spl", "--alpha", "ratio*beta", "--beta", str(BETA),
                             "--steps", "STEPS", *recipe("SEED", "LR")], "commit": commit()}
    problem_rows, samples = [], []

    def report():
        experiment["seconds"] = round(time.perf_counter() - started, 1)
        write_results(out, settings, problem_rows, samples, gates, screen, n, experiment)

    sample_all(out, problems, settings, seeds, runs, n, n_reference, max_new_tokens, report, problem_rows, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
