"""eval/experiments/diversity.py: experiment 2 (diversity against quality on the world's stories) in its --quick mode.

Oracles: every number of the table recomputed here from the saved samples by independent code: validity and the
extracted names / relations by the world's own `validate_story`, entropies with Counter and math.log, distinct-2
with a set of bigrams, the reference cross-entropy by one full forward of the reference model per sample with a
float64 log-softmax, the embedding cosine distance from unbatched hidden states with numpy. The Pareto marks
checked against the definition (no other point at least as good on both axes and better on one). And the
sampling filters as invariants of the saved tokens under the policy that sampled them, recomputed by a full
forward: under top-k every token ranks among the k most likely; under min-p its tempered probability is at
least p_base times the top one; under top-p the tokens strictly more likely than it hold less than p.
"""
import csv
import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
import torch

from data.world import validate_story
from eval.experiments import diversity as exp
from eval.experiments.policies import load_policy

PANELS = [f"front:{d}/{q}" for d in exp.DIVERSITY for q, _ in exp.QUALITY]
COLUMNS = (["setting", "method", "policy", "ratio", "temperature", "top_k", "top_p", "min_p", "validity",
            "name_entropy", "relation_entropy", "distinct_2", "cosine_distance", "reference_ce"] + PANELS + ["fronts"])
