"""The embedded world (data/world/__init__.py) and its build (data/world/build.py).

Oracles: hand-worked numbers derived in docstrings (the count split of the paper's intro example), exact
rational arithmetic (fractions.Fraction) for the count rule, an independent evaluator of the arithmetic (Python's
own `ast` on the prompt's expression, and every "x op y = z" step re-checked), hand-written stories, the paper's
Appendix D prompt typed out here, sentencepiece itself for the tokenizer, statistical bounds for sampled data,
and invariants (determinism, the committed world equals a fresh build, a Bradley-Terry fit of exact data returns
the population).
"""
from __future__ import annotations

import ast
import itertools
import json
import math
import operator
import random
import re
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path

import pytest
import sentencepiece

from data import world as W
from data.world.build import build_world, main as build_main

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "data" / "world"


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    build_world(out, seed=0)
    return out


@pytest.fixture(scope="module")
def world(built) -> W.World:
    return W.load_world(built)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def tv(p, q) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q))


# ---- the count split and the preference files ---------------------------------------------------------------

def test_split_counts_hand_worked_intro_example(world):
    """Intro example p = (.55, .20, .15, .10), K = 20; sigma(log p_i - log p_j) = p_i / (p_i + p_j):
    A-B .55/.75 = .733 -> 14.67 -> 15;  A-C .55/.70 = .786 -> 15.71 -> 16;  A-D .55/.65 = .846 -> 16.92 -> 17;
    B-C .20/.35 = .571 -> 11.43 -> 11;  B-D .20/.30 = .667 -> 13.33 -> 13;  C-D .15/.25 = .600 -> 12.
    Halves go up: 2 * .75 = 1.5 -> 2, 3 * .5 = 1.5 -> 2, 2 * .25 = .5 -> 1."""
    expected = {(0, 1): 15, (0, 2): 16, (0, 3): 17, (1, 2): 11, (1, 3): 13, (2, 3): 12}
    p = (.55, .20, .15, .10)
    for (i, j), wins in expected.items():
        assert W.split_counts(W.preference_probability(p[i], p[j]), 20) == wins
    assert (W.split_counts(.75, 2), W.split_counts(.5, 3), W.split_counts(.25, 2)) == (2, 2, 1)
    question = world.opinions[0]
    records = [r for r in read_jsonl(world.files["opinion_pairs"]) if r["id"] == question.id]
    assert len(records) == 6 * 20
    for (i, j), wins in expected.items():
        a, b = question.options[i], question.options[j]
        assert sum(r["chosen"] == a and r["rejected"] == b for r in records) == wins
        assert sum(r["chosen"] == b and r["rejected"] == a for r in records) == 20 - wins


def test_split_counts_is_the_nearest_integer_exactly():
    """Oracle in exact rationals: n = floor(K q + 1/2), the nearest integer to K q with halves up."""
    for denominator in range(1, 41):
        for numerator in range(denominator + 1):
            q = Fraction(numerator, denominator)
            for k in (1, 2, 3, 4, 5, 7, 20, 33):
                n = W.split_counts(numerator / denominator, k)
                assert n == math.floor(k * q + Fraction(1, 2)), (q, k)
                assert abs(Fraction(n, k) - q) <= Fraction(1, 2 * k)
    for bad in ((0.5, 0), (1.5, 4), (-0.1, 4), (0.5, 2.0)):
        with pytest.raises(ValueError, match="split_counts"):
            W.split_counts(*bad)


