"""Experiment 2, diversity against quality (the paper's Figures 1-2) on the embedded world's stories.

    python eval/experiments/diversity.py            # DPO + 4 sampling sweeps against SPL at alpha/beta in {1.5, 2, 4, 11}
    python eval/experiments/diversity.py --quick    # two policies, one setting per method, a few samples (the test's run)

Prompts are the world's six story prompts ("Write a short story about a doctor.", ...). A well-formed answer is
one of the templated stories (`data.world.validate_story`); the population prefers some names and relations per
profession (ratio max/min 10 and 7), the SFT text that taught the reference model is flatter, and raters prefer
a well-formed story to its corrupted copy 95% of the time (`story_pairs_soft.jsonl`, one soft-labelled record
per pair). LoRA policies are trained on those pairs by train.py: DPO (alpha = beta = 0.1) and SPL at global
temperatures alpha/beta > 1, beta = 0.1 (Eq. 5; SPL at alpha/beta = 1 is DPO). The settings compared, N = 16
samples per prompt each (Section 4.1, Appendix B.3):

    dpo        DPO, token temperature T in {1, 1.1, ..., 1.5}            (Eq. 6, per token)
    dpo+min-p  DPO, min-p p_base = 0.1, T in {1.3, 1.5, 2, 2.5, 3, 3.5, 4}
    dpo+top-p  DPO, top-p 0.9, T in {1.1, ..., 1.7}
    dpo+top-k  DPO, top-k 11, T in {1.1, 1.2, 1.3, 1.5, 2, 2.5}
    spl        SPL at global temperature alpha/beta, sampled at T = 1     (Eq. 7-10, per sequence)
    reference  the reference model at T = 1, for scale

top-k: the paper keeps 180 of Mistral's 32000 tokens (0.56%); the same fraction of the world's 2000 is
round(180 * 2000 / 32000) = 11 (`scaled_top_k`). Filters follow sample.py's order (temperature, then the filter).

Per setting, over `groups` rounds of N samples for each prompt (an "input" is one round of one prompt):
  diversity  name entropy and relation entropy (nats, the entropy of the attribute among the input's N stories,
             `eval.metrics.attribute_entropy`; stories whose attribute cannot be read are left out, an input with
             none scores 0), embedding cosine distance (Eq. 44; embeddings are the reference model's mean-pooled
             final hidden states of BOS + the response), distinct-2 (word bigrams among the input's N responses);
             each averaged over inputs;
  quality    validity (the fraction of well-formed stories: 1 - the paper's aberrations) and the reference
             model's cross-entropy per token of the samples, -sum log pi_ref(y | x) / sum |y| (lower is better).
A setting is on the Pareto front of a (diversity, quality) panel when no other DPO or SPL setting is at least as
good on both and better on one (`pareto_front`; the reference is shown for scale, outside the fronts); the table
counts each setting's fronts over the 4 x 2 panels.

Outputs in --out: `diversity.csv` (the printed table plus one 0/1 column per panel), `samples.jsonl` (every
sample: setting, prompt, token ids, text, valid), `experiment.json` (the settings and the policies' run
directories) and `diversity.png` when matplotlib is installed. Training runs live in --out/runs/ and are reused
when the configuration is unchanged.

Training: LoRA r = 8 (lora_alpha 16) on all seven projections, lr 3e-3, 10 warmup steps, batch 16, 40 steps,
given explicitly so that changes to train.py's defaults do not change this experiment. Far fewer steps than the
opinion experiments use, on purpose: on the story pairs every preference-trained policy loses well-formed
stories as it trains, DPO fastest. 40 steps move DPO's names towards the majority while many of its stories
are still well-formed: the paper's regime, a policy near its reference (lr 1e-5 there), rather than the
closed-form optimum the opinion experiments reach (the measurements behind this choice: the README's
Experiments section).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

from eval.experiments.common import (alpha_for, check_arguments, experiment_parser, first_records, option, parse_list, pyplot,
                             save_figure, write_csv, write_json, write_jsonl)
# torch, and the library modules that load it, are imported inside the functions that use them: --help and usage
# errors then answer before torch's seconds of start-up.

BETA = 0.1
SPL_RATIOS = (1.5, 2.0, 4.0, 11.0)  # alpha / beta; the paper sweeps [1, 11] (Appendix B.3)
STEPS = 40
LR = 3e-3
TRAIN_ARGS = ("--lora-rank", 8, "--lora-alpha", 16, "--warmup-steps", 10, "--batch-size", 16, "--log-every", 10)
NUM_SAMPLES = 16  # N per input (Section 4.1)
GROUPS = 4  # rounds of N samples per prompt
MAX_NEW_TOKENS = 48  # the longest SFT story is 37 tokens
PAPER_TOP_K, PAPER_VOCAB = 180, 32000
# The paper's token-temperature sweeps (Appendix B.3): (method, filter, temperatures)
SWEEPS = (("dpo", {}, (1.0, 1.1, 1.2, 1.3, 1.4, 1.5)),
          ("dpo+min-p", {"min_p": 0.1}, (1.3, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0)),
          ("dpo+top-p", {"top_p": 0.9}, (1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7)),
          ("dpo+top-k", {"top_k": None}, (1.1, 1.2, 1.3, 1.5, 2.0, 2.5)))  # top_k None: scaled_top_k(vocab)
QUICK = dict(ratios=(2.0,), temperatures={"dpo": (1.0, 1.5), "dpo+min-p": (2.0,), "dpo+top-p": (1.5,),
                                          "dpo+top-k": (2.0,)},
             steps=2, max_pairs=32, prompts=2, num_samples=4, groups=1)
DIVERSITY = ("name_entropy", "relation_entropy", "cosine_distance", "distinct_2")
QUALITY = (("validity", +1), ("reference_ce", -1))  # (column, +1 if higher is better else -1)


@dataclasses.dataclass(frozen=True)
class Setting:
    method: str  # reference, dpo, dpo+min-p, dpo+top-p, dpo+top-k, spl
    policy: str  # the policy's name: reference, dpo or spl-<alpha/beta>
    ratio: float  # the policy's global temperature alpha/beta (1 for DPO and the reference)
    temperature: float  # token temperature at sampling
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    @property
    def label(self) -> str:
        parts = [self.method, f"a/b={self.ratio:g}" if self.method == "spl" else f"T={self.temperature:g}"]
        parts += [f"{name}={value:g}" for name, value in (("k", self.top_k), ("p", self.top_p),
                                                           ("min_p", self.min_p)) if value is not None]
        return " ".join(parts)


# ---- pure functions ---------------------------------------------------------------------------------------------

def scaled_top_k(vocab_size: int) -> int:
    """The paper's top-k as the same fraction of a vocabulary: round(180 * V / 32000), at least 1."""
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"scaled_top_k: vocab_size must be a positive integer, got {vocab_size!r}")
    return max(1, round(PAPER_TOP_K * vocab_size / PAPER_VOCAB))


