"""Representation on the embedded world's opinion questions: learned policy against the closed-form optimum.

For a question with options y_1..y_K, a model's distribution over the options is its sequence probabilities
normalised over them, `pi(y_i | x) / sum_j pi(y_j | x)` (each option scored as response + EOS after the chat
prompt). SPL's loss only ever compares options of the same prompt, so this normalised distribution is exactly
what it determines, and its optimum is (Prop. A.1)

    pi*(y_i) ∝ pi_ref(y_i)^(beta/alpha) * p(y_i)^(1/alpha)

with p the population's preferences and pi_ref the reference model's normalised distribution. The report
places, per question, population, reference, learned and closed form side by side, and the total-variation
distance between learned and closed form.

What the loss does not determine is the option mass, sum_j pi(y_j | x): the probability the policy keeps on the
options at all. Every term of the loss is a difference of log-probabilities of two options of one prompt, so
moving all of them by the same amount changes nothing the loss sees, and in practice training lowers them all
("likelihood displacement", Razin et al. 2024; DPO does it too): trained on the plain loss, a policy keeps far
less mass on the options than the reference, so sampled freely it mostly writes text outside them while its
normalised distribution matches the closed form (the main job's option-mass anchor holds the mass; README, The
main job). The report gives the mass of both, so the normalised figures are never read as more than they are.
"""
from __future__ import annotations

import torch

from data.sft import SequenceExample, collate_sequences
from data.world import DEFAULT_DIR, load_world
from models.lora import disable_lora
from spl.online import Rollouts
from spl.step import policy_logprobs
from spl.theory import full_space_option_mass, off_option_weight_bounds, optimal_policy, optimal_policy_from_reward


def option_logprobs(model, tokenizer, questions, device=None, batch_size: int = 64) -> list[torch.Tensor]:
    """Per question, log pi(y_i | x) of each option y_i (+ EOS) after the chat prompt (float64 [K])."""
    return conversation_option_logprobs(model, tokenizer, [[{"role": "user", "content": q.prompt}] for q in questions],
                                        [q.options for q in questions], device, batch_size)


@torch.no_grad()
def conversation_option_logprobs(model, tokenizer, conversations, options, device=None, batch_size: int = 64,
                                 shared_prefix: bool = False) -> list[torch.Tensor]:
    """Per conversation (chat messages ending with a user turn), log pi(y_i | x) of each of its options y_i (+ the
    end of turn) after the chat prompt the tokenizer renders (float64 [K]). shared_prefix: each prompt runs once
    and its options continue from it (models/prefix.py; the same values up to float rounding), which is what
    makes long few-shot prompts affordable; a batch then holds whole conversations, about batch_size rows."""
    examples, prompt_of = [], []  # prompt_of: the conversation of each row
    for number, (messages, texts) in enumerate(zip(conversations, options)):
        prompt_ids = tokenizer.encode_prompt(messages)
        examples += [SequenceExample(prompt_ids, tokenizer.encode_response(option), len(examples))
                     for option in texts]
        prompt_of += [number] * len(texts)
    was_training = model.training
    model.eval()
    logps, start = [], 0
    while start < len(examples):
        end = min(start + batch_size, len(examples))
        while shared_prefix and end < len(examples) and prompt_of[end] == prompt_of[end - 1]:
            end += 1  # whole conversations only
        batch = collate_sequences(examples[start:end], tokenizer.pad_id)
        if shared_prefix:  # the fields models/prefix.py reads: each row's prompt (0..P-1 in the batch), its length
            batch["response_prompt"] = torch.tensor(prompt_of[start:end]) - prompt_of[start]
            batch["prompt_lengths"] = torch.tensor([len(e.prompt_ids) for e in examples[start:end]])
        batch = {k: v.to(device) for k, v in batch.items()}
        logps.append(policy_logprobs(model, batch, compile=False, shared_prefix=shared_prefix).double().cpu())
        start = end
    model.train(was_training)
    logps = torch.cat(logps)
    return list(logps.split([len(texts) for texts in options]))


def option_distributions(model, tokenizer, questions, device=None, batch_size: int = 64) -> list[torch.Tensor]:
    """Per question, the model's distribution over its options (float64 [K]): softmax of the option log-probs."""
    return [logps.softmax(0) for logps in option_logprobs(model, tokenizer, questions, device, batch_size)]


def total_variation(p, q) -> float:
    return 0.5 * float((p - q).abs().sum())


