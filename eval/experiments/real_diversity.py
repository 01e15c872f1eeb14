"""Claim 2 on real text: SPL's sequence-level temperature against token-level sampling on SmolLM2-135M-Instruct.

    python -m eval.experiments.real_diversity                  # 12 prompts: the sweep, the table, the Pareto plot
    python -m eval.experiments.real_diversity --train-tau 2    # and SPL trained on uniform preferences (LoRA)
    python -m eval.experiments.real_diversity --quick          # the world's tiny model, 2 prompts (the test)

The paper (Figs 1-2) finds that SPL's global temperature alpha/beta trades diversity for quality better than
token temperature, min-p, top-p or top-k. SPL's optimum is pi* ∝ pi_ref^(beta/alpha) p^(1/alpha) (Prop. A.1);
with uniform preferences (every pair labelled 1/2) p is flat and pi* = pi_ref^(1/tau) / Z with tau = alpha/beta:
a temperature on whole sequences. This script reaches that policy two ways and compares it with the token-level
methods on open-ended prompts (PROMPTS), all from the same reference model:

  (a) training-free, by self-normalised importance resampling: draw a pool of M responses per prompt at T = 1;
      target pi_ref^(1/tau), proposal pi_ref, so w_i ∝ pi_ref(y_i)^(1/tau - 1), normalised over the pool. Every
      metric is the w-weighted estimate over the pool (pairwise distances over distinct pairs, weighted by
      w_i w_j); Vendi is computed on N draws with replacement (sampling-importance-resampling, the samples a
      user would get: duplicates when the weights are uneven). The effective sample size (sum w)^2 / sum w^2 says
      how far the pool stretches: the wider tau is from 1, the fewer samples carry the estimate.
  (b) by training (--train-tau): pairs of the pool's own responses labelled chosen_prob = 0.5, trained with
      train.py (SPL, alpha/beta = tau, the main job's recipe); then sampled at T = 1. Its distance to the closed
      form: the slope of log pi_theta(y) on log pi_ref(y) over held-out pool responses (per-prompt centred), which
      Prop. A.1 puts at 1/tau.

Responses are cut at --tokens new tokens; every method is judged on the same budget, so "sequence" means the
response up to that cut (EOS included when it came): pi_ref^(1/tau) is then the tempered distribution of those
truncated responses, which is what (a) targets exactly and what (b)'s loss sees.

Diversity: all-MiniLM-L6-v2 sentence embeddings (eval/embeddings.py), the mean pairwise cosine distance over
distinct pairs (Eq. 44 without its i = j terms: the population quantity E[1 - cos(phi(y), phi(y'))]) and the
Vendi score of N responses. Quality: the reference's own per-token loss, -log pi_ref(y) / |y| (T = 1, unfiltered;
lower is better), and a judged proxy: relevance, cos(phi(prompt), phi(y)) under the same MiniLM. Why that judge:
MiniLM was trained contrastively on ~1B (question, answer)-style pairs to put an answer near its question, it is
independent of SmolLM2 (so the per-token loss and the judge cannot agree by construction), and the failure of
over-hot sampling on these prompts is drift off topic into unrelated words, which it sees; it does not judge
truth or style. Each figure is a mean over prompts with a 95% bootstrap interval over prompts.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from eval.experiments.common import (check_arguments, experiment_parser, parse_list, pyplot, save_figure, write_csv,
                                     write_json, write_jsonl)

PROMPTS = (
    "Write a one-sentence story about a dragon.", "Name a fruit.", "Suggest a name for a cat.",
    "Give me an idea for a weekend hobby.", "Describe the ocean in one sentence.",
    "Name a color and say why you like it.",
    "Write a short poem about rain.", "Suggest a title for a mystery novel.", "Tell me a fun fact about space.",
    "Name a famous scientist.", "Invent a new ice cream flavor.", "Give me a tip for staying focused.",
    "Describe a city at night in one sentence.", "Suggest a name for a coffee shop.", "Write a riddle.",
    "Name an animal that lives in the forest.", "Write a one-sentence story about a robot.",
    "Give me an idea for a birthday gift.", "Describe your perfect breakfast.", "Suggest a name for a band.",
    "Write a motivational quote.", "Name a sport and describe it briefly.", "Invent a word and define it.",
    "Describe a sunset in one sentence.",
)
# name -> (family, sampling keywords of models.generate). T = 1 itself is the pool's first N samples. The grid is the
# paper's (Appendix B.3: temperature in [1, 1.5]; min-p 0.1 with T in [1.3, 4]; top-p 0.9 with T in [1.1, 1.7];
# top-k 180 with T in [1.1, 2.5]), and T < 1 for the other end of the front.
TOKEN_METHODS = {f"T={t:g}": ("temperature", {"temperature": t}) for t in (0.5, 0.7, 0.85, 1.2, 1.5)}
TOKEN_METHODS |= {f"min-p=0.1,T={t:g}": ("min-p", {"min_p": 0.1, "temperature": t}) for t in (1.5, 2.0, 3.0)}
TOKEN_METHODS |= {f"top-p=0.9,T={t:g}": ("top-p", {"top_p": 0.9, "temperature": t}) for t in (1.3, 1.7)}
TOKEN_METHODS |= {f"top-k=180,T={t:g}": ("top-k", {"top_k": 180, "temperature": t}) for t in (1.5, 2.5)}
# The default sweep: what a 2-core machine shared with six other jobs sampled in about 40 minutes (--methods all).
DEFAULT_METHODS = ("T=1.2", "T=1.5", "min-p=0.1,T=1.5", "min-p=0.1,T=2", "top-p=0.9,T=1.3", "top-k=180,T=1.5")
# sequence-level temperatures for (a); the paper's SPL sweeps alpha/beta in [1, 11]
TAUS = (0.5, 0.7, 0.85, 0.95, 1.0, 1.05, 1.25, 1.5, 2.0, 3.0)

# ---- the sequence-level temperature by importance resampling (a) ------------------------------------------------


def tempered_weights(logprobs, tau: float) -> torch.Tensor:
    """Self-normalised weights of pi_ref^(1/tau) against samples of pi_ref: w_i ∝ exp((1/tau - 1) log pi_ref(y_i)).
    `logprobs` [..., M] -> [..., M] (float64), summing to 1 over the last axis."""
    return torch.softmax((1.0 / tau - 1.0) * torch.as_tensor(logprobs, dtype=torch.float64), dim=-1)


def effective_sample_size(weights) -> torch.Tensor:
    """Kish's ESS, (sum w)^2 / sum w^2 over the last axis: M for equal weights, 1 when one sample has them all."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    return w.sum(-1) ** 2 / (w ** 2).sum(-1)


