"""eval/experiments/best_of_n.py: experiment 3 (best-of-N on the world's arithmetic, the arithmetic model) in its --quick mode.

Oracles: the saved tables recomputed from the saved per-sample rows (samples.jsonl) alone: per problem, the number
correct and the unique-final-answer fraction with the world's own `check_answer` and a regex of the '#### N' answer
written here; pass@k with the binomial definition 1 - C(n - c, k) / C(n, k) (math.comb, exact integers), not the
product form of eval.metrics; the intervals as `eval.metrics.bootstrap_interval` (tested on its own in
tests/test_eval_bootstrap.py) of those recomputed per-problem values; Figure 9's samples-to-match by a brute-force
scan; and the invariants of the estimator: pass@1 is the mean fraction correct c / n, pass@k never decreases in k,
pass@n is the fraction of problems with at least one correct sample.
"""
import json
import math
import re
from collections import defaultdict
from fractions import Fraction

import numpy as np
import pytest

from data.world import check_answer, load_world
from eval.experiments import best_of_n as exp
from eval.experiments.common import read_csv
from eval.metrics import bootstrap_interval

N = exp.QUICK["num_samples"]
KS = [1, 2, 4, 8]
SHOWN_KS = [1, 4]  # the paper's rows (1, 4, 16, 64, 128) up to n = 8
LEVEL_COLUMNS = (["setting", "method", "ratio", "temperature", "level", "problems"]
                 + [f"pass@{k}{end}" for k in KS for end in ("", "_low", "_high")] + ["unique_fraction", "answered"])
PROBLEM_COLUMNS = ["setting", "problem", "level", "n", "correct", "unique_fraction", "answered"]
ANSWER = re.compile(r"####\s*(-?\d[\d,]*)")  # the spec: the number after the last "####", commas allowed


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp_best_of_n")
    assert exp.main(["--quick", "--out", str(out)]) == 0
    level_columns, levels = read_csv(out / "pass_at_k.csv")
    problem_columns, problems = read_csv(out / "problems.csv")
    samples = defaultdict(list)  # (setting, problem id) -> samples
    for line in (out / "samples.jsonl").read_text(encoding="utf-8").splitlines():
        sample = json.loads(line)
        samples[sample["setting"], sample["problem"]].append(sample)
    experiment = json.loads((out / "experiment.json").read_text(encoding="utf-8"))
    return {"out": out, "level_columns": level_columns, "levels": levels, "problem_columns": problem_columns,
            "problems": problems, "samples": samples, "experiment": experiment,
            "differences": read_csv(out / "differences.csv")[1], "matching": read_csv(out / "matching.csv")[1]}


def binomial_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def counts_from_samples(quick_run) -> dict:
    """(setting, level) -> [(problem id, n, c)] sorted by problem, from samples.jsonl and the world alone."""
    world = {p.id: p for p in load_world().arithmetic}
    counts = defaultdict(list)
    for (setting, problem), samples in sorted(quick_run["samples"].items()):
        correct = sum(check_answer(world[problem], s["text"]) for s in samples)
        counts[setting, world[problem].level].append((problem, len(samples), correct))
    return counts


def values(counts, ks) -> np.ndarray:
    """[K, P] per-problem pass@k, exact rationals rounded once."""
    return np.array([[float(binomial_pass_at_k(n, c, k)) for _, n, c in counts] for k in ks])


def test_outputs_and_table_structure(quick_run):
    assert quick_run["level_columns"] == LEVEL_COLUMNS and quick_run["problem_columns"] == PROBLEM_COLUMNS
    settings = list(dict.fromkeys(r["setting"] for r in quick_run["levels"]))
    assert settings == ["reference T=1", "dpo T=1", "dpo T=1.2", "spl a/b=1.2"]
    for setting in settings:
        rows = [r for r in quick_run["levels"] if r["setting"] == setting]
        assert [int(r["level"]) for r in rows] == list(exp.QUICK["levels"]) == [1, 2, 3]
        assert all(int(r["problems"]) == exp.QUICK["problems"] for r in rows)
    world = {p.id: p for p in load_world().arithmetic}
    for row in quick_run["problems"]:
        problem = world[row["problem"]]
        assert problem.split == "test" and problem.level == int(row["level"])  # held out from SFT and preferences
        assert int(row["n"]) == N == len(quick_run["samples"][row["setting"], row["problem"]])
    experiment = quick_run["experiment"]
    assert experiment["ks"] == KS and set(experiment["runs"]) == {"dpo", "spl-1.2"}
    assert experiment["levels"] == [1, 2, 3] and experiment["problems_per_level"] == exp.QUICK["problems"]
    assert experiment["model"].endswith("arithmetic_model") and experiment["pairs"] == "model"


def test_problem_counts_recomputed_from_samples(quick_run):
    world = {p.id: p for p in load_world().arithmetic}
    for row in quick_run["problems"]:
        samples = quick_run["samples"][row["setting"], row["problem"]]
        answers = []
        for s in samples:
            found = ANSWER.findall(s["text"])
            answers.append(int(found[-1].replace(",", "")) if found else None)
        assert [s["answer"] for s in samples] == answers
        assert int(row["correct"]) == sum(check_answer(world[row["problem"]], s["text"]) for s in samples)
        assert int(row["correct"]) == sum(a == world[row["problem"]].answer for a in answers)
        assert float(row["unique_fraction"]) == pytest.approx(len(set(answers)) / len(answers), abs=1e-12)
        assert float(row["answered"]) == pytest.approx(sum(a is not None for a in answers) / len(answers), abs=1e-12)