def test_opinion_counts_file_follows_the_rule_for_every_pair(world):
    """Every question, every pair: K records, floor(K q + 1/2) prefer the first option, q computed in exact
    rationals from the decimal population; no pair is unanimous (a unanimous pair has no finite optimum)."""
    k = world.comparisons_per_pair["opinion"]
    wins = Counter((r["id"], r["chosen"], r["rejected"]) for r in read_jsonl(world.files["opinion_pairs"]))
    assert sum(wins.values()) == k * sum(math.comb(len(q.options), 2) for q in world.opinions)
    for q in world.opinions:
        exact = [Fraction(str(p)) for p in q.population]
        for i, j in itertools.combinations(range(len(q.options)), 2):
            n = math.floor(k * exact[i] / (exact[i] + exact[j]) + Fraction(1, 2))
            assert wins[q.id, q.options[i], q.options[j]] == n
            assert wins[q.id, q.options[j], q.options[i]] == k - n
            assert 0 < n < k, (q.prompt, q.options[i], q.options[j])


def test_opinion_soft_file_has_the_exact_probability(world):
    by_id = {q.id: q for q in world.opinions}
    records = read_jsonl(world.files["opinion_pairs_soft"])
    assert len(records) == sum(math.comb(len(q.options), 2) for q in world.opinions)
    for r in records:
        q = by_id[r["id"]]
        assert set(r) == {"id", "prompt", "chosen", "rejected", "chosen_prob"} and r["prompt"] == q.prompt
        p_c, p_r = (q.population[q.options.index(r[side])] for side in ("chosen", "rejected"))
        assert r["chosen_prob"] == pytest.approx(p_c / (p_c + p_r), abs=1e-12)
        assert r["chosen_prob"] >= 0.5


def test_opinion_sampled_file_is_binomial(world):
    """Sampled winners: per pair K records; over all pairs the total surplus of first-option wins,
    sum(wins - K q), is within 4 standard deviations sqrt(sum K q (1 - q)) of zero."""
    k = world.comparisons_per_pair["opinion"]
    sampled = read_jsonl(world.files["opinion_pairs_sampled"])
    assert sampled != read_jsonl(world.files["opinion_pairs"])
    wins = Counter((r["id"], r["chosen"], r["rejected"]) for r in sampled)
    surplus = variance = 0.0
    for q in world.opinions:
        for i, j in itertools.combinations(range(len(q.options)), 2):
            prob = q.population[i] / (q.population[i] + q.population[j])
            first, second = wins[q.id, q.options[i], q.options[j]], wins[q.id, q.options[j], q.options[i]]
            assert first + second == k
            surplus += first - k * prob
            variance += k * prob * (1 - prob)
    assert abs(surplus) <= 4 * math.sqrt(variance)


def test_bradley_terry_fit_recovers_the_population():
    """Invariant: with win counts exactly K sigma(r_i - r_j), r = log p, the maximum-likelihood fit is p."""
    p = [.45, .25, .2, .1]
    wins = [[0.0 if i == j else 20 * p[i] / (p[i] + p[j]) for j in range(4)] for i in range(4)]
    assert W.bradley_terry_fit(wins) == pytest.approx(p, abs=1e-9)
    assert W.counts_population(p, 10_000) == pytest.approx(p, abs=1e-3)  # rounding vanishes as K grows


def test_apportion():
    """Largest remainder, hand-worked: 20 * (.55, .2, .15, .1) = (11, 4, 3, 2) exactly; 10 * (1/3, 1/3, 1/3)
    = 3.33 each -> (4, 3, 3), the tie going to the first."""
    assert W.apportion([.55, .2, .15, .1], 20) == [11, 4, 3, 2]
    assert W.apportion([1, 1, 1], 10) == [4, 3, 3]
    rng = random.Random(0)
    for _ in range(200):
        weights, total = [rng.random() for _ in range(rng.randint(1, 6))], rng.randint(0, 50)
        counts = W.apportion(weights, total)
        assert sum(counts) == total
        assert all(abs(c - total * w / sum(weights)) < 1 for c, w in zip(counts, weights))


# ---- opinions -----------------------------------------------------------------------------------------------

