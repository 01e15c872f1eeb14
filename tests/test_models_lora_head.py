"""LoRA on the output head (target "lm_head"). Oracles: invariants (the fused log-probs on `output_weight(model)`
equal log_softmax of the model's own forward, which applies the head's LoRALinear; disable_lora gives the base
model) and HF peft (an adapter with lm_head in target_modules gives PEFT's logits)."""
import pytest
import torch
import torch.nn.functional as F

from models import load_pretrained
from models.lora import HEAD_TARGET, add_lora, disable_lora, lora_parameters, output_weight, resolve_targets
from models.peft import load_adapter, save_adapter
from spl.logprobs import sequence_logprobs


def _randomize(model, seed=1, std=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(std * torch.randn(p.shape, generator=generator))
    return model


def _tokens(vocab, batch=2, length=9, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_fused_logprobs_on_output_weight_equal_the_forward_values_and_gradients(tiny_model):
    model = _randomize(add_lora(tiny_model(), rank=4, alpha=8, targets=("q_proj", HEAD_TARGET)))
    x = _tokens(model.config.vocab_size)
    inputs, targets = x[:, :-1], x[:, 1:]
    mask = torch.ones_like(targets, dtype=torch.float32)
    mask[0, :3] = 0  # a prompt part

    naive = (F.log_softmax(model(inputs), -1).gather(-1, targets[..., None])[..., 0] * mask).sum(-1)  # [B]
    naive_grads = torch.autograd.grad(naive.sum(), lora_parameters(model))
    fused = sequence_logprobs(model.hidden_states(inputs), output_weight(model), targets, mask, compile=False)  # [B]
    fused_grads = torch.autograd.grad(fused.sum(), lora_parameters(model))
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-5)
    for got, expected in zip(fused_grads, naive_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert float(naive_grads[-1].abs().max()) > 0  # the head's B really gets a gradient


def test_disabled_head_is_the_base_weight_and_model(tiny_model):
    base = tiny_model()
    x = _tokens(base.config.vocab_size)
    with torch.no_grad():
        expected = base(x)
    model = _randomize(add_lora(tiny_model(), rank=4, alpha=8, targets=(HEAD_TARGET,)))
    with torch.no_grad():
        assert (model(x) - expected).abs().max() > 0.1
        with disable_lora(model):
            assert output_weight(model) is model.lm_head.weight
            torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(output_weight(model), model.lm_head.merged_weight(), rtol=0, atol=0)


def test_head_target_rules(tiny_model):
    assert HEAD_TARGET not in resolve_targets("all-linear")  # PEFT's rule: all-linear leaves the head out
    assert resolve_targets([HEAD_TARGET, "q_proj"]) == ("q_proj", HEAD_TARGET)
    with pytest.raises(ValueError, match="needs dropout 0"):
        add_lora(tiny_model(), rank=4, alpha=8, dropout=0.1, targets=("q_proj", HEAD_TARGET))
    plain = tiny_model()
    assert output_weight(plain) is plain.lm_head.weight


def test_head_adapter_loads_into_peft_and_back(hf_checkpoint, tmp_path):
    """Ours -> PEFT (PeftModel.from_pretrained on HF's model) gives our logits; and load_adapter reads it back."""
    from peft import PeftModel

    path, hf_model = hf_checkpoint()
    ours = _randomize(add_lora(load_pretrained(path).eval(), rank=4, alpha=8, targets=("v_proj", HEAD_TARGET)))
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(path))
    peft_model = PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    x = _tokens(ours.config.vocab_size)
    with torch.no_grad():
        expected = peft_model(x).logits
        with peft_model.disable_adapter():
            base = peft_model(x).logits
        got = ours(x)
        reloaded = load_adapter(load_pretrained(path).eval(), tmp_path / "adapter")(x)
    assert (expected - base).abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reloaded, got, rtol=0, atol=0)
