"""More multiple-choice items for the calibration experiment: the world's kind of question about towns it never named.

The world's 48 items (data/world/mcq.py) are all its reference model knows, and a third of them held out is too few
for an interval. The calibration experiment (eval/experiments/calibration.py) builds its own base instead: the world's
reference fine-tuned on the answers to these items, as the paper's base model is Mistral-7B after SFT, and then
trains preferences on half of them and scores all. The items follow the law of the world's own: the question and the
four options drawn from data/world/mcq.py's topics, the raters' top belief uniform in [0.3, 0.9], the other three
shares of the rest in proportions drawn uniformly in [0.2, 1] (each at least 0.02 and below the top), the true letter
drawn from the beliefs (so they are calibrated by construction), and the SFT text answering with p^(1/2) normalised
(data/world/mcq.py mcq_sft: hedging writers). Only the towns are new, so no item repeats a question the world's
reference was trained on.
"""
from __future__ import annotations

import math
import random

from data.world.mcq import LETTERS, MCQ_TOPICS, MultipleChoiceItem, mcq_prompt

CALIBRATION_TOWNS = ("Alderbury", "Bramblecote", "Cedarvale", "Dunmore", "Eastwick", "Fernleigh", "Glenrock",
                     "Harrowgate", "Ivybridge", "Juniper Bay", "Kestrelton", "Larkspur", "Meadowfield", "Netherby",
                     "Oldcastle", "Primrose Hill", "Quarrydale", "Redcliff", "Saltmarsh", "Thornbury", "Upwell",
                     "Violet Creek", "Westbrook", "Yarrowby", "Zephyr Point", "Birchmoor", "Copperfield",
                     "Driftwood", "Emberton", "Foxhollow", "Gullhaven", "Heatherly")
MAX_ITEMS = len(MCQ_TOPICS) * len(CALIBRATION_TOWNS)  # one item per (topic, town): 128


def draw_beliefs(rng: random.Random, options: int = len(LETTERS)) -> list[float]:
    """The raters' beliefs over the options, the law of data/world/mcq.py: top ~ U(0.3, 0.9); the others share
    1 - top in proportions ~ U(0.2, 1), redrawn until each is >= 0.02 and below the top; then shuffled."""
    top = rng.uniform(0.3, 0.9)
    rest = [0.0]
    while max(rest) >= top or min(rest) < 0.02:
        weights = [rng.uniform(0.2, 1.0) for _ in range(options - 1)]
        rest = [(1.0 - top) * w / sum(weights) for w in weights]
    beliefs = [top, *rest]
    rng.shuffle(beliefs)
    return beliefs


def hedged(beliefs) -> tuple[float, ...]:
    """What the SFT text answers with: p^(1/2) normalised."""
    roots = [math.sqrt(b) for b in beliefs]
    return tuple(r / sum(roots) for r in roots)


def calibration_items(rng: random.Random, n_items: int = 96) -> list[MultipleChoiceItem]:
    """n_items distinct (topic, town) questions in a random order, ids cal-00, cal-01, ..."""
    if not (isinstance(n_items, int) and 1 <= n_items <= MAX_ITEMS):
        raise ValueError(f"calibration_items: n_items must be an integer in 1..{MAX_ITEMS}, got {n_items!r}")
    questions = rng.sample([(topic, town) for topic in range(len(MCQ_TOPICS)) for town in CALIBRATION_TOWNS], n_items)
    items = []
    for index, (topic, town) in enumerate(questions):
        template, values = MCQ_TOPICS[topic]
        options = tuple(rng.sample(values, len(LETTERS)))
        beliefs, question = draw_beliefs(rng), template.format(town=town)
        items.append(MultipleChoiceItem(
            id=f"cal-{index:02d}", question=question, options=options,
            correct=LETTERS[rng.choices(range(len(LETTERS)), beliefs)[0]], population=tuple(beliefs),
            reference=hedged(beliefs), prompt=mcq_prompt(question, options)))
    return items