def test_opinion_distributions(world):
    questions = world.opinions
    assert len(questions) >= 24 and len({q.prompt for q in questions}) == len(questions)
    for q in questions:
        assert 3 <= len(q.options) <= 5 and len(set(q.options)) == len(q.options)
        assert all(len(option.split()) <= 9 for option in q.options)  # the intro example's longest is 9
        for dist in (q.population, q.reference):
            assert len(dist) == len(q.options) and min(dist) > 0
            assert sum(dist) == pytest.approx(1.0, abs=1e-9)
        assert tv(q.population, q.reference) >= 0.15, q.prompt
        assert max(q.population) / min(q.population) <= 19, q.prompt
    tops = [max(q.population) for q in questions]
    assert min(tops) <= 0.3 and max(tops) >= 0.75  # near-uniform to strongly skewed


def test_intro_example_is_present(world):
    q = world.opinions[0]
    assert q.prompt == "The best way to reduce income inequality is:"
    assert dict(zip(q.options, q.population)) == {
        "Increase minimum wage": 0.55, "Expand access to education and job training": 0.20,
        "Implement universal basic income": 0.15, "Lower taxes on the wealthy to stimulate job creation": 0.10}
    assert max(q.reference) != q.reference[0]  # the SFT text's favourite is not the population's


def test_sft_opinions_follow_the_reference(world):
    """References have two decimals, so 100 answers per question reproduce them exactly."""
    answers = defaultdict(Counter)
    for r in read_jsonl(world.files["sft"]):
        answers[r["prompt"]][r["response"]] += 1
    for q in world.opinions:
        assert sum(answers[q.prompt].values()) == 100
        assert [answers[q.prompt][o] for o in q.options] == [round(100 * r) for r in q.reference]


# ---- stories ------------------------------------------------------------------------------------------------

DOCTOR = "Write a short story about a doctor."
GOOD = "Maya Chen was a doctor in a small town. She took care of her brother every day. He was very proud of her."


def test_validate_story_on_hand_written_texts():
    check = W.validate_story(DOCTOR, GOOD)
    assert check == W.StoryCheck(True, "", "Maya", "Chen", "female", "brother", "doctor")
    assert W.validate_story(DOCTOR, "\n " + GOOD + " ").valid
    other = "Omar Kim was a pilot in a quiet village. He flew a small plane with his mother every weekend. " \
            "In the end, Omar was happy, and so was his mother."
    assert W.validate_story("Write a short story about a pilot.", other) == \
        W.StoryCheck(True, "", "Omar", "Kim", "male", "mother", "pilot")
    bad = {  # text -> a word of the reason
        GOOD.replace("She took", "He took"): "'She'",  # the hero's pronoun disagrees with the name
        GOOD.replace("He was", "She was"): "'He'",  # the relative's pronoun disagrees with the relation
        GOOD.replace("proud of her", "proud of him"): "her",
        GOOD.replace("took care of", "baked bread for"): "took",  # another profession's act
        GOOD.replace("Maya", "Mayq"): "name",
        GOOD.replace("small town", "big town"): "place",
        GOOD.replace("care of", "care care of"): "care",
        GOOD[:-5]: "template",  # truncated
        GOOD + " The end.": "template",
        "Maya Chen was a doctor in a small town.": "template",
        "hello": "template",
    }
    for text, reason in bad.items():
        verdict = W.validate_story(DOCTOR, text)
        assert not verdict.valid and reason in verdict.reason, (text, verdict)
    pilot = GOOD.replace("doctor", "pilot").replace("took care of", "flew a small plane with")
    verdict = W.validate_story(DOCTOR, pilot)
    assert not verdict.valid and "asks for a doctor" in verdict.reason and verdict.profession == "pilot"
    assert W.validate_story(DOCTOR, GOOD.replace("She took", "He took")).gender == "male"  # what the text says
    for prompt in ("Write a short story about a plumber.", "Tell me a joke."):
        with pytest.raises(ValueError, match="not a story prompt"):
            W.validate_story(prompt, GOOD)