def pareto_front(diversity, quality) -> list[bool]:
    """For points (d_i, q_i), both higher-is-better: True where no point j has d_j >= d_i and q_j >= q_i with one
    of the two strict. Equal points are on the front together. NaN (an undefined metric) is never on it."""
    diversity, quality = [float(d) for d in diversity], [float(q) for q in quality]
    if len(diversity) != len(quality):
        raise ValueError(f"pareto_front: {len(diversity)} diversity values for {len(quality)} quality values")
    points = list(zip(diversity, quality))
    beaten = dominated(points, points)
    return [not (math.isnan(d) or math.isnan(q) or out) for (d, q), out in zip(points, beaten)]


def dominated(points, by) -> list[bool]:
    """For each (d, q) in points (both higher-is-better): whether some point of `by` is at least as good on both
    and better on one."""
    return [any(d2 >= d and q2 >= q and (d2 > d or q2 > q) for d2, q2 in by) for d, q in points]


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def sweep_settings(ratios, temperatures: dict, vocab_size: int) -> list[Setting]:
    """The reference, the four DPO sampling sweeps, then SPL at each global temperature (all at T = 1 but DPO's)."""
    settings = [Setting("reference", "reference", 1.0, 1.0)]
    for method, filters, default_temperatures in SWEEPS:
        filters = {name: (scaled_top_k(vocab_size) if name == "top_k" else value) for name, value in filters.items()}
        settings += [Setting(method, "dpo", 1.0, t, **filters) for t in temperatures.get(method, default_temperatures)]
    settings += [Setting("spl", f"spl-{ratio:g}", ratio, 1.0) for ratio in ratios]
    return settings


