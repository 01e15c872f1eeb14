"""How peaked can one position's next-token distribution be? A check of the reference model's output layer.

The decoder's last step is `logits = W (g * x / rms(x))`: the output head W `[V, D]` and the final RMSNorm gain g
are frozen under LoRA (it adapts the seven projections), and `x / rms(x)` has norm sqrt(D) whatever x is. So the
logit gap between tokens a and b is `(g * (w_a - w_b)) . x / rms(x)`, at most

    gap_max(a, b) = sqrt(D) * || g * (w_a - w_b) ||                                  (Cauchy-Schwarz)

for any hidden state a LoRA policy can produce. A closed form that asks two one-token options for a larger
log-ratio than that can only be met through later tokens (e.g. an unlikely EOS after one of them), which takes
probability off the options. `nearest_first_token_distribution` searches the sphere of hidden states for the
distribution over the given first tokens that is nearest a target (cross-entropy), the best any such policy can
do at that position alone.

    python -m eval.experiments.output_gap            # the main job's hardest question under DPO (README, The main job)
"""
from __future__ import annotations

import torch

from data.world import MODEL_DIR
from models import load_pretrained


def output_layer(model):
    """(W [V, D], g [D]) in float64: the output head and the final norm's gain."""
    return model.lm_head.weight.detach().double(), model.norm.weight.detach().double()


def max_logit_gap(weight, gain, a: int, b: int) -> float:
    """The largest logit(a) - logit(b) any unit-RMS hidden state gives: sqrt(D) ||g * (w_a - w_b)||."""
    return float((gain * (weight[a] - weight[b])).norm() * weight.shape[1] ** 0.5)


def nearest_first_token_distribution(weight, gain, token_ids, target, steps: int = 1500, restarts: int = 3,
                                     seed: int = 0):
    """Minimise -sum_i target_i log softmax(W (g * x / rms(x)))[token_ids[i]] over hidden states x (Adam, a few
    random restarts). target `[K]` sums to at most 1 (the rest is off the options). Returns the probabilities `[K]`
    of the token_ids at the best x found."""
    target = torch.as_tensor(target, dtype=torch.float64)
    best_loss, best = float("inf"), None
    for restart in range(restarts):
        generator = torch.Generator().manual_seed(seed + restart)
        x = torch.randn(weight.shape[1], dtype=torch.float64, generator=generator).requires_grad_()
        optimizer = torch.optim.Adam([x], lr=0.05)
        for _ in range(steps):
            unit = x / x.pow(2).mean().sqrt()  # [D] the final norm's output before its gain
            logps = torch.log_softmax(weight @ (gain * unit), dim=0)[token_ids]  # [K]
            loss = -(target * logps).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if loss.item() < best_loss:
            best_loss, best = loss.item(), logps.detach().exp()
    return best


def main() -> None:
    torch.set_num_threads(1)
    model = load_pretrained(MODEL_DIR)
    weight, gain = output_layer(model)
    # "The most important subject in school is:": Mathematics, Reading (and writing), Science, History. First tokens
    # and the DPO (alpha = beta = 0.1) closed form pi_ref p^10 from the main job's report.
    names, ids = ["Mathematics", "Reading", "Science", "History"], [1152, 813, 994, 1289]
    reference = torch.tensor([0.242, 0.19, 0.456, 0.112], dtype=torch.float64)
    population = torch.tensor([0.4, 0.35, 0.15, 0.1], dtype=torch.float64)
    closed_form = reference * population ** 10
    closed_form = closed_form / closed_form.sum()
    for b, name in zip(ids[1:], names[1:]):
        print(f"largest logit gap Mathematics - {name}: {max_logit_gap(weight, gain, ids[0], b):.2f} nats "
              f"(closed form asks {float(closed_form[0].log() - closed_form[names.index(name)].log()):.2f})")
    probs = nearest_first_token_distribution(weight, gain, ids, closed_form * 0.98)
    normalised = probs / probs.sum()
    tv = 0.5 * float((normalised - closed_form).abs().sum())
    print(f"closed form {[round(v, 4) for v in closed_form.tolist()]}; nearest first-token distribution "
          f"{[round(v, 4) for v in normalised.tolist()]} (mass {float(probs.sum()):.3f}), TV {tv:.3f}")


if __name__ == "__main__":
    main()