def test_generated_stories_validate_with_their_attributes(world):
    """The validator extracts what the generator put in; for the SFT stories, checked against a plain split of
    the text (words 0, 1 and 4, the pronoun opening sentence 2 and the word after her/his in it)."""
    rng = random.Random(1)
    for _ in range(300):
        profession = rng.choice(list(W.PROFESSIONS))
        attrs = W.sample_story(world.stories, profession, rng, distribution=rng.choice(["reference", "population"]))
        check = W.validate_story(W.story_prompt(profession), W.render_story(attrs))
        assert check == W.StoryCheck(True, "", attrs.name, attrs.surname, attrs.gender, attrs.relation, profession)
    stories = [r for r in read_jsonl(world.files["sft"]) if r["prompt"].startswith("Write a short story")]
    assert len(stories) == 150 * len(W.PROFESSIONS)
    for r in stories:
        words, second = r["response"].split(" "), r["response"].split(". ")[1].split(" ")
        check = W.validate_story(r["prompt"], r["response"])
        assert check.valid, (r, check)
        assert (check.name, check.surname, check.profession) == (words[0], words[1], words[4])
        assert r["prompt"] == f"Write a short story about a {words[4]}."
        assert check.gender == {"She": "female", "He": "male"}[second[0]]
        assert check.relation == second[second.index("her" if second[0] == "She" else "his") + 1]


def test_corrupted_stories_are_rejected(world):
    rng = random.Random(2)
    for _ in range(60):
        profession = rng.choice(list(W.PROFESSIONS))
        story = W.render_story(W.sample_story(world.stories, profession, rng))
        for kind in W.CORRUPTIONS:
            aberrant = W.corrupt_story(story, kind, rng)
            assert aberrant != story and not W.validate_story(W.story_prompt(profession), aberrant).valid, aberrant
    with pytest.raises(ValueError, match="corrupt_story"):
        W.corrupt_story(GOOD, "typo", rng)


def test_story_preferences(world):
    """Population and reference over names and relations per profession; the soft pairs' chosen_prob is
    p_i / (p_i + p_j) of the attributes the validator reads off the two texts; aberration pairs put the
    well-formed story first."""
    spec = world.stories
    for attribute, vocabulary in (("name", W.NAMES), ("relation", W.RELATIONS)):
        for profession in W.PROFESSIONS:
            pop, ref = spec.population[attribute][profession], spec.reference[attribute][profession]
            assert list(pop) == list(ref) == list(vocabulary)
            assert sum(pop.values()) == pytest.approx(1) and sum(ref.values()) == pytest.approx(1)
            assert tv(list(pop.values()), list(ref.values())) >= 0.15
            assert max(pop.values()) / min(pop.values()) <= 19
    records = read_jsonl(world.files["story_pairs_soft"])
    kinds = Counter(r["id"].split("-", 2)[2] for r in records)
    assert kinds == {"name": 28 * 6, "relation": 15 * 6, **{kind: 6 for kind in W.CORRUPTIONS}}
    for r in records:
        chosen, rejected = (W.validate_story(r["prompt"], r[side]) for side in ("chosen", "rejected"))
        profession, attribute = r["id"].split("-")[1:3]
        assert chosen.valid and chosen.profession == profession
        if attribute in ("name", "relation"):
            p = spec.population[attribute][profession]
            p_c, p_r = p[getattr(chosen, attribute)], p[getattr(rejected, attribute)]
            assert rejected.valid and r["chosen_prob"] == pytest.approx(p_c / (p_c + p_r), abs=1e-12)
        else:
            assert not rejected.valid and r["chosen_prob"] == pytest.approx(spec.aberration_preference)


# ---- arithmetic ---------------------------------------------------------------------------------------------

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def evaluate(expression: str) -> int:
    """Python's own parser on the prompt's expression: + - * over integer literals, nothing else."""
    def visit(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](visit(node.left), visit(node.right))
        assert isinstance(node, ast.Constant) and isinstance(node.value, int), ast.dump(node)
        return node.value
    return visit(ast.parse(expression, mode="eval").body)


