"""LoRA on the output head (target "lm_head"), untied and tied (`tie_word_embeddings: true`, SmolLM2's layout).
Oracles: invariants (the fused log-probs on `output_weight(model)` equal log_softmax of the model's own forward,
which applies the head's LoRALinear; disable_lora gives the base model; merged equals unmerged; a tied head's
embedding stays W0) and HF peft / transformers (an adapter with lm_head in target_modules gives PEFT's logits, on a
tied HF model too; HF loads the merged model)."""
import json

import pytest
import torch
import torch.nn.functional as F

from models import load_pretrained, save_pretrained
from models.lora import (HEAD_TARGET, add_lora, disable_lora, lora_parameters, merge_lora, output_weight,
                         resolve_targets)
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


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_head_adapter_loads_into_peft_and_back(tied, hf_checkpoint, tmp_path):
    """Ours -> PEFT (PeftModel.from_pretrained on HF's model) gives our logits; and load_adapter reads it back. On a
    tied model (a llama with tie_word_embeddings, SmolLM2's layout) the adapter adapts the head only, as PEFT does:
    the embedding stays W0, one tensor shared with the head's base weight."""
    from peft import PeftModel

    path, hf_model = hf_checkpoint(model_type="llama", tie_word_embeddings=True) if tied else hf_checkpoint()
    assert (hf_model.lm_head.weight is hf_model.model.embed_tokens.weight) == tied
    base = load_pretrained(path).eval()
    embedding = base.embed_tokens.weight.detach().clone()
    ours = _randomize(add_lora(base, rank=4, alpha=8, targets=("v_proj", HEAD_TARGET)))
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tied  # a tied LoRA head wraps the shared tensor
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(path))
    peft_model = PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    x = _tokens(ours.config.vocab_size)
    with torch.no_grad():
        expected = peft_model(x).logits
        with peft_model.disable_adapter():
            plain = peft_model(x).logits
        got = ours(x)
        reloaded = load_adapter(load_pretrained(path).eval(), tmp_path / "adapter")(x)
    assert (expected - plain).abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reloaded, got, rtol=0, atol=0)
    torch.testing.assert_close(ours.embed_tokens.weight, embedding, rtol=0, atol=0)
    assert (output_weight(ours) - ours.embed_tokens.weight).abs().max() > 0.1


def test_merging_a_tied_head_unties_it_and_keeps_the_logits(tiny_model, tmp_path):
    """merge_lora on a tied head target gives the head its own W0 + (alpha / r) B A, keeps the embedding at W0 and
    sets tie_word_embeddings false: the same logits merged, saved and read back by us and by HF transformers.
    PEFT's merge_and_unload on the same adapter adds B A into the shared tensor (embedding included): other logits."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = tiny_model(tie_word_embeddings=True, model_type="llama")
    save_pretrained(model, tmp_path / "base")
    embedding = model.embed_tokens.weight.detach().clone()
    model = _randomize(add_lora(model, rank=4, alpha=8, targets=("v_proj", HEAD_TARGET)))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    x = _tokens(model.config.vocab_size)
    with torch.no_grad():
        adapted = model(x)
        merge_lora(model)
        merged = model(x)
    assert not model.config.tie_word_embeddings and model.lm_head.weight is not model.embed_tokens.weight
    torch.testing.assert_close(model.embed_tokens.weight, embedding, rtol=0, atol=0)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)

    save_pretrained(model, tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "merged")(x), merged, rtol=0, atol=0)
        hf = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(hf(x).logits, merged, rtol=1e-4, atol=1e-4)
        peft_merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                                tmp_path / "adapter").merge_and_unload().eval()
        assert (peft_merged(x).logits - adapted).abs().max() > 0.1
        assert (peft_merged.model.embed_tokens.weight - embedding).abs().max() > 0.1


def test_merging_other_targets_keeps_the_tie(tiny_model):
    model = _randomize(add_lora(tiny_model(tie_word_embeddings=True), rank=4, alpha=8, targets=("q_proj", "up_proj")))
    x = _tokens(model.config.vocab_size)
    with torch.no_grad():
        adapted = model(x)
        merge_lora(model)
        torch.testing.assert_close(model(x), adapted, rtol=1e-4, atol=1e-4)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.embed_tokens.weight
