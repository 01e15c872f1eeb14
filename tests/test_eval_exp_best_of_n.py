"""eval/experiments/best_of_n.py (best-of-N as a mechanism test), its statistics, strategy mixes and sampler.

Oracles:
- pass@k: brute force over every k-subset of n samples (the estimator's definition: the chance that k drawn
  without replacement hold a correct one), and its expectation over c ~ Binomial(n, p), which is 1 - (1 - p)^k
  exactly (Chen et al. 2021), summed here with exact fractions.
- the two-way bootstrap: an explicit loop over resamples with the same random draws (the definition written out),
  S = 1 equal to `eval.metrics.bootstrap_interval`, and invariants (a constant table has a zero-width interval at
  the constant, a shift moves the interval by the shift, a negated table negates and swaps it).
- the gate's closed form: the minimiser of the expected soft-label SPL loss over all candidate pairs (Eq. 5 with
  chosen_prob p_i / (p_i + p_j)), found numerically by L-BFGS over free log-probs; and a policy placed at the
  anchored optimum passes the gate with TV 0.
- strategy labels: the world's own solver (`solve`, `slipped_solution`) writes each strategy's texts.
- the sampler: frequencies of whole sampled texts against their teacher-forced probabilities (`sequence_nll`).
- the quick run: counts recomputed from samples.jsonl with an answer parsed here from the prompt's expression.
"""
import itertools
import json
import math
import random
import re
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from eval.experiments import best_of_n as exp
from eval.experiments import best_of_n_stats as stats
from eval.experiments import strategy_mix as sm
from eval.experiments.common import read_csv
from eval.metrics import bootstrap_interval, pass_at_k

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)


# ---- pass@k ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,c,k", [(7, 0, 3), (7, 2, 1), (7, 2, 3), (7, 5, 3), (6, 1, 6), (8, 3, 4)])
def test_pass_at_k_is_the_fraction_of_k_subsets_holding_a_correct_sample(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))
    assert pass_at_k(n, c, k) == pytest.approx(float(brute), abs=1e-12)


def test_pass_at_k_is_unbiased_for_one_minus_one_minus_p_to_the_k():
    n, p = 10, Fraction(3, 10)
    for k in (1, 2, 5, 10):
        expected = sum(math.comb(n, c) * p ** c * (1 - p) ** (n - c) * Fraction(pass_at_k(n, c, k))
                       for c in range(n + 1))
        assert float(expected) == pytest.approx(float(1 - (1 - p) ** k), abs=1e-12)


def test_pass_table_shape_and_ks():
    table = stats.pass_table([[(4, 1), (4, 0)], [(4, 4), (4, 2)]], [1, 2, 4])
    assert table.shape == (3, 2, 2)
    np.testing.assert_allclose(table[0], [[0.25, 0.0], [1.0, 0.5]], atol=1e-12)
    np.testing.assert_allclose(table[2], [[1.0, 0.0], [1.0, 1.0]], atol=1e-12)
    assert stats.ks_up_to(128) == [1, 2, 4, 8, 16, 32, 64, 128] and stats.ks_up_to(5) == [1, 2, 4]


# ---- the two-way bootstrap ----------------------------------------------------------------------------------------

def loop_interval(x, level, resamples, seed):
    """The two-way bootstrap written out: per resample, S seed rows and P problem columns with replacement."""
    seeds, problems = x.shape
    rng = np.random.default_rng(seed)
    problem_picks = rng.integers(0, problems, size=(resamples, problems))
    seed_picks = rng.integers(0, seeds, size=(resamples, seeds)) if seeds > 1 else np.zeros((resamples, 1), int)
    means = [np.mean([[x[s, p] for p in problem_picks[r]] for s in seed_picks[r]]) for r in range(resamples)]
    return np.quantile(means, [(1 - level) / 2, (1 + level) / 2])