def test_table_recomputed_from_the_per_sample_rows(quick_run):
    """pass@k and its interval per (setting, level) from samples.jsonl alone: the exact binomial estimator per
    problem, averaged; the bootstrap of those values with the experiment's seed (+ level) and settings."""
    counts = counts_from_samples(quick_run)
    seed, interval = quick_run["experiment"]["seed"], quick_run["experiment"]["interval"]
    for row in quick_run["levels"]:
        at_level = counts[row["setting"], int(row["level"])]
        per_problem = values(at_level, KS)  # (K, P)
        low, high = bootstrap_interval(per_problem, interval["level"], interval["resamples"],
                                       seed=seed + int(row["level"]))
        saved = [float(row[f"pass@{k}"]) for k in KS]
        for i, k in enumerate(KS):
            expected = sum(binomial_pass_at_k(n, c, k) for _, n, c in at_level) / len(at_level)
            assert saved[i] == pytest.approx(float(expected), abs=1e-12)
            assert float(row[f"pass@{k}_low"]) == pytest.approx(low[i], abs=1e-12)
            assert float(row[f"pass@{k}_high"]) == pytest.approx(high[i], abs=1e-12)
            assert low[i] - 1e-12 <= per_problem[i].mean() <= high[i] + 1e-12
        assert saved[0] == pytest.approx(sum(c / n for _, n, c in at_level) / len(at_level), abs=1e-12)
        assert all(a <= b + 1e-12 for a, b in zip(saved, saved[1:]))  # more samples never hurt
        assert saved[-1] == pytest.approx(sum(c > 0 for _, _, c in at_level) / len(at_level), abs=1e-12)  # k = n
        assert 0 <= float(row["unique_fraction"]) <= 1 and 0 <= float(row["answered"]) <= 1


def test_differences_and_samples_to_match_recomputed(quick_run):
    """differences.csv: setting minus DPO T = 1 on the same problems, paired bootstrap; matching.csv: the first N
    at which a setting's mean pass@N reaches DPO T = 1's pass@n0, found by scanning N = 1..n."""
    counts = counts_from_samples(quick_run)
    seed, interval = quick_run["experiment"]["seed"], quick_run["experiment"]["interval"]
    assert {(r["setting"], r["baseline"]) for r in quick_run["differences"]} == \
        {("dpo T=1.2", "dpo T=1"), ("spl a/b=1.2", "dpo T=1")}
    for row in quick_run["differences"]:
        level, k = int(row["level"]), int(row["k"])
        theirs, base = counts[row["setting"], level], counts[row["baseline"], level]
        assert [p for p, _, _ in theirs] == [p for p, _, _ in base]  # the same problems
        difference = values(theirs, [k])[0] - values(base, [k])[0]
        low, high = bootstrap_interval(difference, interval["level"], interval["resamples"], seed=seed + level)
        assert float(row["difference"]) == pytest.approx(difference.mean(), abs=1e-12)
        assert (float(row["low"]), float(row["high"])) == pytest.approx((low, high), abs=1e-12)
    assert {int(r["k"]) for r in quick_run["differences"]} == set(SHOWN_KS)
    for row in quick_run["matching"]:
        level, n0 = int(row["level"]), int(row["baseline_samples"])
        target = values(counts[row["baseline"], level], [n0])[0].mean()
        curve = [values(counts[row["setting"], level], [k])[0].mean() for k in range(1, N + 1)]
        needed = next((k for k in range(1, N + 1) if curve[k - 1] >= target - 1e-12), "")
        assert float(row["baseline_pass"]) == pytest.approx(target, abs=1e-12)
        assert row["samples_needed"] == str(needed)


def test_samples_to_match_by_hand():
    """curve = best-of-1..4 accuracy: 0.1, 0.3, 0.3, 0.5; 0.3 is first reached at N = 2, 0.5 at 4, 0.6 never."""
    curve = [0.1, 0.3, 0.3, 0.5]
    assert [exp.samples_to_match(curve, t) for t in (0.0, 0.1, 0.3, 0.31, 0.5, 0.6)] == [1, 1, 2, 4, 4, None]


def test_ks_and_held_out_problems():
    assert exp.ks_up_to(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert exp.ks_up_to(100) == [1, 2, 4, 8, 16, 32, 64] and exp.ks_up_to(1) == [1]
    with pytest.raises(ValueError, match="ks_up_to"):
        exp.ks_up_to(0)
    world = load_world()
    problems = exp.held_out_problems(world, (5, 1, 2), 3)
    assert [p.level for p in problems] == [1, 1, 1, 2, 2, 2, 5, 5, 5]
    assert all(p.split == "test" for p in problems) and len({p.id for p in problems}) == 9


def test_bad_arguments_fail_at_start(tmp_path, capsys):
    with pytest.raises(SystemExit):
        exp.main(["--ratios", "0.5", "--out", str(tmp_path)])
    assert "alpha/beta > 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        exp.main(["--problems", "33", "--out", str(tmp_path)])
    assert "--problems" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        exp.main(["--levels", "1,6", "--out", str(tmp_path)])
    assert "--levels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        exp.main(["--anchor", "-1", "--out", str(tmp_path)])
    assert "--anchor must be >= 0" in capsys.readouterr().err
