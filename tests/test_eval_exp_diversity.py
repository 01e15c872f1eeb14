"""eval/experiments/diversity.py (with stories.py and fronts.py): experiment 2, diversity against the world's exact reward, in its
--quick mode.

Oracles: every number of the tables recomputed here from the saved samples by independent code: validity and the
attributes by the world's own `validate_story`, the exact reward from the world's population tables with math.log,
entropies with Counter, the n-gram Vendi score by the vendi-score package (`vendi.score` with a kernel written
here). The closed forms by one unbatched float64 forward per story of the policy and of the reference, the optimum
pi_ref^(beta/alpha) p^(1/alpha) normalised in numpy. The t intervals and the t table against scipy.stats.t; the
Pareto marks against the definition; eval.metrics.vendi_score against vendi-score's `score_X`. And the sampling
filters as invariants of the saved tokens under the policy that sampled them, recomputed by a full forward.
"""
import csv
import json
import math
import shutil
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from data.world import load_world, validate_story
from eval.experiments import diversity as exp
from eval.experiments import fronts, stories
from eval.embeddings import load_minilm
from eval.experiments.policies import load_policy
from eval.metrics import vendi_score

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

TOL = dict(rel=1e-9, abs=1e-12)
PANELS = [f"front:{d}/{q}" for d, q in exp.FRONT_PANELS]


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture(scope="module")
def encoder():
    """all-MiniLM-L6-v2 loaded once for the module (eval/embeddings.py, tested against HF in its own test file):
    the experiment's embedder in the quick run and here."""
    return load_minilm()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, encoder):
    out = tmp_path_factory.mktemp("exp_diversity")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exp, "sentence_embedder", lambda: encoder.encode)
        assert exp.main(["--quick", "--out", str(out)]) == 0
    columns, rows = read_csv(out / "diversity.csv")
    _, summary = read_csv(out / "summary.csv")
    _, closed = read_csv(out / "closed_form.csv")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    by_setting = defaultdict(list)
    for sample in samples:
        by_setting[sample["setting"]].append(sample)
    return {"out": out, "columns": columns, "rows": {r["setting"]: r for r in rows}, "order": [r["setting"] for r in rows],
            "summary": summary, "closed": {r["policy"]: r for r in closed}, "samples": by_setting,
            "experiment": json.loads((out / "experiment.json").read_text(encoding="utf-8"))}


def entropy(values) -> float:
    counts = Counter(v for v in values if v is not None)
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


def inputs_of(samples, n):
    groups = defaultdict(list)
    for s in samples:
        groups[s["input"]].append(s)
    assert all(len(g) == n for g in groups.values())
    return [groups[i] for i in sorted(groups)]


def test_outputs_recipe_and_structure(quick_run):
    q, n = exp.QUICK, exp.QUICK["num_samples"]
    methods = [quick_run["rows"][s]["method"] for s in quick_run["order"]]
    assert methods == ["reference", "dpo", "dpo T", "dpo min-p", "dpo top-p", "dpo top-k", "spl"]
    experiment = quick_run["experiment"]
    assert experiment["top_k"] == 11 and experiment["vocab_size"] == 2000 and experiment["seeds_done"] == [0]
    assert set(experiment["runs"]["0"]) == {"dpo-2", "spl-2"}
    assert len(experiment["commit"]) >= 40
    for name, line in experiment["recipes"].items():  # the main job's recipe, stated
        assert line.startswith("train.py --data ") and "--anchor 0.1 --prompts-per-batch 15" in line
        assert "lm_head" in line and "--seed <seed>" in line and f"--loss {name.split('-')[0]}" in line
    config = json.loads((quick_run["out"] / "runs" / "seed0" / "spl-2" / "config.json").read_text())
    assert (config["anchor"], config["prompts_per_batch"], config["alpha"], config["steps"]) == (0.1, 15, 0.2, 2)
    assert "lm_head" in config["lora_targets"]
    for label, row in quick_run["rows"].items():
        samples = quick_run["samples"][label]
        assert len(samples) == q["prompts"] * q["groups"] * n
        for group in inputs_of(samples, n):
            assert len({s["prompt"] for s in group}) == 1


