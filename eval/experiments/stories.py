"""The world's stories as experiment 2 measures them: the exact reward, per-input quality and diversity, and the
closed-form optimum over groups of stories that differ in one attribute.

The population's preferences over stories are Bradley-Terry (data/world/stories.py story_groups): within a group
of stories that differ only in the hero's name, p = p_name(. | profession); only in the relation, p_rel; and a
well-formed story beats its corrupted copy with probability 0.95. One reward reproduces all three:

    r(y) = log p_name(name(y) | profession) + log p_rel(relation(y) | profession)      y well-formed (Eq. 2)
    r(y) = min r - log(0.95 / 0.05)                                                    any other text

(the second line is a convention for text the data never ranks: below every well-formed story by the margin the
raters give a story over its corrupted copy). With it, SPL's optimum pi* ∝ pi_ref^(beta/alpha) exp(r / alpha)
(Prop. A.1 / Eq. 35) is, conditionally on the rest of a story, exactly computable over its 8 name variants (or 6
relation variants) from the reference model's probabilities of those stories: `closed_form_report`.
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter

from eval.experiments.fronts import mean

ABERRATION_MARGIN = math.log(0.95 / 0.05)  # r(story) - r(its corrupted copy) in the world's pairs (Eq. 2)


def ngram_counts(text: str) -> Counter:
    """Word 1- and 2-grams of a text (split on whitespace) with their counts; an empty text is one "<empty>"
    token, so that every text has a vector."""
    words = text.split() or ["<empty>"]
    return Counter([(w,) for w in words] + list(zip(words, words[1:])))


def ngram_vendi(texts) -> float:
    """Vendi score of texts under the cosine kernel of their word 1-2-gram count vectors (eval.metrics.vendi_score
    on the explicit vectors): 1 when all texts are the same, up to N when no two share an n-gram."""
    import torch

    from eval.metrics import vendi_score

    counts = [ngram_counts(t) for t in texts]
    vocabulary = {gram: i for i, gram in enumerate(sorted(set().union(*counts)))}
    vectors = torch.zeros(len(texts), len(vocabulary), dtype=torch.float64)  # (N, grams)
    for row, c in enumerate(counts):
        for gram, count in c.items():
            vectors[row, vocabulary[gram]] = count
    return vendi_score(vectors)


def profession_of(prompt: str) -> str:
    return prompt.rstrip(".").split()[-1]  # "Write a short story about a doctor." -> "doctor"


def story_rewards(spec, prompts, checks) -> list[float]:
    """The world's exact reward of each sample (the module docstring): log p_name + log p_rel of its profession
    for a well-formed story (`checks`: validate_story's verdicts), the floor min r - ABERRATION_MARGIN otherwise."""
    rewards = []
    for prompt, check in zip(prompts, checks):
        names, relations = (spec.population[attribute][profession_of(prompt)] for attribute in ("name", "relation"))
        if check.valid:
            rewards.append(math.log(names[check.name]) + math.log(relations[check.relation]))
        else:
            rewards.append(math.log(min(names.values())) + math.log(min(relations.values())) - ABERRATION_MARGIN)
    return rewards


def story_metrics(spec, prompts, texts, num_samples: int) -> tuple[dict, list]:
    """Quality over all texts, and per input (consecutive runs of num_samples texts, one prompt each) the world's
    entropies and the n-gram Vendi, averaged over inputs. -> (metrics, each text's validate_story verdict)."""
    from data.world import validate_story
    from eval.metrics import attribute_entropy

    checks = [validate_story(p, t) for p, t in zip(prompts, texts)]
    rewards = story_rewards(spec, prompts, checks)
    valid = [r for r, c in zip(rewards, checks) if c.valid]
    inputs = [slice(start, start + num_samples) for start in range(0, len(texts), num_samples)]

    def entropy(values):  # an input whose stories all hide the attribute has nothing diverse: 0
        return attribute_entropy(values) if any(v is not None for v in values) else 0.0

    names, relations = [c.name for c in checks], [c.relation for c in checks]
    return {"validity": len(valid) / len(checks), "reward": mean(rewards),
            "reward_valid": mean(valid) if valid else math.nan,
            "name_entropy": mean(entropy(names[s]) for s in inputs),
            "relation_entropy": mean(entropy(relations[s]) for s in inputs),
            "vendi_ngram": mean(ngram_vendi(texts[s]) for s in inputs)}, checks


@dataclasses.dataclass(frozen=True)
class StoryGroup:
    prompt: str
    attribute: str  # "name" or "relation": what varies among the texts
    texts: tuple  # one well-formed story per value of the attribute, the rest of the story fixed
    population: tuple  # p of each value (the group's Bradley-Terry preferences)


def closed_form_groups(spec, bases: int, seed: int = 0, prompts=None) -> list[StoryGroup]:
    """Per profession (of `prompts`, default all) and each of `bases` random stories drawn from the reference's
    profiles: the group of its 8 name variants and the group of its 6 relation variants."""
    from data.world import render_story, sample_story

    rng = random.Random(f"closed-form:{seed}")
    groups = []
    for profession, prompt in spec.prompts.items():
        if prompts is not None and prompt not in prompts:
            continue
        for _ in range(bases):
            base = sample_story(spec, profession, rng)
            for attribute in ("name", "relation"):
                values = spec.population[attribute][profession]
                texts = tuple(render_story(dataclasses.replace(base, **{attribute: v})) for v in values)
                groups.append(StoryGroup(prompt, attribute, texts, tuple(values.values())))
    return groups


def group_logprobs(model, tokenizer, groups) -> list:
    """log pi(y | x) of every story of every group (float64 [K] each), each scored as a chat response + EOS."""
    from data.world.report import conversation_option_logprobs

    return conversation_option_logprobs(model, tokenizer, [[{"role": "user", "content": g.prompt}] for g in groups],
                                        [g.texts for g in groups])


def closed_form_report(groups, reference_logps, policy_logps, alpha: float, beta: float) -> dict:
    """Per attribute, means over the groups of: TV(pi(. | rest), pi*(. | rest)) with pi* = optimal_policy of the
    reference's normalised probabilities (Prop. A.1), the entropies of pi and pi* over the group, and the mass
    the policy keeps on the group relative to the reference's (sum_y pi(y) / sum_y pi_ref(y))."""
    import torch

    from spl.theory import optimal_policy

    report = {}
    for attribute in ("name", "relation"):
        tv, entropy, closed_entropy, mass = [], [], [], []
        for group, ref, pol in zip(groups, reference_logps, policy_logps):
            if group.attribute != attribute:
                continue
            target = optimal_policy(ref.softmax(0), torch.tensor(group.population, dtype=torch.float64), alpha, beta)
            learned = pol.softmax(0)  # (K,)
            tv.append(0.5 * float((learned - target).abs().sum()))
            entropy.append(float(-(learned * learned.log()).sum()))
            closed_entropy.append(float(-torch.xlogy(target, target).sum()))
            mass.append(math.exp(float(pol.logsumexp(0) - ref.logsumexp(0))))
        report |= {f"tv_{attribute}": mean(tv), f"entropy_{attribute}": mean(entropy),
                   f"closed_form_entropy_{attribute}": mean(closed_entropy), f"mass_{attribute}": mean(mass)}
    return report
