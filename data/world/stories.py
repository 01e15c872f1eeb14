"""The world's stories: templated stories (name, gender, relation, profession), the population's preferences
over their attributes, and `validate_story`, the paper's Figure 1 features and aberrations.
"""
from __future__ import annotations

import dataclasses
import random
import re

from data.world.pairs import PreferenceGroup


STORY_PROMPT = "Write a short story about a {profession}."
PROFESSIONS = {"doctor": "took care of", "teacher": "taught", "farmer": "grew apples for",
               "pilot": "flew a small plane with", "baker": "baked bread for", "painter": "painted a picture of"}
NAMES = {"Maya": "female", "Sara": "female", "Lena": "female", "Nora": "female",
         "James": "male", "Omar": "male", "Leo": "male", "Tom": "male"}
SURNAMES = ("Chen", "Smith", "Garcia", "Kim", "Patel", "Brown")
RELATIONS = {"mother": "female", "father": "male", "sister": "female", "brother": "male",
             "daughter": "female", "son": "male"}
PLACES = ("a small town", "a big city", "a quiet village", "a town by the sea")
TIMES = ("every day", "every morning", "every weekend")
ENDINGS = ("{Kin} said that {subj} was the best {profession} in the world.",
           "In the end, {name} was happy, and so was {poss} {relation}.",
           "{Kin} was very proud of {obj}.")
PRONOUNS = {"female": {"subj": "she", "obj": "her", "poss": "her"},
            "male": {"subj": "he", "obj": "him", "poss": "his"}}
# Preference profiles, assigned to names / relations in a random order per profession: population p (ratio
# max/min 10 and 7) and the SFT text's flatter reference. Place, time, surname and ending are uniform in both.
NAME_POPULATION = (.30, .20, .15, .11, .09, .07, .05, .03)
NAME_REFERENCE = (.18, .16, .14, .12, .11, .10, .10, .09)
RELATION_POPULATION = (.35, .25, .15, .12, .08, .05)
RELATION_REFERENCE = (.24, .20, .17, .15, .13, .11)
ABERRATION_PREFERENCE = 0.95  # P(well-formed story > its corrupted copy)
CORRUPTIONS = ("pronoun", "nonword", "repeat", "swap", "truncate", "profession")


@dataclasses.dataclass(frozen=True)
class StoryAttributes:
    name: str
    surname: str
    profession: str
    place: str
    relation: str
    time: str
    ending: int  # index into ENDINGS

    @property
    def gender(self) -> str:
        return NAMES[self.name]


@dataclasses.dataclass(frozen=True)
class StoryCheck:
    """validate_story's verdict. Attributes are extracted leniently (None when absent or not a known value),
    so an aberrant story still reports its name or relation; `valid` is the strict verdict."""
    valid: bool
    reason: str  # "" when valid, else what is wrong
    name: str | None
    surname: str | None
    gender: str | None  # from the hero's pronoun ("She" / "He" opening the second sentence)
    relation: str | None
    profession: str | None  # the one the story names (the prompt's when valid)


@dataclasses.dataclass(frozen=True)
class StorySpec:
    prompts: dict  # profession -> prompt
    population: dict  # "name" | "relation" -> profession -> value -> p
    reference: dict  # same layout: the SFT text's distribution
    aberration_preference: float


def story_prompt(profession: str) -> str:
    return STORY_PROMPT.format(profession=profession)


def render_story(a: StoryAttributes) -> str:
    """The one well-formed text for a set of attributes:
    '<Name> <Surname> was a <profession> in <place>. <She|He> <act> <her|his> <relation> <time>. <ending>'."""
    hero, kin = PRONOUNS[NAMES[a.name]], PRONOUNS[RELATIONS[a.relation]]
    ending = ENDINGS[a.ending].format(Kin=kin["subj"].capitalize(), name=a.name, profession=a.profession,
                                      relation=a.relation, **hero)
    return (f"{a.name} {a.surname} was a {a.profession} in {a.place}. "
            f"{hero['subj'].capitalize()} {PROFESSIONS[a.profession]} {hero['poss']} {a.relation} {a.time}. {ending}")