def prompt_expression(prompt: str) -> str:
    match = re.fullmatch(r"What is ([\d +*]+)\?", prompt)
    assert match, prompt
    return match.group(1)


def false_steps(solution: str) -> int:
    """How many of a solution's stated facts are false: 'x op y = z.', 'n is m +/- d.' and a count
    'Start at s and count up c: s+1, ..., s+c.'; also asserts the sentences are nothing but those."""
    steps = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)\.", solution)
    rewrites = re.findall(r"(\d+) is (\d+) ([-+]) (\d+)\.", solution)
    counts = re.findall(r"Start at (\d+) and count up (\d+): ([\d, ]+)\.", solution)
    assert sum(map(len, (steps, rewrites, counts))) == solution.count(".")  # every sentence is one of them
    wrong = sum(evaluate(f"{x} {op} {y}") != int(z) for x, op, y, z in steps)
    wrong += sum(evaluate(f"{m} {op} {d}") != int(n) for n, m, op, d in rewrites)
    for start, up, seen in counts:
        wrong += [int(s) for s in seen.split(", ")] != list(range(int(start) + 1, int(start) + int(up) + 1))
    return wrong


def test_arithmetic_answers_are_correct(world):
    for problem in world.arithmetic:
        assert evaluate(prompt_expression(problem.prompt)) == problem.answer
        assert len(problem.solutions) >= 2
        for strategy, solution in problem.solutions.items():
            assert false_steps(solution) == 0, solution
            assert W.check_answer(problem, solution) and solution.endswith(f"#### {problem.answer}")
    sft = [r for r in read_jsonl(world.files["sft"]) if r["prompt"].startswith("What is")]
    assert len(sft) == 5 * 400
    for r in sft:
        assert false_steps(r["response"]) == 0, r
        assert W.extract_answer(r["response"]) == evaluate(prompt_expression(r["prompt"]))


def test_check_answer_rejects_a_wrong_final_number(world):
    problem = world.arithmetic[-1]
    for solution in problem.solutions.values():
        stem = solution.rsplit("####", 1)[0]
        assert not W.check_answer(problem, stem + f"#### {problem.answer + 1}")
        assert not W.check_answer(problem, stem)  # no final answer at all
        assert W.check_answer(problem, stem + f"####{problem.answer}\n")
        assert not W.check_answer(problem, solution + f" #### {problem.answer - 1}")  # the last '####' counts
    assert W.extract_answer("so #### 1,081") == 1081 and W.extract_answer("#### -7") == -7
    assert W.extract_answer("the answer is 12") is None


def test_arithmetic_levels_and_splits(world):
    """Operand ranges as LEVELS describes them; held-out problems appear in no SFT or preference prompt."""
    ranges = {1: [(1, 9), (1, 9)], 2: [(11, 99)] * 2, 3: [(11, 99), (2, 9)], 4: [(11, 99), (2, 9), (11, 99)],
              5: [(11, 99)] * 2}
    by_level = defaultdict(list)
    for problem in world.arithmetic:
        by_level[problem.level, problem.split].append(problem)
        assert len(problem.operands) == len(ranges[problem.level])
        assert all(lo <= x <= hi and (x < 10 or x % 10) for x, (lo, hi) in zip(problem.operands,
                                                                               ranges[problem.level]))
    assert {key: len(value) for key, value in by_level.items()} == \
        {(level, split): 32 if split == "test" else 16 for level in range(1, 6) for split in ("test", "train")}
    held_out = {p.prompt for p in world.arithmetic if p.split == "test"}
    seen = {r["prompt"] for r in read_jsonl(world.files["sft"])}
    seen |= {r["prompt"] for r in read_jsonl(world.files["arithmetic_pairs_soft"])}
    assert not held_out & seen
    strategies = Counter(s for p in world.arithmetic for s in p.solutions)
    assert set(strategies) == {"direct", "count", "make_ten", "split", "round"}