def test_metrics_recomputed_from_samples(quick_run):
    """Validity, the exact reward, the attribute entropies and the n-gram Vendi from the saved texts."""
    from vendi_score import vendi
    spec, n = load_world().stories, exp.QUICK["num_samples"]

    def kernel(a, b):  # cosine of word 1- and 2-gram count vectors
        ca, cb = (Counter([(w,) for w in t.split()] + list(zip(t.split(), t.split()[1:]))) for t in (a, b))
        dot = sum(ca[g] * cb[g] for g in ca)
        return dot / math.sqrt(sum(v * v for v in ca.values()) * sum(v * v for v in cb.values()))

    for label, row in quick_run["rows"].items():
        samples = quick_run["samples"][label]
        checks = [validate_story(s["prompt"], s["text"]) for s in samples]
        assert [c.valid for c in checks] == [s["valid"] for s in samples]
        rewards = []
        for s, c in zip(samples, checks):
            profession = s["prompt"].split()[-1].rstrip(".")
            names, relations = spec.population["name"][profession], spec.population["relation"][profession]
            rewards.append(math.log(names[c.name] * relations[c.relation]) if c.valid else
                           math.log(min(names.values()) * min(relations.values()) * 0.05 / 0.95))
        assert float(row["validity"]) == pytest.approx(np.mean([c.valid for c in checks]), **TOL)
        assert float(row["reward"]) == pytest.approx(np.mean(rewards), **TOL)
        valid = [r for r, c in zip(rewards, checks) if c.valid]
        assert (math.isnan(float(row["reward_valid"])) and not valid) or \
            float(row["reward_valid"]) == pytest.approx(np.mean(valid), **TOL)
        groups = inputs_of(samples, n)
        for key in ("name", "relation"):
            expected = np.mean([entropy([getattr(validate_story(s["prompt"], s["text"]), key) for s in g])
                                for g in groups])
            assert float(row[f"{key}_entropy"]) == pytest.approx(expected, **TOL)
        if all(s["text"].split() for s in samples):
            expected = np.mean([vendi.score([s["text"] for s in g], kernel) for g in groups])
            assert float(row["vendi_ngram"]) == pytest.approx(expected, rel=1e-6)


def test_embedding_columns_by_unbatched_encoding(quick_run, encoder):
    """Each text embedded alone (no padding, no batch); per input Vendi by vendi-score's score_X and Eq. 44,
    mean over all ordered pairs of 1 - cos, in numpy."""
    from vendi_score import vendi
    n = exp.QUICK["num_samples"]
    assert quick_run["experiment"]["embeddings"] == "all-MiniLM-L6-v2"
    for label in ("dpo-2 T=2", "spl-2 T=1"):
        vendis, distances = [], []
        for group in inputs_of(quick_run["samples"][label], n):
            x = np.stack([encoder.encode([s["text"]])[0].double().numpy() for s in group])  # (N, 384)
            unit = x / np.linalg.norm(x, axis=1, keepdims=True)
            vendis.append(float(vendi.score_X(x)))
            distances.append(np.mean(1.0 - unit @ unit.T))
        row = quick_run["rows"][label]
        assert float(row["vendi_embed"]) == pytest.approx(np.mean(vendis), rel=1e-4)
        assert float(row["embed_distance"]) == pytest.approx(np.mean(distances), rel=1e-4, abs=1e-6)