def opinion_report(model, tokenizer, questions, alpha: float, beta: float, device=None, conversations=None,
                   reference=None) -> dict:
    """The report.json of the main job: per question its options, population, reference, learned, closed_form
    and their total-variation distance; plus the mean over questions. Needs a LoRA model (the reference is the
    same model with its adapters off). conversations: the chat each question is asked in (default: its prompt as
    the one user turn), scored with each prompt computed once (eval/experiments/real_opinions.py's few-shot);
    reference: the reference's option log-probs if already computed (conversation_option_logprobs)."""
    options = [q.options for q in questions]
    shared = conversations is not None
    conversations = conversations or [[{"role": "user", "content": q.prompt}] for q in questions]
    learned = conversation_option_logprobs(model, tokenizer, conversations, options, device, shared_prefix=shared)
    if reference is None:
        with disable_lora(model):
            reference = conversation_option_logprobs(model, tokenizer, conversations, options, device,
                                                     shared_prefix=shared)
    rows = []
    for q, ref_logps, logps in zip(questions, reference, learned):
        population = torch.tensor(q.population, dtype=torch.float64)
        ref, pol = ref_logps.softmax(0), logps.softmax(0)
        closed_form = optimal_policy(ref, population, alpha, beta)  # Prop. A.1
        rows.append({"prompt": q.prompt, "options": list(q.options), "population": population.tolist(),
                     "reference": ref.tolist(), "learned": pol.tolist(), "closed_form": closed_form.tolist(),
                     "tv_learned_vs_closed_form": total_variation(pol, closed_form),
                     "reference_option_mass": float(ref_logps.logsumexp(0).exp()),
                     "learned_option_mass": float(logps.logsumexp(0).exp())})

    def mean(key):
        return sum(r[key] for r in rows) / len(rows)

    return {"alpha": alpha, "beta": beta, "global_temperature": alpha / beta if beta else float("inf"),
            "questions": rows, "mean_tv_learned_vs_closed_form": mean("tv_learned_vs_closed_form"),
            "max_tv_learned_vs_closed_form": max(r["tv_learned_vs_closed_form"] for r in rows),
            "mean_reference_option_mass": mean("reference_option_mass"),
            "mean_learned_option_mass": mean("learned_option_mass")}


def world_report(model, tokenizer, alpha: float, beta: float, device=None, brief: bool = False,
                 world_dir=DEFAULT_DIR) -> dict:
    """The main job's report on the embedded world's opinion questions (opinion_report); brief: only its mean
    total variation, learned vs closed form (what train.py --eval-every logs)."""
    report = opinion_report(model, tokenizer, load_world(world_dir).opinions, alpha, beta, device=device)
    if brief:
        return {"mean_tv_learned_vs_closed_form": report["mean_tv_learned_vs_closed_form"]}
    return report


def format_report(report: dict, rows: int = 4) -> str:
    """A readable table for the first `rows` questions, then the summary line."""
    lines = [f"alpha = {report['alpha']:g}, beta = {report['beta']:g} (global temperature alpha/beta = "
             f"{report['global_temperature']:g}); distributions over each question's options:"]
    for q in report["questions"][:rows]:
        lines.append(f"\n  {q['prompt']}")
        width = max(len(option) for option in q["options"])
        lines.append(f"    {'option':<{width}}  population  reference  learned  closed form")
        for i, option in enumerate(q["options"]):
            lines.append(f"    {option:<{width}}  {q['population'][i]:10.3f}  {q['reference'][i]:9.3f}  "
                         f"{q['learned'][i]:7.3f}  {q['closed_form'][i]:11.3f}")
        lines.append(f"    total variation, learned vs closed form: {q['tv_learned_vs_closed_form']:.4f}")
    lines.append(f"\nmean total variation over {len(report['questions'])} questions, learned vs closed form: "
                 f"{report['mean_tv_learned_vs_closed_form']:.4f} (max {report['max_tv_learned_vs_closed_form']:.4f})")
    lines.append(f"probability kept on the options (SPL fixes only their ratios; --anchor holds it): learned "
                 f"{report['mean_learned_option_mass']:.3f}, reference {report['mean_reference_option_mass']:.3f}, "
                 f"ratio {report['mean_learned_option_mass'] / report['mean_reference_option_mass']:.3f} "
                 f"(mean over questions)")
    return "\n".join(lines)


def add_reward_optimum(report: dict, reward, prompts, tokenizer, alpha: float, beta: float) -> dict:
    """For a run scored by a learned reward on the world (--reward-model): per question the optimum that reward
    implies over the options, pi_ref^(beta/alpha) exp(r_hat/alpha) (Prop. A.2 restricted to them,
    `optimal_policy_from_reward`; a per-prompt constant in r_hat cancels), beside the true closed form. Its TV to
    the closed form is what the reward model alone costs; the learned policy's TV to it is what training left.
    The questions are matched to `prompts` (spl.online.OnlinePrompt: their data's distinct prompts) by their
    chat prompt's tokens; `reward` is spl/online.py's interface, (prompt indices, Rollouts) -> [P, K]."""
    by_ids = {tuple(p.prompt_ids): p.index for p in prompts}
    report = dict(report)
    for row in report["questions"]:
        ids = tokenizer.encode_prompt([{"role": "user", "content": row["prompt"]}])
        options = [tokenizer.encode_response(option) for option in row["options"]]
        scores = reward([by_ids[tuple(ids)]], Rollouts([ids], [options], None))[0]  # (K,) r_hat on the options
        reference = torch.tensor(row["reference"], dtype=torch.float64)
        optimum = optimal_policy_from_reward(reference, scores.to(torch.float64), alpha, beta)  # (K,)
        closed_form, learned = (torch.tensor(row[k], dtype=torch.float64) for k in ("closed_form", "learned"))
        row["reward_scores"], row["reward_optimum"] = scores.tolist(), optimum.tolist()
        row["tv_reward_optimum_vs_closed_form"] = total_variation(optimum, closed_form)
        row["tv_learned_vs_reward_optimum"] = total_variation(learned, optimum)
    for key in ("tv_reward_optimum_vs_closed_form", "tv_learned_vs_reward_optimum"):
        values = [row[key] for row in report["questions"]]
        report[f"mean_{key}"], report[f"max_{key}"] = sum(values) / len(values), max(values)
    return report


