"""The arithmetic reference model's SFT text (data/world/arithmetic.py `arithmetic_model_sft`) and the shipped
model (data/world/arithmetic_model/, built by `python -m data.world.build --train-arithmetic-model`).

Oracles: each record's prompt parsed with a regex written here and its answer computed with Python's own
arithmetic (not the world's solver); the world's held-out prompts; the build's own constants and the world's
tokenizer file, byte for byte.
"""
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from data.world.build import ARITHMETIC_CONFIG, ARITHMETIC_PAIRS, ARITHMETIC_SFT_PER_LEVEL
from data.world import load_world
from data.world.arithmetic import ARITHMETIC_MODEL_DIR, arithmetic_model_sft, sampled_arithmetic_groups

PROMPT = re.compile(r"What is (\d+) ([+*]) (\d+)(?: \+ (\d+))?\?")
ANSWER = re.compile(r"#### (\d+)$")


def level_and_answer(prompt: str) -> tuple[int, int]:
    """The level by the operands' shapes (LEVELS) and the value of the expression."""
    a, op, b, c = PROMPT.fullmatch(prompt).groups()
    a, b = int(a), int(b)
    if c is not None:
        return 4, a * b + int(c)
    if op == "+":
        return (1 if a < 10 else 2), a + b
    return (3 if b < 10 else 5), a * b


@pytest.fixture(scope="module")
def world():
    return load_world()


def test_sft_text_counts_answers_and_held_out_problems(world):
    per_level = {1: 30, 2: 20, 3: 20, 4: 10, 5: 5}
    records = arithmetic_model_sft(world.arithmetic, random.Random("test"), per_level)
    levels = Counter()
    held_out = {p.prompt for p in world.arithmetic if p.split == "test"}
    for record in records:
        level, answer = level_and_answer(record["prompt"])
        levels[level] += 1
        assert int(ANSWER.search(record["response"]).group(1)) == answer  # a correct solution
        assert record["prompt"] not in held_out
    assert dict(levels) == per_level
    assert records == arithmetic_model_sft(world.arithmetic, random.Random("test"), per_level)  # seeded
    assert [r["prompt"] for r in records] != sorted(r["prompt"] for r in records)  # shuffled, levels mixed


def test_shipped_model_is_the_built_configuration_with_the_worlds_tokenizer(world):
    config = json.loads((ARITHMETIC_MODEL_DIR / "config.json").read_text(encoding="utf-8"))
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "max_position_embeddings"):
        assert config[key] == ARITHMETIC_CONFIG[key], key
    assert (ARITHMETIC_MODEL_DIR / "tokenizer.model").read_bytes() == world.files["tokenizer"].read_bytes()
    assert (ARITHMETIC_MODEL_DIR / "model.safetensors").stat().st_size < 6_000_000  # a few MB in the repository
    assert sum(ARITHMETIC_SFT_PER_LEVEL.values()) > 0 and set(ARITHMETIC_SFT_PER_LEVEL) == {1, 2, 3, 4, 5}


def test_sampled_groups_by_hand(world):
    """One training problem: its correct solutions, then the samples not already among them, in order; weights
    1 (correct) and 0.05 (wrong or no answer), normalised: with two correct solutions, two distinct wrong samples
    and one repeat of a correct solution, p = (1, 1, 0.05, 0.05) / 2.1."""
    problem = next(p for p in world.arithmetic if p.split == "train" and p.level == 2 and len(p.solutions) == 2)
    right = list(problem.solutions.values())
    wrong = [f"#### {problem.answer + 1}", "no answer"]
    groups = sampled_arithmetic_groups([problem], {problem.id: [wrong[0], right[1], wrong[1], wrong[0]]})
    assert len(groups) == 1 and groups[0].candidates == (*right, *wrong)
    assert groups[0].population == pytest.approx((1 / 2.1, 1 / 2.1, 0.05 / 2.1, 0.05 / 2.1), abs=1e-15)
    held_out = next(p for p in world.arithmetic if p.split == "test")
    assert sampled_arithmetic_groups([held_out], {}) == []  # held-out problems never get pairs


def test_committed_pairs_are_correct_against_incorrect(world):
    """Every pair in the shipped file: a training problem's prompt, a chosen text whose final answer is right and
    a rejected one whose is not (oracle: the regex and Python's arithmetic above), chosen_prob 1 / 1.05."""
    lines = (ARITHMETIC_MODEL_DIR.parent / ARITHMETIC_PAIRS).read_text(encoding="utf-8").splitlines()
    train = {p.prompt for p in world.arithmetic if p.split == "train"}
    levels = Counter()
    for record in map(json.loads, lines):
        level, answer = level_and_answer(record["prompt"])
        levels[level] += 1
        assert record["prompt"] in train
        found = [ANSWER.search(record[key]) for key in ("chosen", "rejected")]
        assert found[0] and int(found[0].group(1)) == answer
        assert not (found[1] and int(found[1].group(1)) == answer)
        assert record["chosen_prob"] == pytest.approx(1 / 1.05, abs=1e-12)
    assert set(levels) == {1, 2, 3, 4, 5}