_STORY_PROMPT = re.compile(r"Write a short story about an? (\w+)\.")
_STORY_SHAPE = re.compile(r"(?P<name>\S+) (?P<surname>\S+) was a (?P<profession>\S+) in (?P<place>[^.]+)\. "
                          r"\S+ .*? (?:her|his) (?P<relation>\S+) (?P<time>every \S+)\. [^.]+\.")


def validate_story(prompt: str, text: str) -> StoryCheck:
    """Whether `text` is a well-formed story for `prompt`, and the attributes it uses.

    Well-formed means: equal (after stripping surrounding whitespace) to render_story of some attributes whose
    profession is the prompt's. That one rule catches every aberration: an unknown word, a pronoun that does not
    match the name's or the relative's gender, another profession's act, a repeated, missing or swapped word."""
    match = _STORY_PROMPT.fullmatch(prompt.strip())
    if not match or match.group(1) not in PROFESSIONS:
        raise ValueError(f"validate_story: prompt {prompt!r} is not a story prompt "
                         f"({STORY_PROMPT!r} with a profession in {sorted(PROFESSIONS)})")
    asked = match.group(1)
    text = text.strip()
    first = re.match(r"(\w+) (\w+) was an? (\w+)\b", text)
    subject = re.search(r"\.\s+(She|He)\b", text)
    relation = re.search(r"\b(?:her|his) (\w+)\b", text)
    check = dict(name=first and _known(first.group(1), NAMES), surname=first and _known(first.group(2), SURNAMES),
                 profession=first and _known(first.group(3), PROFESSIONS),
                 gender=subject and {"She": "female", "He": "male"}[subject.group(1)],
                 relation=relation and _known(relation.group(1), RELATIONS))
    reason = _story_error(asked, text)
    return StoryCheck(valid=not reason, reason=reason, **check)


def _known(value, vocabulary):
    return value if value in vocabulary else None


def _story_error(asked: str, text: str) -> str:
    shape = _STORY_SHAPE.fullmatch(text)
    if not shape:
        return "does not follow the story template"
    for field, vocabulary in (("name", NAMES), ("surname", SURNAMES), ("profession", PROFESSIONS),
                              ("place", PLACES), ("relation", RELATIONS), ("time", TIMES)):
        if shape.group(field) not in vocabulary:
            return f"unknown {field} {shape.group(field)!r}"
    if shape.group("profession") != asked:
        return f"the story is about a {shape.group('profession')}, the prompt asks for a {asked}"
    renders = [render_story(StoryAttributes(*shape.group("name", "surname", "profession", "place", "relation",
                                                         "time"), ending)) for ending in range(len(ENDINGS))]
    if text in renders:
        return ""
    words = text.split(" ")
    closest = max(renders, key=lambda r: _common_prefix(r.split(" "), words)).split(" ")
    at = _common_prefix(closest, words)
    if at == len(words):
        return f"ends early, after word {at}"
    if at == len(closest):
        return f"goes on after the story ends at word {at}"
    return f"word {at + 1}: expected {closest[at]!r}, got {words[at]!r}"


