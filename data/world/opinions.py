"""The world's opinion questions: a few short answers each, a population distribution p over them (the paper's
intro example among them) and a different `reference` distribution that the SFT text follows, so the reference
model learns pi_ref != p and the SPL optimum pi ∝ pi_ref^(beta/alpha) p^(1/alpha) (Prop. 3.2, Prop. A.1) depends
on beta/alpha.
"""
from __future__ import annotations

import dataclasses

from data.world.pairs import PreferenceGroup, apportion


@dataclasses.dataclass(frozen=True)
class OpinionQuestion:
    id: str
    prompt: str
    options: tuple[str, ...]
    population: tuple[float, ...]  # the raters' distribution p: Bradley-Terry rewards r = log p
    reference: tuple[float, ...]  # the SFT text's distribution (what pi_ref is trained towards)


# (prompt, ((option, population, reference), ...)). Populations go from near-uniform to strongly skewed, with
# max/min <= 19 so that no pair is unanimous at K = 20 (a unanimous pair has no finite optimum).
OPINIONS = (
    ("The best way to reduce income inequality is:", (
        ("Increase minimum wage", .55, .25), ("Expand access to education and job training", .20, .40),
        ("Implement universal basic income", .15, .20),
        ("Lower taxes on the wealthy to stimulate job creation", .10, .15))),
    ("The most important quality in a friend is:", (
        ("Loyalty", .35, .20), ("Honesty", .30, .45), ("Kindness", .20, .15), ("A sense of humor", .15, .20))),
    ("The best pet for a family is:", (
        ("A dog", .45, .25), ("A cat", .30, .20), ("A fish", .15, .40), ("A rabbit", .10, .15))),
    ("The best season of the year is:", (
        ("Summer", .28, .55), ("Autumn", .26, .10), ("Spring", .24, .25), ("Winter", .22, .10))),
    ("The best way to spend a free evening is:", (
        ("Read a book", .26, .10), ("Watch a movie", .25, .50), ("Cook a nice dinner", .25, .15),
        ("Go for a walk", .24, .25))),
    ("The most important subject in school is:", (
        ("Mathematics", .40, .25), ("Reading and writing", .35, .20), ("Science", .15, .40), ("History", .10, .15))),
    ("Cities should invest most in:", (
        ("Public transport", .50, .20), ("Affordable housing", .25, .35), ("Parks and green spaces", .20, .15),
        ("New roads", .05, .30))),
    ("The best breakfast is:", (
        ("Eggs and toast", .30, .15), ("Oatmeal with fruit", .25, .40), ("Pancakes", .25, .35), ("Yogurt", .20, .10))),
    ("The best way to learn a new language is:", (
        ("Living where it is spoken", .60, .30), ("Taking classes", .20, .35), ("Using an app", .15, .25),
        ("Watching films", .05, .10))),
    ("The most useful invention is:", (
        ("The internet", .50, .25), ("Electricity", .25, .35), ("The printing press", .25, .40))),
    ("Children should start school at age:", (("Five", .45, .20), ("Six", .35, .50), ("Seven", .20, .30))),
    ("The best way to stay healthy is:", (
        ("Exercise every day", .40, .20), ("Eat more vegetables", .30, .20), ("Sleep eight hours", .20, .45),
        ("Drink more water", .10, .15))),
    ("Space exploration should be paid for by:", (
        ("Governments", .50, .20), ("Private companies", .30, .55), ("International partnerships", .20, .25))),
    ("The best kind of vacation is:", (
        ("A week at the beach", .34, .60), ("A trip to the mountains", .33, .25), ("A tour of a big city", .33, .15))),
    ("The most important job of a government is:", (
        ("Keeping people safe", .45, .25), ("Providing health care", .25, .15), ("Protecting freedom", .20, .25),
        ("Building a strong economy", .10, .35))),
    ("The best way to deal with stress is:", (
        ("Talk to a friend", .35, .15), ("Exercise", .30, .20), ("Meditate", .20, .35), ("Take a long nap", .10, .10),
        ("Listen to music", .05, .20))),
    ("Homework for young children should be:", (
        ("Limited to a few minutes", .50, .30), ("Banned entirely", .30, .10), ("Given every day", .20, .60))),
    ("The best music to work to is:", (
        ("Classical music", .40, .15), ("No music at all", .30, .25), ("Pop music", .20, .45), ("Jazz", .10, .15))),
    ("The best age to retire is:", (
        ("Sixty five", .45, .20), ("Sixty", .25, .35), ("Seventy", .20, .15), ("Whenever you want", .10, .30))),
    ("The most important thing in a job is:", (
        ("Good pay", .60, .30), ("Interesting work", .20, .35), ("Kind coworkers", .15, .25),
        ("A short commute", .05, .10))),
    ("The best way to travel between cities is:", (
        ("By train", .40, .20), ("By car", .35, .20), ("By plane", .20, .50), ("By bus", .05, .10))),
    ("Elections should be held on:", (
        ("A weekend", .55, .30), ("A national holiday", .35, .20), ("A regular weekday", .10, .50))),
    ("The best way to reduce traffic is:", (
        ("Better public transport", .50, .25), ("More bike lanes", .25, .15), ("Tolls on busy roads", .15, .30),
        ("Wider roads", .10, .30))),
    ("The best time to exercise is:", (
        ("In the evening", .35, .15), ("In the morning", .30, .50), ("Whenever you can", .25, .20),
        ("At lunch", .10, .15))),
    ("The best way to learn history is:", (
        ("Visiting museums", .35, .15), ("Watching documentaries", .30, .20), ("Reading books", .25, .45),
        ("Talking to older people", .10, .20))),
    ("The most important skill for the future is:", (
        ("Critical thinking", .50, .15), ("Programming", .25, .45), ("Communication", .15, .20),
        ("Creativity", .10, .20))),
    ("The best way to save money is:", (
        ("Make a budget", .45, .20), ("Cook at home", .25, .20), ("Buy used things", .15, .30),
        ("Avoid credit cards", .15, .30))),
    ("The best drink with dinner is:", (
        ("Water", .80, .40), ("Juice", .08, .20), ("Tea", .07, .30), ("Soda", .05, .10))),
    ("The safest place to keep savings is:", (
        ("A bank", .78, .45), ("A safe at home", .10, .25), ("Gold coins", .07, .15),
        ("Under the mattress", .05, .15))),
    ("The best way to start the day is:", (
        ("A cup of coffee", .24, .50), ("A morning walk", .22, .10), ("A big breakfast", .20, .15),
        ("Stretching", .18, .15), ("Reading the news", .16, .10))),
)


def opinion_questions() -> list[OpinionQuestion]:
    return [OpinionQuestion(f"opinion-{index:02d}", prompt, tuple(o for o, _, _ in rows),
                            tuple(p for _, p, _ in rows), tuple(r for _, _, r in rows))
            for index, (prompt, rows) in enumerate(OPINIONS)]


def opinion_sft(questions, per_question: int = 100) -> list[dict]:
    """Each question answered `per_question` times, each option in exact proportion to the reference."""
    return [{"prompt": q.prompt, "response": option}
            for q in questions for option, count in zip(q.options, apportion(q.reference, per_question))
            for _ in range(count)]


def opinion_groups(questions) -> list[PreferenceGroup]:
    return [PreferenceGroup(q.id, q.prompt, q.options, q.population) for q in questions]