def weighted_pairwise_distance(embeddings, weights) -> float:
    """E[1 - cos(phi(y), phi(y'))] for y, y' drawn independently from the weighted sample:
    sum_{i != j} w_i w_j d_ij / sum_{i != j} w_i w_j (equal weights: the mean over distinct pairs)."""
    unit = torch.nn.functional.normalize(torch.as_tensor(embeddings, dtype=torch.float64), dim=-1)  # (M, D)
    w = torch.as_tensor(weights, dtype=torch.float64)  # (M,)
    distance = 1.0 - unit @ unit.T  # (M, M), zero diagonal up to rounding
    pair_weights = w[:, None] * w[None, :] * (1.0 - torch.eye(len(w), dtype=torch.float64))
    return float((pair_weights * distance).sum() / pair_weights.sum())


def resampled_vendi(embeddings, weights, draws: int, repeats: int, generator) -> float:
    """Mean Vendi score of `draws` responses drawn with replacement by `weights` (SIR), over `repeats` drawings."""
    from eval.metrics import vendi_score
    w = torch.as_tensor(weights, dtype=torch.float64)
    embeddings = torch.as_tensor(embeddings)
    scores = [vendi_score(embeddings[torch.multinomial(w, draws, replacement=True, generator=generator)])
              for _ in range(repeats)]
    return float(np.mean(scores))


# ---- per-prompt metrics -----------------------------------------------------------------------------------------


