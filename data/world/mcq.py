"""The world's multiple-choice questions in the Appendix D prompt format, with uncertain raters (Section 4.3).
"""
from __future__ import annotations

import dataclasses
import math
import random

from data.world.pairs import PreferenceGroup, apportion


MCQ_HEADER = ("Please answer the following multiple choice question. "
              "Start your answer with the capital letter corresponding to your choice:")
MCQ_TOPICS = (
    ("Which animal is the symbol of {town}?", ("Fox", "Owl", "Bear", "Deer", "Swan", "Wolf", "Horse", "Eagle")),
    ("What color are the doors in {town}?", ("Red", "Blue", "Green", "Yellow", "White", "Black", "Orange", "Purple")),
    ("Which fruit grows best near {town}?", ("Apples", "Pears", "Plums", "Cherries", "Grapes", "Figs", "Lemons",
                                             "Peaches")),
    ("Which sport is most popular in {town}?", ("Soccer", "Tennis", "Rowing", "Cycling", "Running", "Swimming",
                                                "Basketball", "Hockey")),
)
TOWNS = ("Oakridge", "Riverton", "Millbrook", "Stonefield", "Ashford", "Brightwater", "Clearview", "Elmwood",
         "Fairhaven", "Greenhill", "Hollowell", "Kingsport", "Lakeside", "Maplewood", "Northgate", "Pinecrest")
LETTERS = "ABCD"


@dataclasses.dataclass(frozen=True)
class MultipleChoiceItem:
    id: str
    question: str
    options: tuple[str, ...]  # four, lettered A-D
    correct: str  # the true letter, drawn from the population's beliefs (so p is calibrated by construction)
    population: tuple[float, ...]  # the raters' beliefs over the options: Bradley-Terry rewards r = log p
    reference: tuple[float, ...]  # the SFT text's answers: p^(1/2) normalised (hedging writers)
    prompt: str  # the Appendix D prompt


def mcq_prompt(question: str, options) -> str:
    """The paper's Appendix D multiple-choice prompt."""
    choices = [f"{letter}. {option}" for letter, option in zip(LETTERS, options)]
    return "\n".join([MCQ_HEADER, "", question, "", "Answer choices:", *choices, "", "Your answer:"])


def mcq_items(rng: random.Random, n_items: int = 48) -> list[MultipleChoiceItem]:
    """Questions about made-up towns. The raters' top belief ranges over [0.3, 0.9]; the truth is drawn from
    their beliefs, so a policy equal to p is calibrated and one that collapses onto the mode is overconfident."""
    items = []
    pairs = rng.sample([(t, town) for t in range(len(MCQ_TOPICS)) for town in TOWNS], n_items)
    for index, (topic, town) in enumerate(pairs):
        template, values = MCQ_TOPICS[topic]
        options = tuple(rng.sample(values, len(LETTERS)))
        top = rng.uniform(0.3, 0.9)
        while True:
            rest = [rng.uniform(0.2, 1.0) for _ in range(len(LETTERS) - 1)]
            rest = [(1.0 - top) * r / sum(rest) for r in rest]
            if max(rest) < top and min(rest) >= 0.02:
                break
        population = [top] + rest
        rng.shuffle(population)
        reference = [math.sqrt(p) for p in population]
        reference = tuple(r / sum(reference) for r in reference)
        correct = LETTERS[rng.choices(range(len(LETTERS)), population)[0]]
        question = template.format(town=town)
        items.append(MultipleChoiceItem(f"mcq-{index:02d}", question, options, correct, tuple(population), reference,
                                        mcq_prompt(question, options)))
    return items


def mcq_sft(items, per_item: int = 10) -> list[dict]:
    """Each item answered `per_item` times, letters in proportion to the reference (to the nearest 1/per_item:
    the prompts are long and the answer is one token, so this part of the SFT text is kept small)."""
    return [{"prompt": item.prompt, "response": letter} for item in items
            for letter, count in zip(LETTERS, apportion(item.reference, per_item)) for _ in range(count)]


def mcq_groups(items) -> list[PreferenceGroup]:
    return [PreferenceGroup(item.id, item.prompt, tuple(LETTERS), item.population) for item in items]
