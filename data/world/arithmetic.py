"""The world's arithmetic: five levels of problems, several solution strategies each, and `check_answer` on
"#### N" (Section 4.2, Figure 3).
"""
from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

from data.world.pairs import PreferenceGroup


LEVELS = {1: "a + b, one digit each", 2: "a + b, two digits each", 3: "a * b, two digits times one",
          4: "a * b + c, two digits times one plus two digits", 5: "a * b, two digits each"}
STRATEGIES = {1: ("direct", "count", "make_ten"), 2: ("direct", "split", "round"), 3: ("direct", "split", "round"),
              4: ("direct", "split", "round"), 5: ("direct", "split", "round")}
# Raters like short solutions; the SFT text's writers show their work.
POPULATION_STRATEGY = {"direct": .60, "count": .25, "make_ten": .15, "split": .25, "round": .15}
REFERENCE_STRATEGY = {"direct": .20, "count": .50, "make_ten": .30, "split": .50, "round": .30}
# Population weight of a solution with an arithmetic slip, relative to the correct one: raters catch slips at
# levels 1-4; at level 5 they cannot check a two-digit product and judge the style alone, so the preferred
# strategy ("direct", whose one-step product is where the slips are) is sometimes the one that fails.
SLIP_WEIGHT = {1: .05, 2: .05, 3: .05, 4: .05, 5: 1.0}
# The arithmetic reference model (data/world/build.py --train-arithmetic-model), beside the world's model: the
# world's model hardly does arithmetic, and best-of-N needs one that solves easy problems often, hard ones rarely.
ARITHMETIC_MODEL_DIR = Path(__file__).resolve().parent / "arithmetic_model"
_FINAL_ANSWER = re.compile(r"####\s*(-?\d[\d,]*)")


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
    id: str
    level: int
    split: str  # "test" (held out from SFT and preferences), "train" (has preference pairs) or "sft"
    prompt: str
    operands: tuple[int, ...]
    answer: int
    solutions: dict  # strategy -> correct step-by-step text ending "#### answer"


def expression(level: int, operands) -> str:
    a, b = operands[:2]
    return {1: f"{a} + {b}", 2: f"{a} + {b}", 3: f"{a} * {b}", 4: f"{a} * {b} + {operands[-1]}",
            5: f"{a} * {b}"}[level]


def strategies(level: int, operands) -> tuple[str, ...]:
    """The strategies that apply: make_ten needs a sum above ten; round (up to the next ten, then take the
    difference away) needs the rounded number (b at levels 2 and 5, a at 3 and 4) to end in 5-9."""
    rounded = operands[1] if level in (2, 5) else operands[0]
    return tuple(s for s in STRATEGIES[level]
                 if not (s == "make_ten" and sum(operands) <= 10) and not (s == "round" and rounded % 10 < 5))


def make_problem(level: int, operands, split: str, index: int) -> ArithmeticProblem:
    a, b = operands[:2]
    answer = {1: a + b, 2: a + b, 3: a * b, 4: a * b + operands[-1], 5: a * b}[level]
    problem = ArithmeticProblem(f"arith-L{level}-{split}-{index:03d}", level, split,
                                f"What is {expression(level, operands)}?", tuple(operands), answer, {})
    return dataclasses.replace(problem, solutions={s: solve(problem, s) for s in strategies(level, operands)})


class _Work:
    """Collects a solution's sentences; `calc` computes one step, adding `slip` = (step, delta) at that step."""

    def __init__(self, slip=None):
        self.lines, self.values, self.slip = [], [], slip

    def calc(self, x: int, symbol: str, y: int) -> int:
        value = {"+": x + y, "-": x - y, "*": x * y}[symbol]
        if self.slip is not None and self.slip[0] == len(self.values):
            value += self.slip[1]
        self.values.append(value)
        self.lines.append(f"{x} {symbol} {y} = {value}.")
        return value