def test_two_way_bootstrap_matches_its_definition_and_the_one_seed_case():
    x = np.random.default_rng(3).random((3, 7))
    low, high = stats.seed_problem_interval(x, 0.9, 300, seed=5)
    np.testing.assert_allclose([low, high], loop_interval(x, 0.9, 300, 5), atol=1e-12)
    one = np.random.default_rng(4).random((2, 1, 9))  # two settings, one seed
    np.testing.assert_allclose(stats.seed_problem_interval(one, 0.95, 500, 1),
                               bootstrap_interval(one[:, 0], 0.95, 500, 1), atol=1e-12)


def test_two_way_bootstrap_invariants():
    x = np.random.default_rng(6).random((2, 11))
    low, high = stats.seed_problem_interval(x, seed=2)
    assert low <= x.mean() <= high
    shifted = stats.seed_problem_interval(x + 0.25, seed=2)
    np.testing.assert_allclose(shifted, (low + 0.25, high + 0.25), atol=1e-12)
    negated = stats.seed_problem_interval(-x, seed=2)
    np.testing.assert_allclose(negated, (-high, -low), atol=1e-12)
    constant = stats.seed_problem_interval(np.full((2, 5), 0.3), seed=2)
    np.testing.assert_allclose(constant, (0.3, 0.3), atol=1e-12)
    with pytest.raises(ValueError, match="S, P >= 1"):
        stats.seed_problem_interval(np.zeros((2, 0)))


def test_differences_are_paired():
    """SPL one more correct sample than DPO on every (seed, problem) cell, while the cells themselves vary from 0 to
    7 of 8: the paired pass@1 difference is 1/8 in every resample (interval [1/8, 1/8]), however wide each
    setting's own interval is."""
    counts = [[0, 1, 3, 7], [2, 0, 6, 5]]
    rows = [{"setting": label, "seed": s, "problem": f"p{i}", "level": 5, "n": 8, "correct": c + extra}
            for label, extra in (("dpo T=1", 0), ("spl a/b=2", 1)) for s in (0, 1) for i, c in enumerate(counts[s])]
    diff = stats.difference_rows(rows, "dpo T=1", ["spl a/b=2"], [1])[0]
    assert (diff["difference"], diff["low"], diff["high"]) == pytest.approx((1 / 8, 1 / 8, 1 / 8), abs=1e-12)
    assert diff["excludes_zero"]
    own = {r["setting"]: r for r in stats.level_rows(rows, ["dpo T=1", "spl a/b=2"], [1])}
    assert own["dpo T=1"]["pass@1_high"] - own["dpo T=1"]["pass@1_low"] > 0.2


# ---- strategies and the gate -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world():
    from data.world import load_world

    return load_world()


def test_strategy_of_reads_the_worlds_own_solutions(world):
    from data.world.arithmetic import slipped_solution, solve

    rng = random.Random(0)
    for problem in [p for p in world.arithmetic if p.split == "test"][::7]:
        for name in problem.solutions:
            assert sm.strategy_of(problem, solve(problem, name)) == name
            if name != "count":
                assert sm.strategy_of(problem, slipped_solution(problem, name, rng)) == name
        assert sm.strategy_of(problem, "I do not know. #### 3") == sm.OTHER


def test_world_groups_are_the_worlds_strategy_pairs(world):
    from data.world.pairs import preference_records

    records = preference_records(sm.world_groups(world), "soft")
    lines = world.files["arithmetic_pairs_soft"].read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == json.loads(json.dumps(records))