def _common_prefix(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def corrupt_story(text: str, kind: str, rng: random.Random) -> str:
    """An aberrant copy of a well-formed story, the kinds of damage token-level temperature does (Figure 1):
    pronoun (the hero's gender flips once), nonword (a letter inside a word changes), repeat (a word doubles),
    swap (two neighbouring words trade places), truncate (cut inside the last sentence), profession (another
    profession's name with this one's act)."""
    words = text.split(" ")
    if kind == "pronoun":
        at = next(i for i, w in enumerate(words) if w in ("She", "He"))
        words[at] = {"She": "He", "He": "She"}[words[at]]
    elif kind == "nonword":
        at = rng.choice([i for i, w in enumerate(words) if len(w.strip(".,")) >= 4])
        word = words[at]
        letter = rng.randrange(1, len(word.strip(".,")) - 1)
        new = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != word[letter].lower()])
        words[at] = word[:letter] + new + word[letter + 1:]
    elif kind == "repeat":
        at = rng.randrange(len(words))
        words.insert(at, words[at])
    elif kind == "swap":
        at = rng.choice([i for i in range(len(words) - 1) if words[i] != words[i + 1]])
        words[at], words[at + 1] = words[at + 1], words[at]
    elif kind == "truncate":
        last = max(i for i, w in enumerate(words[:-1]) if w.endswith("."))  # the last sentence starts after it
        words = words[:rng.randrange(last + 2, len(words))]
    elif kind == "profession":
        words[4] = rng.choice([p for p in PROFESSIONS if p != words[4]])
    else:
        raise ValueError(f"corrupt_story: kind must be one of {CORRUPTIONS}, got {kind!r}")
    return " ".join(words)


def story_spec(rng: random.Random) -> StorySpec:
    """Per profession, the population and reference profiles in two random orders (redrawn until their total
    variation distance is at least 0.15, so the reference really differs from the population)."""
    population, reference = {"name": {}, "relation": {}}, {"name": {}, "relation": {}}
    for attribute, values, pop_profile, ref_profile in (("name", list(NAMES), NAME_POPULATION, NAME_REFERENCE),
                                                        ("relation", list(RELATIONS), RELATION_POPULATION,
                                                         RELATION_REFERENCE)):
        for profession in PROFESSIONS:
            pop = dict(zip(rng.sample(values, len(values)), pop_profile))
            while True:
                ref = dict(zip(rng.sample(values, len(values)), ref_profile))
                if 0.5 * sum(abs(pop[v] - ref[v]) for v in values) >= 0.15:
                    break
            population[attribute][profession] = {v: pop[v] for v in values}
            reference[attribute][profession] = {v: ref[v] for v in values}
    return StorySpec({p: story_prompt(p) for p in PROFESSIONS}, population, reference, ABERRATION_PREFERENCE)


def sample_story(spec: StorySpec, profession: str, rng: random.Random, distribution: str = "reference",
                 **fixed) -> StoryAttributes:
    """Attributes drawn from the spec's `distribution` ("reference" or "population"); `fixed` overrides."""
    table = getattr(spec, distribution)
    draw = {attribute: rng.choices(list(table[attribute][profession]), list(table[attribute][profession].values()))[0]
            for attribute in ("name", "relation")}
    draw |= dict(surname=rng.choice(SURNAMES), place=rng.choice(PLACES), time=rng.choice(TIMES),
                 ending=rng.randrange(len(ENDINGS)))
    return StoryAttributes(profession=profession, **(draw | fixed))


def story_sft(spec: StorySpec, rng: random.Random, per_profession: int = 150) -> list[dict]:
    return [{"prompt": spec.prompts[profession], "response": render_story(sample_story(spec, profession, rng))}
            for profession in PROFESSIONS for _ in range(per_profession)]


def story_groups(spec: StorySpec, rng: random.Random) -> list[PreferenceGroup]:
    """Per profession: one story told with each name (p = name preferences), one told with each relation
    (p = relation preferences), and one well-formed story against each kind of corrupted copy."""
    groups = []
    for profession, prompt in spec.prompts.items():
        base = sample_story(spec, profession, rng)
        for attribute in ("name", "relation"):
            values = spec.population[attribute][profession]
            stories = tuple(render_story(dataclasses.replace(base, **{attribute: v})) for v in values)
            groups.append(PreferenceGroup(f"story-{profession}-{attribute}", prompt, stories, tuple(values.values())))
        for kind in CORRUPTIONS:
            story = render_story(sample_story(spec, profession, rng))
            aberrant = corrupt_story(story, kind, rng)
            groups.append(PreferenceGroup(f"story-{profession}-{kind}", prompt, (story, aberrant),
                                          (spec.aberration_preference, 1.0 - spec.aberration_preference)))
    return groups
