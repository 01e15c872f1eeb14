"""Strategy mixes of the arithmetic world: which strategy a solution uses, and the convergence gate of the best-of-N
experiment (a policy's mix over each training problem's candidate solutions against its closed form).

Why a gate: best-of-N differences between DPO and SPL are meant to come from where each puts its probability among
the solution strategies (DPO's optimum collapses onto the raters' favourite, SPL's keeps the others), so before any
pass@k is read each trained policy is checked against its optimum on the problems it was trained on. The optimum
over a prompt's K candidate solutions (Prop. A.1, `spl.theory.optimal_policy`; the option-mass anchor keeps the total
at the reference's, `spl.theory.anchored_optimum`) is

    pi*(y_i | x) / sum_j pi*(y_j | x) = pi_ref(y_i)^(beta/alpha) p(y_i)^(1/alpha) / Z

with p the population's weights of the world's strategy pairs (`data.world.arithmetic_groups`: each strategy's
correct solution, weight POPULATION_STRATEGY, and one slipped solution). The policy's side is exact, not sampled:
softmax over the K candidates of log pi(y_i | x) (teacher-forced, `eval.metrics.sequence_nll`).

A sample's strategy is read from its shape: digits masked and a counted list ("10, 11, 12") collapsed, the text is
compared with the masked shapes of the problem's correct solutions, one per strategy. A slipped solution has its
strategy's shape (only numbers change); a text of no strategy's shape is "other".
"""
from __future__ import annotations

import random
import re

import torch

from data.world import arithmetic_groups
from data.world.arithmetic import STRATEGIES

SLIP = "slip"  # the label of a group's slipped (wrong) candidate
OTHER = "other"  # a sample of no strategy's shape
GATE_TV = 0.10  # the gate: a level's mean total variation of the strategy mix from the closed form's, at most this


def shape(text: str) -> str:
    """The text with every number replaced by N and a counted list 'N, N, N' collapsed to 'N...'."""
    return re.sub(r"N(?:, N)+", "N...", re.sub(r"\d+", "N", text.strip()))


def strategy_of(problem, text: str) -> str:
    """The strategy whose correct solution of `problem` has the text's shape, else OTHER."""
    wanted = shape(text)
    for name, solution in problem.solutions.items():
        if shape(solution) == wanted:
            return name
    return OTHER


def world_groups(world) -> list:
    """The world's arithmetic preference groups, regenerated exactly as data/world built its strategy pairs
    (`generate_world`'s random stream for them), so each candidate's population weight p is known."""
    return arithmetic_groups(world.arithmetic, random.Random(f"{world.seed}:arithmetic-pairs"))


def candidate_labels(problem, group) -> list[str]:
    """Each candidate's strategy, SLIP for the one with a wrong final answer."""
    correct = {text: name for name, text in problem.solutions.items()}
    return [correct.get(text, SLIP) for text in group.candidates]


@torch.no_grad()
def candidate_logps(model, tokenizer, groups) -> list[torch.Tensor]:
    """log pi(y_i | x) of every group's candidates (one [K] float64 tensor per group), each text followed by the
    end-of-turn token as train.py scores a response; one batched teacher-forced pass over all of them."""
    from eval.metrics import sequence_nll
    from models.generate import user_prompt_ids

    prompts, texts, sizes = [], [], []
    for group in groups:
        prompt = user_prompt_ids(tokenizer, group.prompt, chat=True)
        prompts += [prompt] * len(group.candidates)
        texts += [tokenizer.encode_response(text) for text in group.candidates]
        sizes.append(len(group.candidates))
    return list(torch.split(-sequence_nll(model, prompts, texts), sizes))


def closed_form(ref_logps, p, alpha: float, beta: float) -> torch.Tensor:
    """The optimum's distribution over the candidates [K] (Prop. A.1 renormalised over them; alpha = beta is DPO's
    pi_ref p^(1/beta))."""
    from spl.theory import optimal_policy

    ref_logps = torch.as_tensor(ref_logps, dtype=torch.float64)
    return optimal_policy(torch.softmax(ref_logps, -1), torch.as_tensor(p, dtype=torch.float64), alpha, beta)


def mix(probs, labels, names) -> list[float]:
    """Probability per name of `names` summed over the candidates carrying that label."""
    return [float(sum(float(q) for q, label in zip(probs, labels) if label == name)) for name in names]


def gate_rows(problems, groups, policy_logps, ref_logps, alpha: float, beta: float) -> list[dict]:
    """Per training problem: the policy's and the closed form's mixes over its candidates; the total variation of
    the strategy mixes (`tv_strategy`: the slipped candidate counted with the strategy whose shape it has, direct
    here: the gate) and of the candidate distributions (`tv`: the slip apart, stricter: it also asks the policy to
    keep the closed form's odds of a correct to a slipped product, an accuracy, not a strategy); and the log of
    the policy's probability on the candidates over the reference's (the anchor holds it near 0).
    policy_logps, ref_logps: per group, [K] log-probs."""
    by_id = {p.id: p for p in problems}
    rows = []
    for group, logps, ref in zip(groups, policy_logps, ref_logps):
        problem = by_id[group.id]
        labels = candidate_labels(problem, group)
        names = [*STRATEGIES[problem.level], SLIP]
        policy = torch.softmax(torch.as_tensor(logps, dtype=torch.float64), -1)
        target = closed_form(ref, group.population, alpha, beta)
        reference = torch.softmax(torch.as_tensor(ref, dtype=torch.float64), -1)
        strategies = [strategy_of(problem, text) for text in group.candidates]  # the slip: its strategy's shape
        ours, theirs = (torch.tensor(mix(q, strategies, STRATEGIES[problem.level]), dtype=torch.float64)
                        for q in (policy, target))
        rows.append({"problem": problem.id, "level": problem.level,
                     "tv_strategy": 0.5 * float((ours - theirs).abs().sum()),
                     "tv": 0.5 * float((policy - target).abs().sum()),
                     "log_mass_ratio": float(torch.logsumexp(torch.as_tensor(logps), 0)
                                             - torch.logsumexp(torch.as_tensor(ref), 0)),
                     **{f"policy_{n}": v for n, v in zip(names, mix(policy, labels, names))},
                     **{f"closed_{n}": v for n, v in zip(names, mix(target, labels, names))},
                     **{f"reference_{n}": v for n, v in zip(names, mix(reference, labels, names))}})
    return rows


def gate_summary(rows, policy: str, levels) -> list[dict]:
    """Per level: mean TVs, mean strategy mixes (policy, closed form, reference) and whether the strategy mixes'
    mean TV is at most GATE_TV."""
    out = []
    for level in levels:
        at = [r for r in rows if r["level"] == level]
        if not at:
            continue
        mean = {key: sum(r[key] for r in at) / len(at) for key in at[0] if key not in ("problem", "level")}
        out.append({"policy": policy, "level": level, "problems": len(at), **mean,
                    "gate_met": mean["tv_strategy"] <= GATE_TV})
    return out
