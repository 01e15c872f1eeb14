"""spl/step.py: one training step's math on a real (tiny) model and batch.

Oracles: the naive path written out here, `log_softmax(model(input_ids))` gathered at the targets and summed
under the mask, fed to the loss functions; gradients of every LoRA parameter compared between the fused and the
naive path; the reference as the model before LoRA was added; the reward head at an index found by hand.
"""
import pytest
import torch
import torch.nn.functional as F

from data.batching import collate
from data.sft import SequenceExample, collate_sequences
from data.tokenization import PreferenceExample
from models import add_lora
from spl import losses
from spl.step import (Objective, RewardHead, policy_logprobs, preference_step, reference_logprobs, reward_step,
                      sft_step)


@pytest.fixture
def model(tiny_model, randomize):
    return randomize(tiny_model(seed=0), seed=1)


def pairs_batch(vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    examples = [PreferenceExample([1] + ids(4), ids(3) + [2], ids(5) + [2], 0.8, index=0),
                PreferenceExample([1] + ids(7), ids(1) + [2], ids(2) + [2], 1.0, index=1),
                PreferenceExample([1] + ids(2), ids(6) + [2], ids(4) + [2], 0.3, index=2)]
    return collate(examples, pad_id=0)


def naive_logps(model, batch):
    logits = model(batch["input_ids"])  # (rows, T, V) float32
    token_logps = logits.log_softmax(-1).gather(-1, batch["targets"][..., None]).squeeze(-1)  # (rows, T)
    return (token_logps * batch["loss_mask"]).sum(-1)  # (rows,)


def test_policy_logprobs_equal_the_naive_path(model):
    batch = pairs_batch()
    torch.testing.assert_close(policy_logprobs(model, batch, compile=False), naive_logps(model, batch),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", [Objective("spl", alpha=0.3, beta=0.1), Objective("dpo", beta=0.1),
                                       Objective("ipo", ipo_tau=0.5), Objective("fdpo", beta=0.2, fdpo_divergence="js")])
def test_preference_step_loss_and_lora_gradients_equal_the_naive_path(model, objective):
    """Loss value and every LoRA gradient: fused log-probs vs. log_softmax over the full logits."""
    add_lora(model, rank=4, alpha=8, targets="all-linear")
    with torch.no_grad():  # move off B = 0 so the policy differs from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    batch = pairs_batch()
    ref_chosen, ref_rejected = reference_logprobs(model, batch, compile=False)
    soft = batch["chosen_prob"]
    loss, metrics, pairs = preference_step(model, batch, ref_chosen, ref_rejected, objective, compile=False)
    loss.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    logps = naive_logps(model, batch)
    fn = {"spl": lambda *a: losses.spl_loss(*a, objective.alpha, objective.beta, chosen_prob=soft),
          "dpo": lambda *a: losses.dpo_loss(*a, objective.beta, chosen_prob=soft),
          "ipo": lambda *a: losses.ipo_loss(*a, objective.ipo_tau, chosen_prob=soft),
          "fdpo": lambda *a: losses.fdpo_loss(*a, objective.beta, "js", chosen_prob=soft)}[objective.loss]
    naive_losses, chosen_rewards, rejected_rewards = fn(logps[:3], logps[3:], ref_chosen, ref_rejected)
    naive_losses.mean().backward()
    assert pairs == 3
    torch.testing.assert_close(loss, naive_losses.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["margin"], (chosen_rewards - rejected_rewards).sum(), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            # float32 sums in another order: differences reach ~1e-5 on gradients O(3), whatever the draw
            torch.testing.assert_close(fused_grads[name], p.grad, rtol=1e-4, atol=1e-5 * p.grad.abs().max(), msg=name)


def test_reference_is_the_model_before_lora(model):
    batch = pairs_batch()
    before = naive_logps(model, batch)
    add_lora(model, rank=4, alpha=8, targets=["q_proj", "down_proj"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ref_chosen, ref_rejected = reference_logprobs(model, batch, compile=False)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), before, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(policy_logprobs(model, batch, compile=False), before, atol=1e-3)


def test_sft_step_is_token_mean_cross_entropy(model):
    """Mean NLL per response token = F.cross_entropy over exactly the masked-in targets."""
    examples = [SequenceExample([1, 5, 6], [7, 8, 2], index=0), SequenceExample([1, 9], [10, 11, 12, 13, 2], index=1)]
    batch = collate_sequences(examples, pad_id=0)
    loss, metrics, tokens = sft_step(model, batch, compile=False)
    logits = model(batch["input_ids"])
    mask = batch["loss_mask"]
    expected = F.cross_entropy(logits[mask], batch["targets"][mask])
    assert tokens == 8
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_reward_head_scores_the_last_real_token(model):
    batch = pairs_batch()
    head = RewardHead(model.config.hidden_size)
    with torch.no_grad():
        head.score.weight.normal_()
        head.score.bias.fill_(0.3)
    loss, metrics, pairs = reward_step(model, head, batch)
    hidden = model.hidden_states(batch["input_ids"])
    scores = []
    for row in range(hidden.shape[0]):
        last = int(batch["attention_mask"][row].nonzero().max())  # found by hand: the row's EOS
        assert batch["input_ids"][row, last] == 2
        scores.append(hidden[row, last] @ head.score.weight[0] + 0.3)
    scores = torch.stack(scores)
    expected, _, _ = losses.bradley_terry_loss(scores[:3], scores[3:], batch["chosen_prob"])
    torch.testing.assert_close(loss, expected.mean(), rtol=1e-5, atol=1e-6)