def test_rescore_embeddings_reproduces_the_columns(quick_run, encoder, tmp_path, capsys):
    """A copy of the run with its embedding columns blanked, rescored from samples.jsonl: the same values as the
    run computed while sampling (the same texts in the same batches), in diversity.csv and summary.csv."""
    copy = tmp_path / "run"
    shutil.copytree(quick_run["out"], copy, ignore=shutil.ignore_patterns("runs"))
    columns, rows = read_csv(copy / "diversity.csv")
    with open(copy / "diversity.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows([r | {"vendi_embed": "nan", "embed_distance": "nan"} for r in rows])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(exp, "sentence_embedder", lambda: encoder.encode)
        assert exp.main(["--rescore-embeddings", "--out", str(copy)]) == 0
    for name in ("diversity.csv", "summary.csv"):
        _, before = read_csv(quick_run["out"] / name)
        _, after = read_csv(copy / name)
        for old, new in zip(before, after, strict=True):
            for key in ("vendi_embed", "embed_distance", "reward", "name_entropy"):
                assert float(new[key]) == pytest.approx(float(old[key]), rel=1e-12), (name, key)
    assert exp.main(["--rescore-embeddings", "--out", str(tmp_path / "none")]) == 1
    assert "not a finished run" in capsys.readouterr().err


def test_closed_forms_by_full_forward(quick_run):
    """The groups are stories of the world that differ in one attribute only (validate_story reads each value, the
    texts agree elsewhere); each story scored by one unbatched float64 forward of policy and reference, the
    optimum pi_ref^(beta/alpha) p^(1/alpha) normalised in numpy, TV, entropies and the kept mass averaged."""
    spec = load_world().stories
    prompts = list(spec.prompts.values())[:exp.QUICK["prompts"]]
    groups = stories.closed_form_groups(spec, exp.QUICK["bases"], prompts=prompts)
    assert [(g.prompt, g.attribute) for g in groups] == [(p, a) for p in prompts for a in ("name", "relation")]
    for g in groups:
        profession = g.prompt.split()[-1].rstrip(".")
        checks = [validate_story(g.prompt, t) for t in g.texts]
        assert all(c.valid for c in checks)
        assert [getattr(c, g.attribute) for c in checks] == list(spec.population[g.attribute][profession])
        assert list(g.population) == list(spec.population[g.attribute][profession].values())
    reference, tokenizer = load_policy(None)

    def logps(model, group):
        prompt = tokenizer.encode_prompt([{"role": "user", "content": group.prompt}])
        out = []
        with torch.no_grad():
            for text in group.texts:
                response = tokenizer.encode_response(text)
                logits = model(torch.tensor([prompt + response]))[0].double().log_softmax(-1)  # (T, V)
                out.append(sum(float(logits[len(prompt) - 1 + i, t]) for i, t in enumerate(response)))
        return np.array(out)

    for name, alpha in (("dpo-2", 0.1), ("spl-2", 0.2)):
        policy, _ = load_policy(quick_run["experiment"]["runs"]["0"][name])
        expected = defaultdict(list)
        for g in groups:
            ref, pol = logps(reference, g), logps(policy, g)
            target = np.exp(0.1 / alpha * (ref - ref.max()) + np.log(g.population) / alpha)
            target /= target.sum()
            learned = np.exp(pol - pol.max()) / np.exp(pol - pol.max()).sum()
            expected[f"tv_{g.attribute}"].append(0.5 * np.abs(learned - target).sum())
            expected[f"entropy_{g.attribute}"].append(-(learned * np.log(learned)).sum())
            expected[f"closed_form_entropy_{g.attribute}"].append(-(target * np.log(target)).sum())
            expected[f"mass_{g.attribute}"].append(np.exp(pol).sum() / np.exp(ref).sum())
        row = quick_run["closed"][name]
        for key, values in expected.items():
            assert float(row[key]) == pytest.approx(np.mean(values), rel=1e-5, abs=1e-7), (name, key)


def test_summary_intervals_and_pareto_marks(quick_run):
    """One seed: the summary's means are the rows' values and the interval ends are NaN. Fronts among the DPO and
    SPL settings by the definition; the reference row has empty marks."""
    for row in quick_run["summary"]:
        seed_row = quick_run["rows"][row["setting"]]
        for key in exp.METRICS:
            assert row[key] == seed_row[key] and row[f"{key}_lo"] == row[f"{key}_hi"] == "nan"
    trained = [r for r in quick_run["summary"] if r["method"] != "reference"]
    assert all(r[p] == "" for r in quick_run["summary"] if r["method"] == "reference" for p in PANELS)
    for (diversity, quality), panel in zip(exp.FRONT_PANELS, PANELS):
        points = [(float(r[diversity]), float(r[quality])) for r in trained]
        for r, (d, q) in zip(trained, points):
            on = not (math.isnan(d) or math.isnan(q)) and not any(
                d2 >= d and q2 >= q and (d2, q2) != (d, q) for d2, q2 in points)
            assert int(r[panel]) == int(on), (r["setting"], panel)


def test_sampling_filters_hold_under_the_sampling_policy(quick_run):
    """Each saved token against the DPO policy's full-forward logits at its position (1e-4 slack for the cached
    decoding's rounding). The unfiltered T = 2 samples do leave the top 11: the check can fail."""
    policy, _ = load_policy(quick_run["experiment"]["runs"]["0"]["dpo-2"])
    worst = {}
    for label, row in quick_run["rows"].items():
        if row["policy"] != "dpo-2":
            continue
        temperature = float(row["temperature"])
        ranks, min_p_ratio, top_p_mass = [], [], []
        with torch.no_grad():
            for s in quick_run["samples"][label]:
                logits = policy(torch.tensor([s["prompt_ids"] + s["token_ids"]]))[0].double()  # (T, V)
                start = len(s["prompt_ids"]) - 1
                for i, token in enumerate(s["token_ids"]):
                    step = logits[start + i]  # (V,)
                    probs = (step / temperature).softmax(-1)
                    ranks.append(int((step > step[token] + 1e-4).sum()))
                    min_p_ratio.append(float(probs[token] / probs.max()))
                    top_p_mass.append(float(probs[probs > probs[token] + 1e-6].sum()))
        worst[label] = (max(ranks), min(min_p_ratio), max(top_p_mass))
        if row["top_k"]:
            assert max(ranks) < int(row["top_k"]) == 11
        if row["min_p"]:
            assert min(min_p_ratio) >= float(row["min_p"]) - 1e-4
        if row["top_p"]:
            assert max(top_p_mass) < float(row["top_p"]) + 1e-4
    assert worst["dpo-2 T=2"][0] >= 11  # without a filter some token ranks below the 11th


def test_story_rewards_by_hand():
    """A well-formed doctor story naming Maya with her sister: log p_name(Maya) + log p_rel(sister) from the world's
    table; a non-story: the doctor's least-preferred name and relation, less log(0.95 / 0.05)."""
    spec = load_world().stories
    prompt = "Write a short story about a doctor."
    maya = ("Maya Chen was a doctor in a quiet village. She took care of her sister every day. "
            "She was very proud of her.")
    names, relations = spec.population["name"]["doctor"], spec.population["relation"]["doctor"]
    checks = [validate_story(prompt, maya), validate_story(prompt, "no story")]
    rewards = stories.story_rewards(spec, [prompt] * 2, checks)
    assert rewards[0] == pytest.approx(math.log(names["Maya"]) + math.log(relations["sister"]), **TOL)
    assert rewards[1] == pytest.approx(math.log(min(names.values())) + math.log(min(relations.values()))
                                       - math.log(19), **TOL)
    metrics, _ = stories.story_metrics(spec, [prompt] * 4, [maya, maya, "no story", ""], num_samples=2)
    assert metrics["validity"] == 0.5 and metrics["reward_valid"] == pytest.approx(rewards[0], **TOL)
    # input 1: the same story twice, one n-gram vector: Vendi 1; input 2: "no story" and the empty "<empty>"
    # share nothing: Vendi 2; the mean 1.5. Entropies: one name (0) and nothing readable (0).
    assert metrics["vendi_ngram"] == pytest.approx(1.5, rel=1e-9)
    assert metrics["name_entropy"] == 0.0 and metrics["relation_entropy"] == 0.0


def test_vendi_score_against_the_vendi_score_package():
    """eval.metrics.vendi_score (cosine kernel) against vendi-score's score_X (rows normalised, K = X X^T)."""
    from vendi_score import vendi
    x = np.random.default_rng(0).normal(size=(7, 5))
    x[3] = 2.5 * x[1]  # a repeated direction
    assert vendi_score(torch.tensor(x)) == pytest.approx(float(vendi.score_X(x)), rel=1e-9)


def test_t_interval_against_scipy():
    """mean -+ t_{0.975, n-1} s / sqrt(n) as scipy.stats.t.interval gives it; the table against t.ppf."""
    import scipy.stats
    np.testing.assert_allclose(fronts.T_975, scipy.stats.t.ppf(0.975, np.arange(1, 11)), rtol=1e-9)
    for values in ([1.0, 2.0], [0.3, -0.1, 0.7], list(np.random.default_rng(1).normal(size=11))):
        centre, low, high = fronts.t_interval(values)
        expected = scipy.stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy.stats.sem(values))
        assert centre == pytest.approx(np.mean(values), **TOL)
        assert (low, high) == pytest.approx(expected, rel=1e-8, abs=1e-12)
    assert fronts.t_interval([4.0])[0] == 4.0 and all(math.isnan(v) for v in fronts.t_interval([4.0])[1:])
    with pytest.raises(ValueError, match="t_interval"):
        fronts.t_interval(list(range(12)))
    rows = [{"seed": s, "setting": "a", "method": "m", "x": v} for s, v in enumerate([0.3, -0.1, 0.7])]
    (summary,) = fronts.summarise(rows, ("x",), "setting")
    assert (summary["x"], summary["x_lo"], summary["x_hi"]) == fronts.t_interval([0.3, -0.1, 0.7])
    assert summary["seeds"] == 3 and summary["method"] == "m" and "seed" not in summary