# ---- measuring one setting --------------------------------------------------------------------------------------

def story_metrics(prompts, texts, num_samples: int) -> tuple[dict, list[bool]]:
    """Validity over all texts, and per input (consecutive runs of num_samples texts, one prompt each) the name
    and relation entropy and distinct-2, averaged over inputs. -> (metrics, each text's validity)."""
    from eval.metrics import attribute_entropy, distinct_n, story_attributes

    attributes = story_attributes(prompts, texts)
    inputs = [slice(start, start + num_samples) for start in range(0, len(texts), num_samples)]

    def entropy(values):  # an input whose stories all hide the attribute has nothing diverse: 0
        return attribute_entropy(values) if any(v is not None for v in values) else 0.0

    return {"validity": mean(attributes["valid"]),
            "name_entropy": mean(entropy(attributes["name"][s]) for s in inputs),
            "relation_entropy": mean(entropy(attributes["relation"][s]) for s in inputs),
            "distinct_2": mean(distinct_n(texts[s], 2) for s in inputs)}, attributes["valid"]


def measure(setting: Setting, model, reference, tokenizer, prompts, num_samples: int, groups: int,
            max_new_tokens: int, seed: int) -> tuple[dict, list[dict]]:
    """Sample N completions per input from `model` under the setting and score them. -> (row, sample records)."""
    import torch

    from eval.metrics import mean_pooled_hidden_states, pairwise_cosine_distance, sequence_nll
    from models.generate import sample_completions

    generator = torch.Generator().manual_seed(seed)
    inputs = [prompt for prompt in prompts for _ in range(groups)]
    completions = sample_completions(model, tokenizer, inputs, num_samples, max_new_tokens, setting.temperature,
                                     setting.top_k, setting.top_p, setting.min_p, chat=True, generator=generator)
    texts = [c.text for c in completions]
    row, valid = story_metrics([c.prompt for c in completions], texts, num_samples)
    responses = [[tokenizer.bos_id] + [t for t in c.token_ids if t != tokenizer.eos_id] for c in completions]
    embeddings = mean_pooled_hidden_states(reference, responses, pad_id=tokenizer.pad_id)  # (inputs * N, D)
    row["cosine_distance"] = float(pairwise_cosine_distance(  # Eq. 44, per input, then the mean
        embeddings.view(len(inputs), num_samples, -1)).mean())
    nll = sequence_nll(reference, [c.prompt_ids for c in completions], [c.token_ids for c in completions],
                       pad_id=tokenizer.pad_id)  # (inputs * N,)
    row["reference_ce"] = float(nll.sum()) / sum(len(c.token_ids) for c in completions)
    samples = [{"setting": setting.label, "input": i // num_samples, "prompt": c.prompt, "prompt_ids": c.prompt_ids,
                "token_ids": c.token_ids, "text": c.text, "valid": ok}
               for i, (c, ok) in enumerate(zip(completions, valid))]
    return row, samples


def mark_fronts(rows) -> None:
    """Add a 0/1 column per (diversity, quality) panel and `fronts`, the number of panels a row is on. The fronts
    are among the preference-trained settings (DPO and SPL), as in Figure 2; the reference row, shown for scale,
    gets empty marks."""
    trained = [row for row in rows if row["method"] != "reference"]
    for diversity in DIVERSITY:
        for quality, sign in QUALITY:
            on = pareto_front([r[diversity] for r in trained], [sign * r[quality] for r in trained])
            for row in rows:
                row[f"front:{diversity}/{quality}"] = ""
            for row, flag in zip(trained, on):
                row[f"front:{diversity}/{quality}"] = int(flag)
    for row in rows:
        row["fronts"] = "" if row["method"] == "reference" else \
            sum(v for k, v in row.items() if k.startswith("front:"))


# ---- running it -------------------------------------------------------------------------------------------------

