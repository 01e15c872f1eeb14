"""eval/experiments/output_gap.py. Oracle: Cauchy-Schwarz. The logit gap of tokens a, b at a unit-RMS hidden state u
(||u|| = sqrt(D)) is (g * (w_a - w_b)) . u, at most sqrt(D) ||g * (w_a - w_b)||, with equality exactly at
u = sqrt(D) v / ||v||, v = g * (w_a - w_b)."""
import torch

from eval.experiments.output_gap import max_logit_gap, nearest_first_token_distribution


def _layer(vocab=40, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, dim, dtype=torch.float64, generator=generator)
    gain = torch.rand(dim, dtype=torch.float64, generator=generator) + 0.5
    return weight, gain


def _gap(weight, gain, x, a, b):
    unit = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # [..., D] norm sqrt(D)
    logits = (gain * unit) @ weight.T  # [..., V]
    return logits[..., a] - logits[..., b]


def test_max_logit_gap_is_attained_and_never_exceeded():
    weight, gain = _layer()
    a, b = 3, 17
    bound = max_logit_gap(weight, gain, a, b)
    direction = gain * (weight[a] - weight[b])  # [D] the maximiser, up to scale
    torch.testing.assert_close(_gap(weight, gain, direction, a, b), torch.tensor(bound, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    samples = torch.randn(2000, weight.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gaps = _gap(weight, gain, samples, a, b)  # [2000]
    assert bool((gaps <= bound + 1e-9).all()) and bool((gaps >= -bound - 1e-9).all())


def test_nearest_first_token_distribution_beats_random_hidden_states():
    """The search minimises the cross-entropy to the target, so its result scores at least as well as any of many
    random hidden states (an invariant of a minimiser, not a pinned value)."""
    weight, gain = _layer(seed=2)
    ids = [1, 5, 9]
    target = torch.tensor([0.6, 0.3, 0.05], dtype=torch.float64)
    found = nearest_first_token_distribution(weight, gain, ids, target, steps=400, restarts=2)
    found_ce = -(target * found.log()).sum()
    samples = torch.randn(500, weight.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    unit = samples / samples.pow(2).mean(-1, keepdim=True).sqrt()
    random_ce = -(target * torch.log_softmax((gain * unit) @ weight.T, -1)[:, ids]).sum(-1)  # [500]
    assert found.shape == (3,) and bool((found > 0).all()) and float(found.sum()) <= 1 + 1e-12
    assert float(found_ce) <= float(random_ce.min()) + 1e-9