TOL = dict(rel=1e-9, abs=1e-12)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp_diversity")
    assert exp.main(["--quick", "--out", str(out)]) == 0
    with open(out / "diversity.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames, list(reader)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    by_setting = defaultdict(list)
    for sample in samples:
        by_setting[sample["setting"]].append(sample)
    experiment = json.loads((out / "experiment.json").read_text(encoding="utf-8"))
    return {"out": out, "columns": columns, "rows": {r["setting"]: r for r in rows},
            "order": [r["setting"] for r in rows], "samples": by_setting, "experiment": experiment}


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


def test_outputs_and_table_structure(quick_run):
    q, n = exp.QUICK, exp.QUICK["num_samples"]
    assert quick_run["columns"] == COLUMNS
    methods = [quick_run["rows"][s]["method"] for s in quick_run["order"]]
    assert methods == ["reference", "dpo", "dpo", "dpo+min-p", "dpo+top-p", "dpo+top-k", "spl"]
    assert quick_run["experiment"]["top_k"] == 11 and quick_run["experiment"]["vocab_size"] == 2000
    assert set(quick_run["experiment"]["runs"]) == {"dpo", "spl-2"}
    for label, row in quick_run["rows"].items():
        samples = quick_run["samples"][label]
        assert len(samples) == q["prompts"] * q["groups"] * n  # N samples per input, one input per prompt here
        for group in inputs_of(samples, n):
            assert len({s["prompt"] for s in group}) == 1
        assert 0 <= float(row["validity"]) <= 1
        if row["method"] == "reference":
            assert row["fronts"] == ""
        else:
            assert 0 <= int(row["fronts"]) <= len(PANELS)


def test_metrics_recomputed_from_samples(quick_run):
    """Validity, attribute entropies and distinct-2 from the saved texts, by independent code."""
    n = exp.QUICK["num_samples"]
    for label, row in quick_run["rows"].items():
        samples = quick_run["samples"][label]
        checks = [validate_story(s["prompt"], s["text"]) for s in samples]
        assert [c.valid for c in checks] == [s["valid"] for s in samples]
        assert float(row["validity"]) == pytest.approx(sum(c.valid for c in checks) / len(checks), **TOL)
        groups = inputs_of(samples, n)
        for key, column in (("name", "name_entropy"), ("relation", "relation_entropy")):
            expected = np.mean([entropy([getattr(validate_story(s["prompt"], s["text"]), key) for s in g])
                                for g in groups])
            assert float(row[column]) == pytest.approx(expected, **TOL)
        distinct = []
        for g in groups:
            bigrams = [tuple(w[i:i + 2]) for w in (s["text"].split() for s in g) for i in range(len(w) - 1)]
            distinct.append(len(set(bigrams)) / len(bigrams) if bigrams else 0.0)
        assert float(row["distinct_2"]) == pytest.approx(np.mean(distinct), **TOL)


def test_reference_cross_entropy_and_cosine_distance_by_full_forward(quick_run):
    """-sum log pi_ref(y|x) / sum |y| by one unbatched forward per sample; Eq. 44 with numpy on unbatched
    mean-pooled hidden states of BOS + the response (EOS dropped), all ordered pairs i, j included."""
    reference, tokenizer = load_policy(None)
    n = exp.QUICK["num_samples"]
    for label in ("dpo T=1.5", "spl a/b=2"):
        samples = quick_run["samples"][label]
        nll, tokens = 0.0, 0
        with torch.no_grad():
            for s in samples:
                ids = torch.tensor([s["prompt_ids"] + s["token_ids"]])
                logprobs = reference(ids)[0].double().log_softmax(-1)  # (T, V)
                start = len(s["prompt_ids"]) - 1
                nll -= sum(float(logprobs[start + i, t]) for i, t in enumerate(s["token_ids"]))
                tokens += len(s["token_ids"])
            distances = []
            for g in inputs_of(samples, n):
                vectors = []
                for s in g:
                    ids = [tokenizer.bos_id] + [t for t in s["token_ids"] if t != tokenizer.eos_id]
                    vectors.append(reference.hidden_states(torch.tensor([ids]))[0].double().mean(0).numpy())
                unit = np.stack(vectors) / np.linalg.norm(np.stack(vectors), axis=1, keepdims=True)
                distances.append(np.mean(1.0 - unit @ unit.T))
        row = quick_run["rows"][label]
        assert float(row["reference_ce"]) == pytest.approx(nll / tokens, rel=1e-5)
        assert float(row["cosine_distance"]) == pytest.approx(np.mean(distances), rel=1e-4, abs=1e-6)


def test_pareto_marks_follow_the_definition(quick_run):
    """Fronts among the DPO and SPL settings; the reference row (for scale) has empty marks."""
    reference = quick_run["rows"]["reference T=1"]
    assert all(reference[p] == "" for p in PANELS) and reference["fronts"] == ""
    rows = [quick_run["rows"][s] for s in quick_run["order"] if s != "reference T=1"]
    for diversity in exp.DIVERSITY:
        for quality, sign in exp.QUALITY:
            points = [(float(r[diversity]), sign * float(r[quality])) for r in rows]
            for r, (d, q) in zip(rows, points):
                dominated = any(d2 >= d and q2 >= q and (d2, q2) != (d, q) for d2, q2 in points)
                assert int(r[f"front:{diversity}/{quality}"]) == int(not dominated), (r["setting"], diversity, quality)
    for r in rows:
        assert int(r["fronts"]) == sum(int(r[p]) for p in PANELS)


def test_sampling_filters_hold_under_the_sampling_policy(quick_run):
    """Each saved token against the DPO policy's full-forward logits at its position (1e-4 slack for the cached
    decoding's rounding). The unfiltered T = 1.5 samples do leave the top 11: the check can fail."""
    policy, _ = load_policy(quick_run["experiment"]["runs"]["dpo"])
    worst = {}
    for label, row in quick_run["rows"].items():
        if row["policy"] != "dpo":
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
    assert worst["dpo T=1.5"][0] >= 11  # without a filter some token ranks below the 11th


def test_story_metrics_by_hand():
    """Two inputs of N = 2: two well-formed doctor stories naming Maya and Tom (both about a sister): name entropy
    ln 2, relation entropy 0; two non-stories: no name or relation to read, 0 and 0, validity 0. Means over the
    inputs: ln(2) / 2, 0, validity 2 / 4."""
    prompt = "Write a short story about a doctor."
    maya = ("Maya Chen was a doctor in a quiet village. She took care of her sister every day. "
            "She was very proud of her.")
    tom = "Tom Kim was a doctor in a big city. He took care of his sister every weekend. She was very proud of him."
    texts = [maya, tom, "no story", "no story"]
    metrics, valid = exp.story_metrics([prompt] * 4, texts, num_samples=2)
    assert valid == [True, True, False, False]
    assert metrics["validity"] == pytest.approx(0.5)
    assert metrics["name_entropy"] == pytest.approx(math.log(2) / 2)
    assert metrics["relation_entropy"] == pytest.approx(0.0)
    # distinct-2: each story has 23 words, 22 bigrams; 11 are in both ("was a", "a doctor", "doctor in", "in a",
    # "took care", "care of", "sister every", "She was", "was very", "very proud", "proud of"): 33 / 44. The
    # non-stories have the one bigram "no story" twice: 1 / 2. Mean over the two inputs: (0.75 + 0.5) / 2.
    assert metrics["distinct_2"] == pytest.approx(0.625)


def test_scaled_top_k_pareto_front_and_dominance():
    """180 of 32000 is 0.5625%; of 2000 that is 11.25 -> 11."""
    assert exp.scaled_top_k(2000) == 11 and exp.scaled_top_k(32000) == 180 and exp.scaled_top_k(10) == 1
    with pytest.raises(ValueError, match="vocab_size"):
        exp.scaled_top_k(0)
    # (1, 1) twice: equal points share the front; (0.5, 0.5) is dominated; NaN is never on it
    assert exp.pareto_front([1, 2, 0, 0.5, 1, math.nan], [1, 0, 2, 0.5, 1, 3]) == [True, True, True, False, True,
                                                                                   False]
    with pytest.raises(ValueError, match="pareto_front"):
        exp.pareto_front([1, 2], [1])
    # (1, 1) is dominated by (2, 1) and by (1, 2); (2, 2) by neither; an equal point does not dominate
    assert exp.dominated([(1, 1), (2, 2), (0, 3)], [(2, 1), (2, 2), (0, 3)]) == [True, False, False]


def test_bad_arguments_fail_at_start(tmp_path, capsys):
    with pytest.raises(SystemExit):
        exp.main(["--ratios", "1", "--out", str(tmp_path)])
    assert "alpha/beta > 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        exp.main(["--prompts", "7", "--out", str(tmp_path)])
    assert "--prompts" in capsys.readouterr().err