def _work(problem: ArithmeticProblem, strategy: str, slip=None) -> tuple[_Work, int]:
    level, (a, b), work = problem.level, problem.operands[:2], _Work(slip)
    tens_a, ones_a, tens_b, ones_b = a // 10 * 10, a % 10, b // 10 * 10, b % 10
    if strategy == "direct":
        value = work.calc(a, "+" if level <= 2 else "*", b)
    elif strategy == "count":
        big, small = max(a, b), min(a, b)
        value = big + small
        counted = ", ".join(str(big + i) for i in range(1, small + 1))
        work.lines.append(f"Start at {big} and count up {small}: {counted}.")
    elif strategy == "make_ten":
        big, small = max(a, b), min(a, b)
        work.lines.append(f"{small} is {10 - big} + {small - (10 - big)}.")
        value = work.calc(work.calc(big, "+", 10 - big), "+", small - (10 - big))
    elif strategy == "split" and level == 2:
        value = work.calc(work.calc(tens_a, "+", tens_b), "+", work.calc(ones_a, "+", ones_b))
    elif strategy == "split" and level in (3, 4):
        value = work.calc(work.calc(tens_a, "*", b), "+", work.calc(ones_a, "*", b))
    elif strategy == "split" and level == 5:
        parts = [work.calc(x, "*", y) for x in (tens_a, ones_a) for y in (tens_b, ones_b)]
        value = parts[0]
        for part in parts[1:]:
            value = work.calc(value, "+", part)
    elif strategy == "round" and level == 2:
        up = tens_b + 10
        work.lines.append(f"{b} is {up} - {up - b}.")
        value = work.calc(work.calc(a, "+", up), "-", up - b)
    elif strategy == "round" and level in (3, 4):
        up = tens_a + 10
        work.lines.append(f"{a} is {up} - {up - a}.")
        value = work.calc(work.calc(up, "*", b), "-", work.calc(up - a, "*", b))
    elif strategy == "round" and level == 5:
        up = tens_b + 10
        work.lines.append(f"{b} is {up} - {up - b}.")
        value = work.calc(work.calc(a, "*", up), "-", work.calc(a, "*", up - b))
    else:
        raise ValueError(f"solve: no strategy {strategy!r} at level {level}")
    if level == 4:
        value = work.calc(value, "+", problem.operands[2])
    return work, value


def solve(problem: ArithmeticProblem, strategy: str, slip=None) -> str:
    """Step-by-step solution ending '#### N'; slip = (step, delta) makes that step's result off by delta,
    and every later step uses the wrong value, as a person who slipped would."""
    work, value = _work(problem, strategy, slip)
    return " ".join(work.lines) + f" #### {value}"


def slipped_solution(problem: ArithmeticProblem, strategy: str, rng: random.Random) -> str:
    """A solution with one wrong step (off by 1, 2 or 10, never below zero), hence a wrong final answer."""
    work, _ = _work(problem, strategy)
    step = rng.randrange(len(work.values))
    delta = rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if work.values[step] + d >= 0])
    return solve(problem, strategy, (step, delta))


def extract_answer(text: str) -> int | None:
    """The number after the last '####' (commas allowed), or None when there is none."""
    found = _FINAL_ANSWER.findall(text)
    return int(found[-1].replace(",", "")) if found else None


def check_answer(problem: ArithmeticProblem, text: str) -> bool:
    """Whether the text's final answer ('#### N', the last one) is the problem's answer."""
    return extract_answer(text) == problem.answer


def _two_digits(rng: random.Random) -> int:
    return rng.choice([x for x in range(11, 100) if x % 10])


def draw_operands(level: int, rng: random.Random) -> tuple[int, ...]:
    """Two-digit operands are never multiples of ten, so split always has a ones part to multiply or add."""
    if level == 1:
        return rng.randint(1, 9), rng.randint(1, 9)
    if level == 2:
        return _two_digits(rng), _two_digits(rng)
    if level == 3:
        return _two_digits(rng), rng.randint(2, 9)
    if level == 4:
        return _two_digits(rng), rng.randint(2, 9), _two_digits(rng)
    return _two_digits(rng), _two_digits(rng)


