"""Tied embeddings (`tie_word_embeddings: true`, SmolLM2's layout) with LoRA on the output head.

Oracles: HF peft on HF's LlamaForCausalLM (a tied head's adapter adapts the head only: PEFT's logits, with the
embedding untouched); HF transformers loading the merged model; invariants (merged equals unmerged, the embedding
stays W0, non-head targets keep the tie).
"""
import json

import torch

from models import load_pretrained, save_pretrained
from models.lora import HEAD_TARGET, add_lora, lora_parameters, merge_lora, output_weight
from models.peft import save_adapter


def _randomize(model, seed=1, std=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(std * torch.randn(p.shape, generator=generator))
    return model


def _tokens(vocab, batch=2, length=9, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_tied_head_adapter_is_pefts_and_leaves_the_embedding(hf_checkpoint, tmp_path):
    """LoRA on q_proj and the tied lm_head: PEFT, given our adapter on HF's tied model, computes our logits; the
    embedding is still W0 (the head's base weight, one shared tensor), the fused log-probs read the merged head."""
    from peft import PeftModel

    path, hf_model = hf_checkpoint(model_type="llama", tie_word_embeddings=True)
    assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    base = load_pretrained(path).eval()
    embedding = base.embed_tokens.weight.detach().clone()
    ours = _randomize(add_lora(base, rank=4, alpha=8, targets=("q_proj", HEAD_TARGET)))
    assert ours.lm_head.weight is ours.embed_tokens.weight  # the LoRA layer wraps the shared tensor, no copy
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(path))
    peft_model = PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    x = _tokens(ours.config.vocab_size)
    with torch.no_grad():
        expected = peft_model(x).logits
        with peft_model.disable_adapter():
            plain = peft_model(x).logits
        got = ours(x)
    assert (expected - plain).abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.embed_tokens.weight, embedding, rtol=0, atol=0)
    torch.testing.assert_close(output_weight(ours), ours.lm_head.merged_weight(), rtol=0, atol=0)
    assert (output_weight(ours) - embedding).abs().max() > 0.1


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