def test_arithmetic_preferences(world):
    """Each training problem: one slipped candidate, exactly one false step, a wrong answer. Raters catch slips
    at levels 1-4 (the correct one is always chosen against it); at level 5 they cannot, and prefer the
    slipped direct solution to a correct split one: the population's preferred strategy sometimes fails."""
    problems = {p.id: p for p in world.arithmetic}
    records = read_jsonl(world.files["arithmetic_pairs_soft"])
    for problem_id, group in itertools.groupby(records, key=lambda r: r["id"]):
        problem, group = problems[problem_id], list(group)
        texts = {text for r in group for text in (r["chosen"], r["rejected"])}
        wrong = [t for t in texts if not W.check_answer(problem, t)]
        assert len(wrong) == 1 and false_steps(wrong[0]) == 1 and len(texts) == len(problem.solutions) + 1
        for r in group:
            if r["chosen"] in wrong:
                assert problem.level == 5
                assert r["rejected"] != problem.solutions["direct"] and r["chosen_prob"] > 0.5
    level5 = [r for r in records if problems[r["id"]].level == 5 and not W.check_answer(problems[r["id"]], r["chosen"])]
    assert len(level5) >= 16


# ---- multiple choice ----------------------------------------------------------------------------------------

APPENDIX_D = ("Please answer the following multiple choice question. Start your answer with the capital letter "
              "corresponding to your choice:\n\n{question}\n\nAnswer choices:\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n\n"
              "Your answer:")


def test_mcq_items(world):
    assert len(world.mcq) >= 40
    for item in world.mcq:
        assert item.correct in "ABCD" and len(set(item.options)) == 4
        assert item.prompt == APPENDIX_D.format(question=item.question, a=item.options[0], b=item.options[1],
                                                c=item.options[2], d=item.options[3])
        assert sum(item.population) == pytest.approx(1) and min(item.population) >= 0.02
        root = [math.sqrt(p) for p in item.population]
        assert item.reference == pytest.approx([r / sum(root) for r in root], abs=1e-12)
    sft = defaultdict(Counter)
    for r in read_jsonl(world.files["sft"]):
        sft[r["prompt"]][r["response"]] += 1
    for item in world.mcq:
        counts = sft[item.prompt]
        assert sum(counts.values()) == 10 and set(counts) <= set("ABCD")
        assert all(abs(counts[letter] / 10 - ref) < 1 / 10 for letter, ref in zip("ABCD", item.reference))
    assert len(read_jsonl(world.files["mcq_pairs_soft"])) == 6 * len(world.mcq)


def test_mcq_truth_is_drawn_from_the_raters_beliefs(world):
    """The truth is a draw from p, so the raters' favourite is right on sum(p_max) items on average, with
    variance sum(p_max (1 - p_max)): a policy equal to p is calibrated and DPO's collapse is overconfident."""
    tops = [max(item.population) for item in world.mcq]
    right = sum(item.population["ABCD".index(item.correct)] == top for item, top in zip(world.mcq, tops))
    assert abs(right - sum(tops)) <= 4 * math.sqrt(sum(t * (1 - t) for t in tops))
    assert right < len(world.mcq)  # the population is sometimes wrong
    assert min(tops) < 0.45 and max(tops) > 0.8  # from unsure to sure


# ---- the whole world ----------------------------------------------------------------------------------------