def run_experiment(out: Path, settings, steps: int, lr: float, beta: float, num_samples: int, groups: int,
                   prompts: int | None, max_pairs: int | None, max_new_tokens: int, seed: int,
                   progress: bool = False) -> tuple[list[dict], list[dict], dict]:
    """Train (or reuse) the policies the settings need, then measure every setting. -> (rows, samples, runs)."""
    from data.world import load_world
    from eval.experiments.policies import load_policy, train_policy

    world = load_world()
    data = first_records(out, world.files["story_pairs_soft"], max_pairs)
    story_prompts = list(world.stories.prompts.values())[:prompts]
    reference, tokenizer = load_policy(None)
    runs, rows, samples = {}, [], []
    for setting in settings:
        if setting.policy not in runs and setting.policy != "reference":
            started = time.perf_counter()
            alpha = alpha_for(setting.ratio, beta)
            runs[setting.policy] = str(train_policy(
                out / "runs" / setting.policy, data, alpha, beta, loss="dpo" if setting.policy == "dpo" else "spl",
                steps=steps, extra=TRAIN_ARGS + ("--lr", lr, "--seed", seed), progress=progress))
            print(f"  trained {setting.policy} (alpha = {alpha:g}, beta = {beta:g}): "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        started = time.perf_counter()
        model = reference if setting.policy == "reference" else load_policy(runs[setting.policy])[0]
        row, setting_samples = measure(setting, model, reference, tokenizer, story_prompts, num_samples, groups,
                                       max_new_tokens, seed)
        rows.append({"setting": setting.label, **dataclasses.asdict(setting), **row})
        samples += setting_samples
        print(f"  {setting.label:<28} validity {row['validity']:.3f}  H(name) {row['name_entropy']:.3f}  "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    mark_fronts(rows)
    return rows, samples, runs


def format_table(rows) -> str:
    head = (f"{'setting':<28} {'H(name)':>7} {'H(rel)':>7} {'cos dist':>8} {'dist-2':>7} {'valid':>6} "
            f"{'ref CE':>7} {'fronts':>7}")
    lines = [head, f"{'':<28} {'diversity (higher: more diverse)':^32} {'quality':^14}",
             "-" * len(head)]
    for r in rows:
        lines.append(f"{r['setting']:<28} {r['name_entropy']:>7.3f} {r['relation_entropy']:>7.3f} "
                     f"{r['cosine_distance']:>8.4f} {r['distinct_2']:>7.3f} {r['validity']:>6.3f} "
                     f"{r['reference_ce']:>7.3f} "
                     + (f"{r['fronts']:>5}/{len(DIVERSITY) * len(QUALITY)}" if r["fronts"] != "" else f"{'-':>7}"))
    lines.append("\nPareto fronts among DPO and SPL (diversity vs quality; ref CE: lower is better), and how many of "
                 "DPO's token-temperature points and of its min-p / top-p / top-k points some SPL point dominates:")
    for diversity in DIVERSITY:
        for quality, sign in QUALITY:
            on = [r["setting"] for r in rows if r[f"front:{diversity}/{quality}"]]

            def points(methods):
                return [(r[diversity], sign * r[quality]) for r in rows if r["method"] in methods]

            spl = points(("spl",))
            counts = [f"{sum(dominated(points(methods), spl))}/{len(points(methods))}"
                      for methods in (("dpo",), ("dpo+min-p", "dpo+top-p", "dpo+top-k"))]
            lines.append(f"  {diversity} / {quality}: SPL dominates {counts[0]} and {counts[1]}; "
                         f"front: {'; '.join(on)}")
    return "\n".join(lines)


def plot(path: Path, rows) -> bool:
    """One panel per (diversity, quality) pair, a line per method; points off the front drawn lighter."""
    plt = pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(len(QUALITY), len(DIVERSITY), figsize=(4 * len(DIVERSITY), 3.5 * len(QUALITY)))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, (quality, _) in enumerate(QUALITY):
        for j, diversity in enumerate(DIVERSITY):
            axis = axes[i][j]
            for index, method in enumerate(methods):
                points = [r for r in rows if r["method"] == method]
                color = f"C{index}"
                axis.plot([r[diversity] for r in points], [r[quality] for r in points], "-", color=color, alpha=0.4)
                for r in points:
                    front = r[f"front:{diversity}/{quality}"]
                    axis.plot(r[diversity], r[quality], "o", color=color, alpha=1.0 if front else 0.3,
                              label=method if r is points[0] else None)
            axis.set_xlabel(diversity)
            axis.set_ylabel(quality + (" (lower is better)" if quality == "reference_ce" else ""))
    axes[0][0].legend(fontsize=7)
    save_figure(plt, figure, path, dpi=110)
    return True


def main(argv=None) -> int:
    p = experiment_parser(__doc__, "runs/exp_diversity", "SPL alpha/beta = 2 and one setting per sampling method, "
                                                       "a few samples and training steps",
                          "SPL alpha/beta values, comma-separated (default %s)"
                   % ",".join(f"{r:g}" for r in SPL_RATIOS),
                          BETA, STEPS, LR, "training steps per policy")
    p.add_argument("--num-samples", type=int, help=f"N samples per input (default {NUM_SAMPLES})")
    p.add_argument("--groups", type=int, help=f"inputs per prompt, each of N samples (default {GROUPS})")
    p.add_argument("--prompts", type=int, help="use the first P story prompts (default all six)")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    quick = QUICK if args.quick else {}
    ratios = parse_list(p, "--ratios", args.ratios, quick.get("ratios", SPL_RATIOS))
    steps = option(args.steps, quick, "steps", STEPS)
    num_samples = option(args.num_samples, quick, "num_samples", NUM_SAMPLES)
    groups = option(args.groups, quick, "groups", GROUPS)
    prompts = option(args.prompts, quick, "prompts", None)
    checks = [(all(r > 1 for r in ratios), f"--ratios: SPL needs alpha/beta > 1 (1 is DPO), got {ratios}"),
              (args.beta > 0 and args.lr > 0, f"--beta and --lr must be > 0, got {args.beta}, {args.lr}"),
              (steps > 0 and num_samples >= 2 and groups >= 1 and args.max_new_tokens >= 1,
               f"need --steps > 0, --num-samples >= 2, --groups >= 1, --max-new-tokens >= 1 "
               f"(got {steps}, {num_samples}, {groups}, {args.max_new_tokens})"),
              (prompts is None or 1 <= prompts <= 6, f"--prompts must be in 1..6, got {prompts}")]
    check_arguments(p, checks)

    import torch

    from spl.cli import checkpoint_parameters, choose_threads
    from data.world import MODEL_DIR
    from models import Tokenizer

    choose_threads(args.threads, checkpoint_parameters(MODEL_DIR), "cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = Tokenizer(MODEL_DIR / "tokenizer.model").vocab_size
    settings = sweep_settings(ratios, quick.get("temperatures", {}), vocab_size)
    print(f"experiment 2, diversity against quality: {len(settings)} settings, N = {num_samples} samples x "
          f"{groups} inputs per prompt; policies: DPO and SPL at alpha/beta in {', '.join(f'{r:g}' for r in ratios)} "
          f"(beta = {args.beta:g}), {steps} steps at lr {args.lr:g}; top-k = {scaled_top_k(vocab_size)} of "
          f"{vocab_size} (the paper's {PAPER_TOP_K} of {PAPER_VOCAB})", flush=True)
    started = time.perf_counter()
    rows, samples, runs = run_experiment(out, settings, steps, args.lr, args.beta, num_samples, groups, prompts,
                                         quick.get("max_pairs"), args.max_new_tokens, args.seed, args.progress)
    print("\n" + format_table(rows))
    write_csv(out / "diversity.csv", rows)
    write_jsonl(out / "samples.jsonl", samples)
    experiment = {"settings": [dataclasses.asdict(s) | {"label": s.label} for s in settings], "runs": runs,
                  "beta": args.beta, "steps": steps, "lr": args.lr, "num_samples": num_samples, "groups": groups,
                  "prompts": prompts, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                  "top_k": scaled_top_k(vocab_size), "vocab_size": vocab_size,
                  "seconds": round(time.perf_counter() - started, 1)}
    write_json(out / "experiment.json", experiment)
    written = [out / "diversity.csv", out / "samples.jsonl", out / "experiment.json"]
    if plot(out / "diversity.png", rows):
        written.append(out / "diversity.png")
    print(f"\nwrote {', '.join(map(str, written))} ({experiment['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