def test_closed_form_is_the_minimiser_of_the_expected_spl_loss():
    ref_logps = torch.tensor([-1.0, -2.5, -0.7, -4.0], dtype=torch.float64)
    p = torch.tensor([0.45, 0.25, 0.15, 0.15], dtype=torch.float64)
    pairs = list(itertools.combinations(range(4), 2))
    i, j = (torch.tensor(x) for x in zip(*pairs))
    for alpha, beta in ((0.1, 0.1), (0.2, 0.1), (1.0, 0.1)):
        logits = torch.zeros(4, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([logits], max_iter=100, tolerance_grad=1e-12, tolerance_change=1e-14,
                                      line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            logps = torch.log_softmax(logits, -1)
            z = alpha * (logps[i] - logps[j]) - beta * (ref_logps[i] - ref_logps[j])  # Eq. 5, written out here
            q = p[i] / (p[i] + p[j])  # Bradley-Terry soft label
            loss = -(q * torch.nn.functional.logsigmoid(z) + (1 - q) * torch.nn.functional.logsigmoid(-z)).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
        found = torch.softmax(logits.detach(), -1)
        torch.testing.assert_close(sm.closed_form(ref_logps, p, alpha, beta), found, atol=1e-6, rtol=0)
    dpo = torch.softmax(ref_logps, -1) * p ** 10
    torch.testing.assert_close(sm.closed_form(ref_logps, p, 0.1, 0.1), dpo / dpo.sum(), atol=1e-12, rtol=0)


def test_gate_rows_at_the_anchored_optimum_and_at_the_reference(world):
    from spl.theory import anchored_optimum

    groups = sm.world_groups(world)[-6:]  # level 5: direct, split, round where it applies, the slipped direct
    rng = torch.Generator().manual_seed(0)
    refs = [-torch.rand(len(g.candidates), generator=rng, dtype=torch.float64) * 20 for g in groups]
    at_optimum = [anchored_optimum(r, torch.tensor(g.population, dtype=torch.float64), 0.2, exp.BETA)
                  for r, g in zip(refs, groups)]
    rows = sm.gate_rows(world.arithmetic, groups, at_optimum, refs, 0.2, exp.BETA)
    assert all(r["tv"] < 1e-9 and r["tv_strategy"] < 1e-9 and abs(r["log_mass_ratio"]) < 1e-9 for r in rows)
    assert sm.gate_summary(rows, "spl-2", [5])[0]["gate_met"]
    rows = sm.gate_rows(world.arithmetic, groups, refs, refs, 0.2, exp.BETA)
    for r, ref, g in zip(rows, refs, groups):
        target = sm.closed_form(ref, g.population, 0.2, exp.BETA)
        assert r["tv"] == pytest.approx(0.5 * float((torch.softmax(ref, -1) - target).abs().sum()), abs=1e-12)
        assert sum(v for k, v in r.items() if k.startswith("closed_")) == pytest.approx(1.0, abs=1e-12)
        assert r["policy_direct"] == pytest.approx(r["reference_direct"], abs=1e-12)
        # the strategy mix: the slipped candidate is a direct solution with a wrong product, counted as direct
        problem = next(q for q in world.arithmetic if q.id == g.id)
        assert [sm.strategy_of(problem, t) for t, label in zip(g.candidates, sm.candidate_labels(problem, g))
                if label == sm.SLIP] == ["direct"]
        folded = {k: r[f"reference_{k}"] - r[f"closed_{k}"] for k in ("split", "round") if f"closed_{k}" in r}
        folded["direct"] = r["reference_direct"] + r["reference_slip"] - r["closed_direct"] - r["closed_slip"]
        assert r["tv_strategy"] == pytest.approx(0.5 * sum(abs(v) for v in folded.values()), abs=1e-12)
        assert r["tv_strategy"] <= r["tv"] + 1e-12  # merging outcomes never raises a total variation


# ---- the sampler ----------------------------------------------------------------------------------------------------

def test_gumbel_max_sample_draws_the_tempered_softmax():
    from eval.experiments.sampler import gumbel_max_sample

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(40000, -1)
    draws = gumbel_max_sample(logits, 1.3, torch.Generator().manual_seed(0))
    frequency = torch.bincount(draws, minlength=5).double() / len(draws)
    q = torch.softmax(logits[0].double() / 1.3, -1)
    assert torch.all((frequency - q).abs() <= 5 * torch.sqrt(q * (1 - q) / len(draws)))


def test_sample_texts_frequencies_match_teacher_forced_probabilities():
    from data.world.arithmetic import ARITHMETIC_MODEL_DIR
    from eval.experiments.policies import load_policy
    from eval.experiments.sampler import sample_texts
    from eval.metrics import sequence_nll
    from models.generate import user_prompt_ids

    model, tokenizer = load_policy(None, model_dir=ARITHMETIC_MODEL_DIR)
    n, prompt = 300, "What is 3 + 2?"  # every solution of it ends within 48 tokens, so no text is cut short
    texts = sample_texts(model, tokenizer, prompt, n, 48, 1.0, torch.Generator().manual_seed(0))
    common = sorted(set(texts), key=texts.count, reverse=True)[:3]
    probs = torch.exp(-sequence_nll(model, user_prompt_ids(tokenizer, prompt),
                                    [tokenizer.encode_response(t) for t in common]))
    for text, q in zip(common, probs.tolist()):
        assert abs(texts.count(text) / n - q) <= 5 * math.sqrt(q * (1 - q) / n) + 1 / n, text


# ---- the quick run ----------------------------------------------------------------------------------------------

ANSWER = re.compile(r"####\s*(-?\d[\d,]*)")


def answer_of(prompt: str) -> int:
    """The value of 'What is a * b + c?' parsed here (only +, * and integers)."""
    terms = re.fullmatch(r"What is ([\d +*]+)\?", prompt).group(1).split(" + ")
    return sum(math.prod(int(f) for f in term.split(" * ")) for term in terms)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("exp_best_of_n")
    assert exp.main(["--quick", "--out", str(out)]) == 0
    return out


def test_quick_run_counts_tables_and_screen(quick_run, world):
    from data.world.arithmetic import expression, model_sft_operands
    from data.world.build import ARITHMETIC_SFT_PER_LEVEL

    _, problems = read_csv(quick_run / "problems.csv")
    samples = [json.loads(line) for line in (quick_run / "samples.jsonl").read_text().splitlines()]
    for row in problems:
        texts = [s["text"] for s in samples if (s["setting"], str(s["seed"]), s["problem"])
                 == (row["setting"], row["seed"], row["problem"])]
        right = sum(int(m[-1].replace(",", "")) == answer_of(row["prompt"]) if (m := ANSWER.findall(t)) else False
                    for t in texts)
        assert (int(row["n"]), int(row["correct"])) == (len(texts), right)
    _, table = read_csv(quick_run / "pass_at_k.csv")
    for row in table:
        at = [r for r in problems if r["setting"] == row["setting"] and r["level"] == row["level"]]
        value = sum(Fraction(1) - Fraction(math.comb(int(r["n"]) - int(r["correct"]), 4), math.comb(int(r["n"]), 4))
                    for r in at) / len(at)
        assert float(row["pass@4"]) == pytest.approx(float(value), abs=1e-12)
    assert {r["setting"] for r in table} == {"reference T=1", "dpo T=1", "dpo T=1.2", "spl a/b=2"}
    assert {r["seeds"] for r in table if r["setting"] != "reference T=1"} == {"2"}
    _, screen = read_csv(quick_run / "screen.csv")
    low, high = exp.SCREEN
    assert all(low <= float(r["success"]) <= high for r in screen if r["level_name"] == "hard" and r["kept"] == "True")
    taken = {(p.level, tuple(p.operands)) for p in world.arithmetic}
    taken |= set(model_sft_operands(world.arithmetic, random.Random(f"{world.seed}:arithmetic-model-sft"),
                                    ARITHMETIC_SFT_PER_LEVEL))
    taken_prompts = {f"What is {expression(level, operands)}?" for level, operands in taken}
    assert not {r["prompt"] for r in problems} & taken_prompts
    _, gate = read_csv(quick_run / "gate.csv")
    assert {(r["policy"], r["seed"]) for r in gate} == {(p, s) for p in ("dpo", "spl-2") for s in ("0", "1")}
    assert all((float(r["tv_strategy"]) <= sm.GATE_TV) == (r["gate_met"] == "True") for r in gate)
    experiment = json.loads((quick_run / "experiment.json").read_text())
    assert "--anchor" in experiment["recipe"] and "--model" in experiment["recipe"]
    assert experiment["schedules"] == {name: {"steps": 2, "lr": lr} for name, (_, lr) in exp.SCHEDULES.items()}
    spl2 = json.loads((quick_run / "runs" / "seed0" / "spl-2" / "config.json").read_text())
    assert (spl2["steps"], spl2["lr"]) == (2, exp.SCHEDULES["spl-2"][1])  # its own row, not the "spl" default


def test_bad_arguments_fail_at_start(tmp_path, capsys):
    for argv, message in ((["--ratios", "1"], "alpha/beta > 1"), (["--temperatures", "1.2"], "hold 1"),
                          (["--problems", "1,2"], "three counts"), (["--beta", "0.2"], "beta = 0.1")):
        with pytest.raises(SystemExit) as stopped:
            exp.main([*argv, "--out", str(tmp_path)])
        assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_merge_of_one_run_split_by_seed_writes_that_run(quick_run, tmp_path, capsys):
    """--merge: the quick run's two seeds, split into two parts as `--seeds 0` and `--seeds 1` would have written
    them (each with the reference's rows, which every part samples with seed 0), merge back into the quick run's
    own files, byte for byte; parts that disagree, or share a seed, are refused in one line."""
    from eval.experiments.common import write_csv, write_json, write_jsonl

    experiment = json.loads((quick_run / "experiment.json").read_text())
    samples = [json.loads(line) for line in (quick_run / "samples.jsonl").read_text().splitlines()]
    parts = []
    for seed in (1, 0):  # given out of order: the merge puts seed 0 first, as the one run did
        part = tmp_path / f"seed{seed}"
        part.mkdir()
        mine = lambda row: row["setting"] == "reference T=1" or int(row["seed"]) == seed  # noqa: E731
        write_csv(part / "problems.csv", [r for r in read_csv(quick_run / "problems.csv")[1] if mine(r)])
        write_jsonl(part / "samples.jsonl", [x for x in samples if mine(x)])
        write_csv(part / "gate.csv", [r for r in read_csv(quick_run / "gate.csv")[1] if int(r["seed"]) == seed])
        write_csv(part / "screen.csv", read_csv(quick_run / "screen.csv")[1])
        pairs = part / "strategy_pairs.jsonl"  # each part's own copy, as each process writes one in its --out
        pairs.write_bytes(Path(experiment["data"]).read_bytes())
        recipe = list(experiment["recipe"])
        recipe[recipe.index("--data") + 1] = str(pairs)
        write_json(part / "experiment.json", dict(experiment, seeds=[seed], seconds=1.0, data=str(pairs),
                                                  recipe=recipe, runs={k: v for k, v in experiment["runs"].items()
                                                                       if k.endswith(f"seed {seed}")}))
        parts.append(part)
    merged = tmp_path / "merged"
    assert exp.main(["--merge", *map(str, parts), "--out", str(merged)]) == 0
    for name in ("problems.csv", "samples.jsonl", "gate.csv", "pass_at_k.csv", "differences.csv", "matching.csv",
                 "strategies.csv", "screen.csv"):
        assert (merged / name).read_bytes() == (quick_run / name).read_bytes(), name
    again = json.loads((merged / "experiment.json").read_text())
    assert again["seeds"] == [0, 1] and again["runs"] == experiment["runs"]
    capsys.readouterr()
    assert exp.main(["--merge", str(parts[0]), str(parts[0]), "--out", str(tmp_path / "twice")]) == 1
    assert "a seed appears in two parts" in capsys.readouterr().err
    with open(parts[1] / "strategy_pairs.jsonl", "a", encoding="utf-8") as f:  # other pairs
        f.write("{}\n")
    assert exp.main(["--merge", *map(str, parts), "--out", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert f"{parts[1]}: not the same experiment" in err and err.count("\n") == 1