def arithmetic_problems(rng: random.Random, n_test: int = 32, n_train: int = 16, n_sft: int = 400):
    """Per level: n_test distinct held-out problems; n_train distinct others with preference pairs; and n_sft
    SFT problems drawn (with repeats) from everything but the held-out ones. -> (problems, sft problems)."""
    problems, sft = [], []
    for level in LEVELS:
        held_out, train = [], []
        while len(held_out) < n_test:
            operands = draw_operands(level, rng)
            if operands not in held_out:
                held_out.append(operands)
        while len(train) < n_train:
            operands = draw_operands(level, rng)
            if operands not in held_out and operands not in train:
                train.append(operands)
        problems += [make_problem(level, ops, "test", i) for i, ops in enumerate(held_out)]
        problems += [make_problem(level, ops, "train", i) for i, ops in enumerate(train)]
        level_sft = []
        while len(level_sft) < n_sft:
            operands = draw_operands(level, rng)
            if operands not in held_out:
                level_sft.append(make_problem(level, operands, "sft", len(level_sft)))
        sft += level_sft
    return problems, sft


def arithmetic_sft(sft_problems, rng: random.Random) -> list[dict]:
    """One solution per problem, its strategy drawn from the reference weights."""
    records = []
    for problem in sft_problems:
        names = list(problem.solutions)
        strategy = rng.choices(names, [REFERENCE_STRATEGY[s] for s in names])[0]
        records.append({"prompt": problem.prompt, "response": problem.solutions[strategy]})
    return records


def arithmetic_groups(problems, rng: random.Random) -> list[PreferenceGroup]:
    """Per training problem: each strategy's correct solution and one slipped solution (the direct strategy's
    at level 5, a random one's elsewhere), p ∝ strategy weight, times SLIP_WEIGHT for the slipped one."""
    groups = []
    for problem in problems:
        if problem.split != "train":
            continue
        names = list(problem.solutions)
        slipped = "direct" if problem.level == 5 else rng.choice([s for s in names if s != "count"])
        candidates = tuple(problem.solutions.values()) + (slipped_solution(problem, slipped, rng),)
        weights = [POPULATION_STRATEGY[s] for s in names] + [POPULATION_STRATEGY[slipped] * SLIP_WEIGHT[problem.level]]
        groups.append(PreferenceGroup(problem.id, problem.prompt, candidates, tuple(w / sum(weights) for w in weights)))
    return groups


def arithmetic_model_sft(problems, rng: random.Random, per_level: dict) -> list[dict]:
    """SFT records for the arithmetic reference model (data/world/build.py `--train-arithmetic-model`):
    per_level[level] fresh problems per level, operands drawn as for the world (with repeats) but never those of
    a held-out problem of `problems`; each solved by a strategy drawn from the reference weights, as in
    `arithmetic_sft`. The records are shuffled, so every batch mixes the levels."""
    drawn = [make_problem(level, operands, "sft", index)
             for index, (level, operands) in enumerate(model_sft_operands(problems, rng, per_level))]
    records = arithmetic_sft(drawn, rng)
    rng.shuffle(records)
    return records


def model_sft_operands(problems, rng: random.Random, per_level: dict) -> list[tuple[int, tuple[int, ...]]]:
    """(level, operands) of the arithmetic model's SFT problems, in order: the draws of `arithmetic_model_sft`
    (which takes nothing else from rng before its strategies), so the best-of-N experiment can keep its fresh
    problems clear of everything the model was trained on without building 23,000 solutions."""
    held_out = {(p.level, tuple(p.operands)) for p in problems if p.split == "test"}
    drawn = []
    for level in LEVELS:
        count = 0
        while count < per_level.get(level, 0):
            operands = draw_operands(level, rng)
            if (level, operands) not in held_out:
                drawn.append((level, operands))
                count += 1
    return drawn


def sampled_arithmetic_groups(problems, samples: dict, incorrect_weight: float = SLIP_WEIGHT[1]) -> list:
    """Correct against incorrect, as a verifier would judge, for the arithmetic model's preference pairs: per
    training problem, its correct solutions in every strategy and the distinct texts the model sampled for it
    (samples: problem id -> texts), p ∝ 1 for a correct final answer and incorrect_weight for a wrong or missing
    one; so raters prefer a correct solution with probability 1 / (1 + incorrect_weight) and are indifferent
    between two correct (or two wrong) ones."""
    groups = []
    for problem in problems:
        if problem.split != "train":
            continue
        candidates = list(dict.fromkeys([*problem.solutions.values(), *samples.get(problem.id, ())]))
        weights = [1.0 if check_answer(problem, text) else incorrect_weight for text in candidates]
        groups.append(PreferenceGroup(problem.id, problem.prompt, tuple(candidates),
                                      tuple(w / sum(weights) for w in weights)))
    return groups