def prompt_metrics(embeddings, prompt_embedding, ref_logprobs, lengths, eos, weights=None, vendi=None) -> dict:
    """One prompt's figures for M responses: `embeddings` [M, D] unit rows, `prompt_embedding` [D],
    `ref_logprobs`, `lengths`, `eos` [M]; `weights` [M] (default equal), `vendi` (default: of all M)."""
    from eval.metrics import vendi_score
    m = len(lengths)
    w = torch.full((m,), 1.0 / m, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
    lengths = torch.as_tensor(lengths, dtype=torch.float64)
    per_token = -torch.as_tensor(ref_logprobs, dtype=torch.float64) / lengths.clamp(min=1)  # (M,)
    relevance = torch.as_tensor(embeddings, dtype=torch.float64) @ torch.as_tensor(prompt_embedding).double()
    return {"pairwise_distance": weighted_pairwise_distance(embeddings, w),
            "vendi": vendi_score(embeddings) if vendi is None else vendi,
            "per_token_loss": float((w * per_token).sum()), "relevance": float((w * relevance).sum()),
            "eos_rate": float((w * torch.as_tensor(eos, dtype=torch.float64)).sum()),
            "tokens": float((w * lengths).sum()), "ess": float(effective_sample_size(w))}


def summarise(name: str, family: str, rows: list[dict]) -> dict:
    """Mean over prompts of each figure, with a 95% bootstrap interval over prompts for the four that are plotted."""
    from eval.metrics import bootstrap_interval
    out = {"method": name, "family": family, "prompts": len(rows)}
    for key in rows[0]:
        values = np.array([r[key] for r in rows])
        out[key] = float(values.mean())
        if key in ("pairwise_distance", "vendi", "per_token_loss", "relevance"):
            low, high = bootstrap_interval(values)
            out[f"{key}_low"], out[f"{key}_high"] = float(low), float(high)
    out["ess_min"] = float(min(r["ess"] for r in rows))
    return out


# ---- sampling ---------------------------------------------------------------------------------------------------


def sample_method(model, tokenizer, prompts, num_samples: int, max_new_tokens: int, seed: int, **sampling):
    """num_samples completions of each prompt, as plain records (text, token ids, log pi(y) at T = 1, eos)."""
    from models.generate import sample_completions
    generator = torch.Generator().manual_seed(seed)
    completions = sample_completions(model, tokenizer, prompts, num_samples, max_new_tokens, generator=generator,
                                     **sampling)
    return [{"prompt_index": c.prompt_index, "text": c.text, "token_ids": c.token_ids, "prompt_ids": c.prompt_ids,
             "logprob": c.logprob, "eos": c.eos} for c in completions]


def by_prompt(records, count: int) -> list[list[dict]]:
    groups = [[] for _ in range(count)]
    for record in records:
        groups[record["prompt_index"]].append(record)
    return groups


def cached(path: Path, settings: dict, make):
    """The records of `path` if it was written with exactly `settings`, else make() written there (resumable runs)."""
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["settings"] == settings:
            return saved["records"]
    records = make()
    path.write_text(json.dumps({"settings": settings, "records": records}) + "\n", encoding="utf-8")
    return records


# ---- training (b) ----------------------------------------------------------------------------------------------


def uniform_pairs(prompts, pool_groups, pairs_per_prompt: int) -> list[dict]:
    """Pairs (y_2k, y_2k+1) of each prompt's pool responses, labelled chosen_prob = 0.5: uniform preferences, under
    which SPL's optimum is pi_ref^(beta/alpha) (Prop. A.1 with p flat). Only responses that ended (EOS) are used,
    as train.py appends EOS to every response."""
    records = []
    for prompt, group in zip(prompts, pool_groups):
        ended = [r["text"] for r in group if r["eos"] and r["text"].strip()]
        for k in range(min(pairs_per_prompt, len(ended) // 2)):
            records.append({"prompt": prompt, "chosen": ended[2 * k], "rejected": ended[2 * k + 1],
                            "chosen_prob": 0.5})
    return records


def centred_slope(policy_logprobs, ref_logprobs, prompt_index) -> float:
    """Least-squares slope of log pi_theta(y) on log pi_ref(y), each centred within its prompt (the per-prompt
    log Z is free): 1/tau at SPL's optimum under uniform preferences, 1 for the reference itself."""
    x, y, idx = (torch.as_tensor(v, dtype=torch.float64) for v in (ref_logprobs, policy_logprobs, prompt_index))
    for i in idx.unique():
        x[idx == i] -= x[idx == i].mean()
        y[idx == i] -= y[idx == i].mean()
    return float((x * y).sum() / (x * x).sum())


def train_uniform(args, out: Path, prompts, pool_groups, tau: float, model_name: str):
    """Train SPL (alpha = tau * beta) on uniform pairs with train.py; returns the run directory."""
    from eval.experiments.policies import main_job_options, train_policy
    count = args.train_on or len(prompts)  # the first `count` prompts give the pairs; the rest are never trained on
    records = uniform_pairs(prompts[:count], pool_groups[:count], args.pairs_per_prompt)
    if not records:
        raise ValueError(f"no pairs to train on: no prompt among the first {count} has two pool responses that "
                         f"ended within --tokens {args.tokens} (raise --tokens or --pool)")
    data = write_jsonl(out / "uniform_pairs.jsonl", records)
    # The main job's recipe (option-mass anchor, whole prompts per batch, LoRA on the projections and the head), with
    # --train-prompts prompts (each with its --pairs-per-prompt pairs) per step in place of its 15.
    extra = (*main_job_options(model=True), "--model", model_name, "--lr", args.lr, "--warmup-steps", 1,
             "--prompts-per-batch", args.train_prompts, "--threads", args.threads or 1)
    return train_policy(out / f"spl_tau{tau:g}", data, round(tau * args.beta, 10), args.beta, "spl", args.train_steps,
                        extra=tuple(extra), progress=args.progress)


def trained_records(args, out, model_dir, tokenizer, prompts, pool_groups, tau, model_name, seed):
    """(b): train, sample the policy at T = 1, score its samples under the reference (adapters off), and measure
    the slope of log pi_theta on log pi_ref over held-out pool responses (all, on trained prompts, on prompts
    never trained on). -> (records, slopes, seconds)."""
    from eval.metrics import sequence_nll
    from models import disable_lora, load_adapter, load_pretrained
    start = time.perf_counter()
    run_dir = train_uniform(args, out, prompts, pool_groups, tau, model_name)
    seconds = time.perf_counter() - start
    policy = load_adapter(load_pretrained(model_dir), run_dir / "adapter").eval()
    records = sample_method(policy, tokenizer, prompts, args.samples, args.tokens, seed)
    with disable_lora(policy):
        ref_nll = sequence_nll(policy, [r["prompt_ids"] for r in records], [r["token_ids"] for r in records])
    for record, nll in zip(records, ref_nll.tolist()):
        record["policy_logprob"], record["logprob"] = record["logprob"], -nll  # quality is judged by the reference
    pairs = [json.loads(line) for line in (out / "uniform_pairs.jsonl").read_text(encoding="utf-8").splitlines()]
    trained_texts = {(pair["prompt"], text) for pair in pairs for text in (pair["chosen"], pair["rejected"])}
    held_out = [[r for r in group if r["token_ids"] and (prompts[i], r["text"]) not in trained_texts][:args.held_out]
                for i, group in enumerate(pool_groups)]  # pool responses never paired, per prompt
    held_out = [r for group in held_out for r in group]
    policy_nll = sequence_nll(policy, [r["prompt_ids"] for r in held_out], [r["token_ids"] for r in held_out])
    slopes = {}
    for name, keep in (("all", lambda i: True), ("trained_prompts", lambda i: i < (args.train_on or len(prompts))),
                       ("new_prompts", lambda i: i >= (args.train_on or len(prompts)))):
        rows = [k for k, r in enumerate(held_out) if keep(r["prompt_index"])]
        slopes[name] = (centred_slope(-policy_nll[rows], [held_out[k]["logprob"] for k in rows],
                                      [held_out[k]["prompt_index"] for k in rows]) if rows else float("nan"))
    return records, slopes, seconds


def load_models(args):
    """(model, tokenizer, model_dir, model name for train.py): SmolLM2 (or --model), or the world's tiny model
    with --quick."""
    from models import load_pretrained, load_tokenizer
    if args.quick and args.model == "smollm2":
        from data.world import MODEL_DIR
        model_dir, name = MODEL_DIR, str(MODEL_DIR)
    else:
        from models.gguf import resolve_model
        model_dir, name = resolve_model(args.model), args.model
    tokenizer, _ = load_tokenizer(model_dir)
    return load_pretrained(model_dir).eval(), tokenizer, model_dir, name


def parse_args(argv=None):
    p = experiment_parser(__doc__, "runs/real_diversity", "the world's tiny model, 2 prompts, a few tokens (the test)",
                          "unused (--taus sets the sequence-level temperatures)", beta=0.1, steps=12, lr=1e-3,
                          steps_help="unused (--train-steps)")
    p.add_argument("--model", default="smollm2", help="the reference model (default smollm2)")
    p.add_argument("--prompts", type=int, help=f"how many of the {len(PROMPTS)} prompts (default 12; --quick 2)")
    p.add_argument("--samples", type=int, help="N: samples per prompt and method (default 8; --quick 3)")
    p.add_argument("--pool", type=int, help="M: T = 1 samples per prompt for resampling (default 32; --quick 6)")
    p.add_argument("--tokens", type=int, help="new tokens per response (default 32; --quick 6)")
    p.add_argument("--taus", help=f"sequence-level temperatures (default {','.join(map(str, TAUS))})")
    p.add_argument("--methods", help=f"comma-separated token-level methods of {', '.join(TOKEN_METHODS)}, or all "
                   f"(default {','.join(DEFAULT_METHODS)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-tau", help="comma-separated tau = alpha/beta to train on uniform pairs (default none)")
    p.add_argument("--train-steps", type=int, default=12)
    p.add_argument("--train-prompts", type=int, default=2, help="prompts per step (all their pairs)")
    p.add_argument("--pairs-per-prompt", type=int, default=8)
    p.add_argument("--train-on", type=int, help="train on the first N prompts' pairs only (default: all)")
    p.add_argument("--held-out", type=int, default=8, help="held-out pool responses per prompt for the slope")
    args = p.parse_args(argv)
    quick = args.quick
    args.prompts = args.prompts or (2 if quick else 12)
    args.samples, args.pool = args.samples or (3 if quick else 8), args.pool or (6 if quick else 32)
    args.tokens = args.tokens or (6 if quick else 32)
    args.taus = parse_list(p, "--taus", args.taus, TAUS)
    args.train_tau = parse_list(p, "--train-tau", args.train_tau, ())
    args.methods = (tuple(TOKEN_METHODS) if args.methods == "all" else
                    DEFAULT_METHODS if args.methods is None else tuple(args.methods.split(",")))
    unknown = [m for m in args.methods if m not in TOKEN_METHODS]
    check_arguments(p, [(not unknown, f"--methods: unknown {', '.join(unknown)} (known: {', '.join(TOKEN_METHODS)})"),
                        (1 <= args.prompts <= len(PROMPTS), f"--prompts: 1 to {len(PROMPTS)}, got {args.prompts}"),
                        (args.samples >= 2, f"--samples: at least 2 (pairs), got {args.samples}"),
                        (args.pool >= args.samples, f"--pool ({args.pool}) must be at least --samples "
                                                    f"({args.samples})"),
                        (args.tokens >= 1, f"--tokens: at least 1, got {args.tokens}"),
                        (all(t > 0 for t in args.taus + args.train_tau), "--taus, --train-tau: positive numbers"),
                        (args.train_steps >= 1 and args.train_prompts >= 1,
                         "--train-steps, --train-prompts: at least 1"),
                        (args.train_on is None or 1 <= args.train_on <= args.prompts, "--train-on: 1 to --prompts")])
    return args


def format_table(rows: list[dict]) -> str:
    lines = [f"{'method':16s} {'cos dist':>17s} {'vendi':>15s} {'loss/token':>17s} {'relevance':>17s} {'eos':>5s} "
             f"{'ESS':>6s}"]
    for r in rows:
        def cell(key, fmt):
            return f"{r[key]:{fmt}} [{r[key + '_low']:{fmt}},{r[key + '_high']:{fmt}}]"
        lines.append(f"{r['method']:16s} {cell('pairwise_distance', '.3f')} {cell('vendi', '.2f')} "
                     f"{cell('per_token_loss', '.3f')} {cell('relevance', '.3f')} {r['eos_rate']:5.2f} {r['ess']:6.1f}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path):
    """Two Pareto panels: pairwise cosine distance against per-token loss, Vendi against relevance."""
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed (pip install matplotlib): no plot", file=sys.stderr)
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for family in dict.fromkeys(r["family"] for r in rows):
        members = sorted((r for r in rows if r["family"] == family), key=lambda r: float(r["method"].split("=")[-1]))
        style = "-o" if family != "SPL trained" else "*"
        for ax, (x, y) in zip(axes, (("per_token_loss", "pairwise_distance"), ("relevance", "vendi"))):
            ax.plot([r[x] for r in members], [r[y] for r in members], style, label=family, markersize=6)
            for r in members:
                ax.annotate(r["method"].split("=")[-1], (r[x], r[y]), fontsize=6)  # T or tau
    axes[0].set(xlabel="per-token loss under the reference (lower: better)", ylabel="mean pairwise cosine distance")
    axes[1].set(xlabel="relevance cos(prompt, response) (higher: better)", ylabel="Vendi score")
    axes[0].legend(fontsize=7)
    return save_figure(plt, figure, path)


def main(argv=None) -> int:
    from eval.embeddings import load_minilm
    args = parse_args(argv)
    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads or 1)
    start = time.perf_counter()
    model, tokenizer, model_dir, model_name = load_models(args)
    encoder = load_minilm()
    prompts = list(PROMPTS[:args.prompts])
    prompt_embeddings = encoder.encode(prompts)  # (P, D)
    common = {"model": model_name, "prompts": prompts, "tokens": args.tokens, "seed": args.seed}

    embedded = {}  # text -> embedding: the pool is scored once per tau, its texts encoded once

    def embed(texts):
        missing = list(dict.fromkeys(t for t in texts if t not in embedded))
        if missing:
            embedded.update(zip(missing, encoder.encode(missing)))
        return torch.stack([embedded[t] for t in texts])  # (M, D)

    def metrics_of(records, weights=None, vendi=None):
        groups = by_prompt(records, len(prompts))
        rows = []
        for i, group in enumerate(groups):
            embeddings = embed([r["text"] for r in group])
            rows.append(prompt_metrics(embeddings, prompt_embeddings[i], [r["logprob"] for r in group],
                                       [len(r["token_ids"]) for r in group], [r["eos"] for r in group],
                                       None if weights is None else weights[i],
                                       None if vendi is None else vendi(i, embeddings)))
        return rows

    pool = cached(out / "samples" / "pool.json", {**common, "samples": args.pool},
                  lambda: sample_method(model, tokenizer, prompts, args.pool, args.tokens, args.seed))
    pool_groups = by_prompt(pool, len(prompts))
    print(f"pool: {args.pool} samples x {len(prompts)} prompts at T = 1 ({time.perf_counter() - start:.0f} s)",
          flush=True)
    summaries, per_prompt = [], []

    def add(name, family, rows):
        summaries.append(summarise(name, family, rows))
        per_prompt.extend({"method": name, "prompt": prompts[i], **row} for i, row in enumerate(rows))

    add("T=1", "temperature", metrics_of([r for g in pool_groups for r in g[:args.samples]]))
    for name in args.methods:
        index, (family, sampling) = list(TOKEN_METHODS).index(name), TOKEN_METHODS[name]
        records = cached(out / "samples" / f"{name}.json", {**common, "samples": args.samples, **sampling},
                         lambda: sample_method(model, tokenizer, prompts, args.samples, args.tokens,
                                               args.seed + 1 + index, **sampling))
        add(name, family, metrics_of(records))
        print(f"{name}: sampled ({time.perf_counter() - start:.0f} s)", flush=True)
    generator = torch.Generator().manual_seed(args.seed)
    for tau in args.taus:
        weights = [tempered_weights([r["logprob"] for r in g], tau) for g in pool_groups]
        add(f"SPL-IS tau={tau:g}", "SPL resampled", metrics_of(
            pool, weights, lambda i, e: resampled_vendi(e, weights[i], args.samples, 10, generator)))
    trained = []
    for tau in args.train_tau:
        records, slopes, seconds = trained_records(args, out, model_dir, tokenizer, prompts, pool_groups, tau,
                                                   model_name, args.seed + 100)
        add(f"SPL-LoRA tau={tau:g}", "SPL trained", metrics_of(records))
        summaries[-1].update(slope_vs_ref=slopes["all"], slope_trained_prompts=slopes["trained_prompts"],
                             slope_new_prompts=slopes["new_prompts"], slope_target=1 / tau,
                             train_seconds=round(seconds, 1), train_steps=args.train_steps)
        trained.append({"tau": tau, "slopes": slopes, "target": 1 / tau, "train_seconds": seconds})
    keys = list(dict.fromkeys(key for row in summaries for key in row))  # trained rows add their slope
    write_csv(out / "summary.csv", [{key: row.get(key, "") for key in keys} for row in summaries])
    write_csv(out / "per_prompt.csv", per_prompt)
    write_json(out / "run.json", {**common, "samples": args.samples, "pool": args.pool, "taus": list(args.taus),
                                  "trained": trained, "seconds": time.perf_counter() - start})
    print(format_table(summaries))
    for t in trained:
        print(f"SPL-LoRA tau={t['tau']:g}: slope of log pi_theta on log pi_ref over held-out responses "
              f"{t['slopes']['all']:.3f} (trained prompts {t['slopes']['trained_prompts']:.3f}, new prompts "
              f"{t['slopes']['new_prompts']:.3f}; closed form {t['target']:.3f}), "
              f"trained in {t['train_seconds']:.0f} s")
    figure = plot(summaries, out / "pareto.png")
    print(f"done in {time.perf_counter() - start:.0f} s; {out / 'summary.csv'}" + (f", {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