def format_reward_optimum(report: dict) -> str:
    """add_reward_optimum's summary line."""
    mean, most = (report[f"{k}_tv_reward_optimum_vs_closed_form"] for k in ("mean", "max"))
    learned, learned_most = (report[f"{k}_tv_learned_vs_reward_optimum"] for k in ("mean", "max"))
    return (f"the reward's own optimum over the options is mean TV {mean:.4f} (max {most:.4f}) from the closed "
            f"form; learned vs that optimum {learned:.4f} (max {learned_most:.4f})")


def add_full_space_mass(report: dict, floor: float, log_num_texts: float, alpha: float, beta: float) -> dict:
    """The option mass Eq. 4's optimum keeps under the world's exact reward with this floor
    (spl.theory.full_space_option_mass, from the reference model's own option probabilities) beside the learned
    mass, per question and on average: for alpha = beta exactly; otherwise the interval its bounds on W over at
    most N = exp(log_num_texts) texts give (off_option_weight_bounds), the error being the distance from it."""
    report = dict(report, reward_floor=floor)
    errors = []
    for row in report["questions"]:
        ref = torch.tensor(row["reference"], dtype=torch.float64) * row["reference_option_mass"]  # (K,)
        reward = torch.tensor(row["population"], dtype=torch.float64).log()  # (K,) r = log p
        if alpha == beta:
            low = high = float(full_space_option_mass(ref, reward, floor, alpha, beta))
        else:
            weights = off_option_weight_bounds(ref, alpha, beta, log_num_texts)  # (W low, W high)
            high, low = (float(full_space_option_mass(ref, reward, floor, alpha, beta, w)) for w in weights)
        row["closed_form_option_mass"] = [low, high] if low != high else low
        learned = row["learned_option_mass"]
        errors.append(max(low - learned, learned - high, 0.0))
    masses = [r["closed_form_option_mass"] for r in report["questions"]]
    report["mean_closed_form_option_mass"] = [sum(m[i] for m in masses) / len(masses) for i in (0, 1)] \
        if alpha != beta else sum(masses) / len(masses)
    report["mean_abs_option_mass_error"] = sum(errors) / len(errors)
    report["max_abs_option_mass_error"] = max(errors)
    return report


def format_full_space_mass(report: dict) -> str:
    """add_full_space_mass's summary line."""
    mass = report["mean_closed_form_option_mass"]
    mass = f"{mass:.3f}" if isinstance(mass, float) else f"between {mass[0]:.3f} and {mass[1]:.3f}"
    return (f"full-space optimum (Eq. 4, floor {report['reward_floor']:g}): option mass {mass} (mean over questions); "
            f"learned {report['mean_learned_option_mass']:.3f}, within {report['mean_abs_option_mass_error']:.4f} of "
            f"it on average (max {report['max_abs_option_mass_error']:.4f})")


def job_report(model, tokenizer, alpha: float, beta: float, device=None, exact_floor=None,
               reward_model=None) -> dict:
    """The report a world run ends with (train.py): `world_report`, and for spl-online what its target is beside
    it: exact_floor, (floor, log N) of the world's exact reward, adds the full-space optimum's option mass;
    reward_model, (prompts, reward), adds that reward model's own optimum."""
    report = world_report(model, tokenizer, alpha, beta, device)
    if exact_floor is not None:
        report = add_full_space_mass(report, *exact_floor, alpha, beta)
    if reward_model is not None:
        prompts, reward = reward_model
        report = add_reward_optimum(report, reward, prompts, tokenizer, alpha, beta)
    return report


def format_job_report(report: dict) -> str:
    """job_report's table and summary lines, as train.py prints them."""
    lines = [format_report(report)]
    if "mean_closed_form_option_mass" in report:
        lines.append(format_full_space_mass(report))
    if "mean_tv_reward_optimum_vs_closed_form" in report:
        lines.append(format_reward_optimum(report))
    return "\n".join(lines)
