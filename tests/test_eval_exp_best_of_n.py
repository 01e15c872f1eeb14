"""eval/exp_best_of_n.py: experiment 3 (best-of-N on the world's arithmetic) in its --quick mode.

Oracles: per problem, the number correct and the unique-final-answer fraction recomputed from the saved samples
with the world's own `check_answer` and a regex of the '#### N' answer written here; pass@k recomputed with the
binomial definition 1 - C(n - c, k) / C(n, k) (math.comb, exact integers), not the product form of
eval.metrics; and the invariants of the estimator: pass@1 is the mean fraction correct c / n, pass@k never
decreases in k, pass@n is the fraction of problems with at least one correct sample.
"""
import json
import math
import re
from collections import defaultdict
from fractions import Fraction

import pytest

from data.world import check_answer, load_world
from eval import exp_best_of_n as exp
from eval.experiment import read_csv

N = exp.QUICK["num_samples"]
KS = [1, 2, 4, 8]
LEVEL_COLUMNS = (["setting", "method", "ratio", "temperature", "level", "problems"] + [f"pass@{k}" for k in KS]
                 + ["unique_fraction", "answered"])
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
    return {"out": out, "level_columns": level_columns, "levels": levels, "problem_columns": problem_columns,
            "problems": problems, "samples": samples}


def binomial_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_outputs_and_table_structure(quick_run):
    assert quick_run["level_columns"] == LEVEL_COLUMNS and quick_run["problem_columns"] == PROBLEM_COLUMNS
    settings = list(dict.fromkeys(r["setting"] for r in quick_run["levels"]))
    assert settings == ["reference T=1", "dpo T=1", "dpo T=1.2", "spl a/b=1.2"]
    for setting in settings:
        rows = [r for r in quick_run["levels"] if r["setting"] == setting]
        assert [int(r["level"]) for r in rows] == list(exp.LEVELS) == [1, 2, 3]
        assert all(int(r["problems"]) == exp.QUICK["problems"] for r in rows)
    world = {p.id: p for p in load_world().arithmetic}
    for row in quick_run["problems"]:
        problem = world[row["problem"]]
        assert problem.split == "test" and problem.level == int(row["level"])  # held out from SFT and preferences
        assert int(row["n"]) == N == len(quick_run["samples"][row["setting"], row["problem"]])
    experiment = json.loads((quick_run["out"] / "experiment.json").read_text(encoding="utf-8"))
    assert experiment["ks"] == KS and set(experiment["runs"]) == {"dpo", "spl-1.2"}
    assert experiment["levels"] == [1, 2, 3] and experiment["problems_per_level"] == 1


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


def test_pass_at_k_is_the_binomial_estimator_averaged_over_problems(quick_run):
    by_level = defaultdict(list)
    for row in quick_run["problems"]:
        by_level[row["setting"], row["level"]].append((int(row["n"]), int(row["correct"])))
    for row in quick_run["levels"]:
        counts = by_level[row["setting"], row["level"]]
        values = [float(row[f"pass@{k}"]) for k in KS]
        for k, value in zip(KS, values):
            expected = sum(binomial_pass_at_k(n, c, k) for n, c in counts) / len(counts)
            assert value == pytest.approx(float(expected), abs=1e-12)
        assert values[0] == pytest.approx(sum(c / n for n, c in counts) / len(counts), abs=1e-12)  # pass@1 = c / n
        assert all(a <= b + 1e-12 for a, b in zip(values, values[1:]))  # more samples never hurt
        assert values[-1] == pytest.approx(sum(c > 0 for _, c in counts) / len(counts), abs=1e-12)  # k = n
        assert 0 <= float(row["unique_fraction"]) <= 1 and 0 <= float(row["answered"]) <= 1


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
