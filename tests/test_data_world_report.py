"""data/world/report.py: the main job's report of learned vs. closed-form distributions over opinion options.

Oracles: each option's probability computed here by one full forward over prompt + option + EOS and
normalised by hand (its sum before normalising is the option mass); the closed form from `spl.theory.optimal_policy`; the invariants that with B = 0 the
learned distribution is the reference and that total variation is half the L1 distance.
"""
from dataclasses import dataclass

import pytest
import torch

from data.world.report import format_report, opinion_report, option_distributions
from models import Tokenizer, add_lora, load_pretrained
from spl.theory import optimal_policy


@dataclass
class Question:
    prompt: str
    options: tuple
    population: tuple


QUESTIONS = [Question("which pet is best?", ("cats", "dogs", "fish"), (0.2, 0.5, 0.3)),
             Question("the sky today?", ("blue", "warm"), (0.9, 0.1))]


@pytest.fixture
def setup(tiny_run):
    model = load_pretrained(tiny_run["model"])
    return model, Tokenizer(tiny_run["model"] / "tokenizer.model")


def by_hand(model, tokenizer, question, normalise=True):
    logps = []
    for option in question.options:
        prompt = tokenizer.encode_prompt([{"role": "user", "content": question.prompt}])
        response = tokenizer.encode_response(option)
        ids = torch.tensor([prompt + response])
        logits = model(ids)[0].double().log_softmax(-1)  # (T, V)
        logps.append(sum(logits[len(prompt) - 1 + i, token] for i, token in enumerate(response)))
    probs = torch.stack(logps).exp()
    return probs / probs.sum() if normalise else probs


def test_option_distributions_equal_full_forward(setup):
    model, tokenizer = setup
    got = option_distributions(model, tokenizer, QUESTIONS)
    for question, distribution in zip(QUESTIONS, got):
        torch.testing.assert_close(distribution, by_hand(model, tokenizer, question), rtol=1e-5, atol=1e-6)
        assert 0.001 < distribution.min() and distribution.max() < 0.999  # not degenerate, so the comparison means something


def test_report_with_fresh_lora(setup):
    model, tokenizer = setup
    add_lora(model, rank=2, alpha=4)
    report = opinion_report(model, tokenizer, QUESTIONS, alpha=0.3, beta=0.1)
    for question, row in zip(QUESTIONS, report["questions"]):
        reference = torch.tensor(row["reference"], dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(row["learned"], dtype=torch.float64), reference)  # B = 0
        closed_form = optimal_policy(reference, torch.tensor(question.population, dtype=torch.float64), 0.3, 0.1)
        assert row["closed_form"] == pytest.approx(closed_form.tolist(), abs=1e-12)
        tv = 0.5 * sum(abs(a - b) for a, b in zip(row["learned"], row["closed_form"]))
        assert row["tv_learned_vs_closed_form"] == pytest.approx(tv, abs=1e-12)
    mean = sum(r["tv_learned_vs_closed_form"] for r in report["questions"]) / 2
    assert report["mean_tv_learned_vs_closed_form"] == pytest.approx(mean)
    assert report["global_temperature"] == pytest.approx(3.0)
    text = format_report(report)
    assert "which pet is best?" in text and "closed form" in text and f"{mean:.4f}" in text


def test_option_mass_is_the_unnormalised_sum(setup):
    """option mass = sum_i pi(y_i | x) by full forwards; with B = 0 the learned mass is the reference's; after the
    LoRA B matrices are randomised the policy's mass differs and is again its own unnormalised sum."""
    model, tokenizer = setup
    add_lora(model, rank=2, alpha=4)
    report = opinion_report(model, tokenizer, QUESTIONS, alpha=0.3, beta=0.1)
    with torch.no_grad():
        masses = [float(by_hand(model, tokenizer, q, normalise=False).sum()) for q in QUESTIONS]
    for row, mass in zip(report["questions"], masses):
        assert row["reference_option_mass"] == pytest.approx(mass, rel=1e-5)
        assert row["learned_option_mass"] == pytest.approx(mass, rel=1e-5)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B.weight"):
                param.normal_(0, 0.5)
    report = opinion_report(model, tokenizer, QUESTIONS, alpha=0.3, beta=0.1)
    with torch.no_grad():
        learned = [float(by_hand(model, tokenizer, q, normalise=False).sum()) for q in QUESTIONS]
    for row, mass, ref_mass in zip(report["questions"], learned, masses):
        assert row["learned_option_mass"] == pytest.approx(mass, rel=1e-5)
        assert row["reference_option_mass"] == pytest.approx(ref_mass, rel=1e-5)
        assert abs(mass - ref_mass) > 1e-3 * ref_mass  # the randomised adapter moved it, so the check has teeth
    assert report["mean_learned_option_mass"] == pytest.approx(sum(learned) / 2, rel=1e-5)
    assert "probability kept on the options" in format_report(report)