def test_sft_records(world):
    records = read_jsonl(world.files["sft"])
    assert all(set(r) == {"prompt", "response"} and r["prompt"].strip() and r["response"].strip() for r in records)
    kinds = Counter("story" if r["prompt"].startswith("Write a short story") else "arithmetic"
                    if r["prompt"].startswith("What is") else "mcq" if r["prompt"].startswith("Please answer")
                    else "opinion" for r in records)
    assert kinds == {"opinion": 100 * len(world.opinions), "story": 900, "arithmetic": 2000, "mcq": 10 * len(world.mcq)}
    for name, path in world.files.items():
        if name.endswith("_pairs") or name.endswith("_sampled"):
            assert all(set(r) == {"id", "prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"]
                       for r in read_jsonl(path)), name


def test_builds_are_deterministic(built, tmp_path):
    """Same seed: byte-identical files (tokenizer included). Another seed: different data."""
    again = build_world(tmp_path / "again", seed=0)
    assert {p.name: p.read_bytes() for p in again.values()} == {p.name: p.read_bytes() for p in built.iterdir()}
    other = build_world(tmp_path / "other", seed=1)
    for name in ("sft", "spec", "story_pairs", "arithmetic_pairs", "mcq_pairs", "opinion_pairs_sampled"):
        assert other[name].read_bytes() != (built / W.FILES[name]).read_bytes(), name
    assert other["opinion_pairs"].read_bytes() == (built / W.FILES["opinion_pairs"]).read_bytes()  # no randomness


def test_committed_world_is_a_fresh_build(tmp_path):
    """data/world/ in the repository is exactly what `python -m data.world.build` writes with its recorded seed
    and K, tokenizer included, so nobody trains on a stale world."""
    spec = json.loads((COMMITTED / W.FILES["spec"]).read_text(encoding="utf-8"))
    counts = spec["comparisons_per_pair"]
    fresh = build_world(tmp_path, spec["seed"], counts["opinion"], counts["story"])
    assert {path.name for path in fresh.values()} == set(spec["files"].values())
    for path in fresh.values():
        assert (COMMITTED / path.name).read_bytes() == path.read_bytes(), path.name


def test_tokenizer(world):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(world.files["tokenizer"]))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert 1000 <= sp.get_piece_size() <= 4000
    chat = sp.encode("[INST] What is 3 + 5? [/INST]", out_type=str)
    assert chat[0] == "▁[INST]" and chat[-1] == "▁[/INST]"
    assert [len(sp.encode(letter)) for letter in "ABCD"] == [1] * 4  # an MCQ answer is one token
    assert len(set(sp.encode("A B C D"))) == 4
    texts = [text for r in read_jsonl(world.files["sft"]) for text in r.values()]
    for name in ("opinion_pairs_soft", "story_pairs_soft", "arithmetic_pairs_soft", "mcq_pairs_soft"):
        texts += [r[key] for r in read_jsonl(world.files[name]) for key in ("prompt", "chosen", "rejected")]
    texts += ["héllo wörld ✓\n\ttabs  and  spaces", "日本語"]
    for text in texts:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
    with_digits = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
                   if not sp.is_byte(i) and any(c.isdigit() for c in sp.id_to_piece(i))]
    assert sorted(with_digits) == [str(d) for d in range(10)]  # split_digits: a number is one piece per digit
    assert 0 not in sp.encode("日本語")  # byte fallback, never <unk>


def test_bad_inputs(tmp_path, built):
    with pytest.raises(FileNotFoundError, match=r"python -m data\.world\.build"):
        W.load_world(tmp_path / "nowhere")
    for bad in (dict(k=0), dict(k_other=-1), dict(k=2.5)):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            W.generate_world(0, **bad)
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in built.iterdir():
        if path.name != W.FILES["sft"]:
            (broken / path.name).write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="sft.jsonl: missing world file"):
        W.load_world(broken)
    spec = json.loads((broken / W.FILES["spec"]).read_text())
    (broken / W.FILES["spec"]).write_text(json.dumps(spec | {"version": 99}))
    with pytest.raises(ValueError, match="world version 99"):
        W.load_world(broken)
    assert build_main(["--out", str(tmp_path / "x"), "--k", "0"]) == 1