def test_scaled_top_k_pareto_front_and_dominance():
    """180 of 32000 is 0.5625%; of 2000 that is 11.25 -> 11."""
    assert exp.scaled_top_k(2000) == 11 and exp.scaled_top_k(32000) == 180 and exp.scaled_top_k(10) == 1
    with pytest.raises(ValueError, match="vocab_size"):
        exp.scaled_top_k(0)
    # (1, 1) twice: equal points share the front; (0.5, 0.5) is dominated; NaN is never on it
    assert fronts.pareto_front([1, 2, 0, 0.5, 1, math.nan], [1, 0, 2, 0.5, 1, 3]) == [True, True, True, False, True,
                                                                                   False]
    with pytest.raises(ValueError, match="pareto_front"):
        fronts.pareto_front([1, 2], [1])
    assert fronts.dominated([(1, 1), (2, 2), (0, 3)], [(2, 1), (2, 2), (0, 3)]) == [True, False, False]


def test_bad_arguments_fail_at_start(tmp_path, capsys):
    for argv, message in ((["--ratios", "1"], "alpha/beta > 1"), (["--prompts", "7"], "--prompts"),
                          (["--seeds", "0,0"], "--seeds"), (["--dpo-steps", "0"], "--dpo-steps")):
        with pytest.raises(SystemExit):
            exp.main([*argv, "--out", str(tmp_path)])
        assert message in capsys.readouterr().err
