"""The decoder against HF transformers, and its config against HF's config.json layouts.

Oracle: HF transformers' `MistralForCausalLM` / `LlamaForCausalLM` (eager attention, float32), loaded from nothing
but the config and the random weights it saved itself with `save_pretrained`; our model reads that directory with
`load_pretrained`. Weights are O(1) (conftest.randomize_weights_), so each architectural detail moves the logits
by far more than the 1e-4 tolerance; `test_rope_theta_both_layouts` checks that explicitly for theta.
"""
import json
import re

import pytest
import torch

from models import CheckpointError, ConfigError, MistralConfig, load_pretrained

ATOL = 1e-4  # float32, two layers, O(1) activations: observed differences are ~1e-6


def tokens(batch=2, length=12, vocab=128, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))  # (B, T)


def esc(path):
    """A path as a literal inside an error-message regex."""
    return re.escape(str(path))


def max_abs(a, b):
    return (a - b).abs().max().item()


# Each case is one architectural feature; the sequence (T = 12) is longer than every sliding window used.
CASES = {
    "gqa_sliding_window": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
    "multi_query_window_of_one": dict(num_attention_heads=4, num_key_value_heads=1, sliding_window=1),
    "explicit_head_dim": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=7),
    "full_attention": dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=None),
    "tied_embeddings": dict(tie_word_embeddings=True, sliding_window=6),
    "sharded": dict(sliding_window=5, max_shard_size="20KB"),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_match_hf(case, hf_checkpoint):
    """Our logits on HF's own checkpoint equal HF's logits within 1e-4 max-abs (float32, eager attention)."""
    overrides = dict(CASES[case])
    path, hf_model = hf_checkpoint(**overrides)
    if case == "sharded":
        assert len(list(path.glob("model-*.safetensors"))) > 1 and (path / "model.safetensors.index.json").is_file()
    if case == "explicit_head_dim":
        assert hf_model.config.head_dim == 16 != hf_model.config.hidden_size // hf_model.config.num_attention_heads
    model = load_pretrained(path)
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), hf_model(x).logits  # (B, T, V)
    assert ours.shape == theirs.shape == (2, 12, 128)
    assert max_abs(ours, theirs) < ATOL


def test_llama_checkpoint_matches_hf(hf_checkpoint):
    """A `model_type: llama` checkpoint saved by HF's LlamaForCausalLM loads (no sliding window) and matches it."""
    path, hf_model = hf_checkpoint(model_type="llama", num_key_value_heads=2)
    model = load_pretrained(path)
    assert model.config.model_type == "llama" and model.config.sliding_window is None
    x = tokens(length=20)
    with torch.no_grad():
        assert max_abs(model(x), hf_model(x).logits) < ATOL


def _rewrite_config(path, top_level: bool, theta: float):
    """Rewrite the saved config.json into one layout: `rope_theta` at the top level (older files), or only under
    `rope_parameters` (newer files)."""
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_theta", None)
    config.pop("rope_parameters", None)
    if top_level:
        config["rope_theta"] = theta
    else:
        config["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("top_level", [True, False], ids=["top_level_rope_theta", "rope_parameters"])
def test_rope_theta_both_layouts(top_level, hf_checkpoint):
    """theta = 1e6 (Mistral v0.2) read from either config.json layout gives HF's logits; HF itself reads the
    rewritten file back to the same theta; and the default theta 1e4 would miss by far more than the tolerance,
    so the comparison can tell the two apart."""
    from transformers import AutoConfig

    path, hf_model = hf_checkpoint(rope_parameters={"rope_theta": 1e6, "rope_type": "default"}, sliding_window=6)
    _rewrite_config(path, top_level, 1e6)
    assert AutoConfig.from_pretrained(path).rope_parameters["rope_theta"] == 1e6
    model = load_pretrained(path)
    assert model.config.rope_theta == 1e6
    x = tokens(length=16)
    with torch.no_grad():
        theirs = hf_model(x).logits
        assert max_abs(model(x), theirs) < ATOL
        model.config.rope_theta = 1e4  # negative control: the wrong theta is detected
        assert max_abs(model(x), theirs) > 100 * ATOL


def test_hidden_states_and_head_match_hf(hf_checkpoint):
    """`hidden_states` is the final-norm output (HF's `.model(...).last_hidden_state`, also the last entry of
    `output_hidden_states`), `lm_head.weight` is HF's output head, and logits = hidden @ lm_head.weight.T."""
    path, hf_model = hf_checkpoint(sliding_window=5)
    model = load_pretrained(path)
    x = tokens()
    with torch.no_grad():
        hidden = model.hidden_states(x)  # (B, T, D)
        hf_out = hf_model(x, output_hidden_states=True)
        assert hidden.shape == (2, 12, 32)
        assert max_abs(hidden, hf_model.model(x).last_hidden_state) < ATOL
        assert max_abs(hidden, hf_out.hidden_states[-1]) < ATOL
        assert torch.equal(model.lm_head.weight, hf_model.lm_head.weight)
        assert max_abs(hidden @ model.lm_head.weight.T, model(x)) < 1e-5


def test_gradients_match_hf(hf_checkpoint):
    """Backward through our model equals HF's: the same scalar loss (cross-entropy on next tokens plus a random
    linear functional of the logits, so every logit gets a gradient) gives the same gradients for the
    embedding, a query projection (RoPE path), a key projection (GQA sum over shared heads) and the last MLP."""
    path, hf_model = hf_checkpoint(sliding_window=5)
    model = load_pretrained(path)
    x = tokens()
    weights = torch.randn(2, 12, 128, generator=torch.Generator().manual_seed(1)) / 100  # (B, T, V)

    def loss_of(logits):
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), x[:, 1:].reshape(-1))
        return ce + (logits * weights).sum()

    loss_of(model(x)).backward()
    loss_of(hf_model(x).logits).backward()
    pairs = {"embed_tokens.weight": "model.embed_tokens.weight",
             "layers.0.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj.weight",
             "layers.0.self_attn.k_proj.weight": "model.layers.0.self_attn.k_proj.weight",
             "layers.1.mlp.down_proj.weight": "model.layers.1.mlp.down_proj.weight"}
    ours, theirs = dict(model.named_parameters()), dict(hf_model.named_parameters())
    for our_name, hf_name in pairs.items():
        assert ours[our_name].grad.abs().max() > 1e-3  # a gradient that actually flows
        torch.testing.assert_close(ours[our_name].grad, theirs[hf_name].grad, atol=1e-4, rtol=1e-4)


def test_bfloat16_forward(hf_checkpoint):
    """In bf16 our model runs and returns float32 logits close to the float32 ones, and as close as HF's bf16.

    Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.002 per op); through two layers of
    O(1) activations the error compounds to a few percent of the logit scale, so |bf16 - fp32| <= 0.05 *
    max|logits|. The sharper check is relative to HF: our bf16 error is at most twice HF's bf16 error
    (plus a small floor), and our bf16 logits are within the same 0.05 * max|logits| of HF's bf16 logits.
    """
    import transformers

    path, hf_model = hf_checkpoint(sliding_window=5)
    x = tokens()
    model32 = load_pretrained(path)
    model16 = load_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
    hf16 = transformers.MistralForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                           attn_implementation="eager").eval()
    with torch.no_grad():
        exact = model32(x)  # (B, T, V)
        ours = model16(x)
        theirs = hf16(x).logits.float()
    assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
    scale = exact.abs().max().item()
    our_error, hf_error = max_abs(ours, exact), max_abs(theirs, exact)
    assert our_error <= 0.05 * scale
    assert our_error <= 2 * hf_error + 0.01 * scale
    assert max_abs(ours, theirs) <= 0.05 * scale
    assert our_error > 0  # bf16 is really in use (a silent float32 upcast would pass the bounds trivially)


# --- config.json ---

def _hf_dict(**overrides):
    """A minimal Mistral config.json as a dict."""
    hf = dict(model_type="mistral", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, sliding_window=4096,
              rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    return hf | overrides


def test_config_layouts_head_dim_and_window():
    """Both rope_theta layouts give the same value; head_dim absent means hidden/heads, explicit wins even when it
    differs; sliding_window null means full attention, an int is kept; llama never has a window."""
    newer = MistralConfig.from_hf_dict(_hf_dict())
    older = MistralConfig.from_hf_dict(_hf_dict(rope_parameters=None, rope_theta=1e6))
    assert newer.rope_theta == older.rope_theta == 1e6
    absent_theta = _hf_dict()
    del absent_theta["rope_parameters"]
    assert MistralConfig.from_hf_dict(absent_theta).rope_theta == 1e4  # HF's default when neither is given
    assert newer.head_dim == 8
    assert MistralConfig.from_hf_dict(_hf_dict(head_dim=16)).head_dim == 16
    assert MistralConfig.from_hf_dict(_hf_dict(head_dim=None)).head_dim == 8
    assert MistralConfig.from_hf_dict(_hf_dict(sliding_window=None)).sliding_window is None
    assert newer.sliding_window == 4096
    assert MistralConfig.from_hf_dict(_hf_dict(model_type="llama", sliding_window=7)).sliding_window is None


def test_config_round_trips_through_hf_dict():
    """to_hf_dict -> from_hf_dict is the identity, and HF transformers reads to_hf_dict as the same architecture."""
    from transformers import MistralConfig as HFMistralConfig

    config = MistralConfig.from_hf_dict(_hf_dict(head_dim=16, sliding_window=9, tie_word_embeddings=True))
    assert MistralConfig.from_hf_dict(config.to_hf_dict()) == config
    hf = HFMistralConfig(**{k: v for k, v in config.to_hf_dict().items() if k != "rope_theta"})
    assert (hf.head_dim, hf.sliding_window, hf.rope_parameters["rope_theta"], hf.tie_word_embeddings) == (
        16, 9, 1e6, True)


@pytest.mark.parametrize("model_type", ["mixtral", "gpt2"])
def test_config_refuses_other_model_types(model_type, tmp_path):
    """Another architecture is refused with the file named, by from_json and by load_pretrained."""
    (tmp_path / "config.json").write_text(json.dumps(_hf_dict(model_type=model_type)))
    with pytest.raises(ConfigError, match=rf"{esc(tmp_path / 'config.json')}.*model_type '{model_type}'"):
        MistralConfig.from_json(tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=rf"config\.json.*'{model_type}' is not supported"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("scaling", [
    {"rope_parameters": {"rope_theta": 1e6, "rope_type": "linear", "factor": 2.0}},
    {"rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0}},
    {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
], ids=["linear", "yarn", "legacy_rope_scaling"])
def test_config_refuses_rope_scaling(scaling, tmp_path):
    """RoPE scaling would change every position's angle; it is refused, not ignored, naming the file."""
    (tmp_path / "config.json").write_text(json.dumps(_hf_dict(**scaling)))
    with pytest.raises(ConfigError, match=rf"{esc(tmp_path / 'config.json')}: RoPE scaling .* is not supported"):
        MistralConfig.from_json(tmp_path / "config.json")


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(attention_bias=True), "attention_bias: true is not supported"),
    (dict(num_key_value_heads=3), r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    (dict(head_dim=7), "head_dim must be even"),
    (dict(sliding_window=0), "sliding_window must be null or a positive integer"),
    (dict(vocab_size=None), r"missing key|vocab_size must be a positive integer"),
], ids=["activation", "bias", "gqa_ratio", "odd_head_dim", "zero_window", "vocab"])
def test_config_refuses_impossible_values(overrides, message):
    """Impossible or unbuilt architectures fail at load with the key named."""
    hf = _hf_dict(**overrides)
    if overrides.get("vocab_size", 0) is None:
        del hf["vocab_size"]
    with pytest.raises(ConfigError, match=rf"^config\.json: .*{message}"):
        MistralConfig.from_hf_dict(hf)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_gradients_are_autograds_bit_for_bit(dtype):
    """Oracle: autograd on the plain expression `F.silu(gate) * up`. The memory-saving `swiglu` (silu recomputed
    in the backward pass) gives the same output and the same gate and up gradients, bit for bit (torch.equal),
    in float32 and bfloat16; and it keeps two [N, F] tensors for the backward pass, not three."""
    from models.mistral import swiglu

    generator = torch.Generator().manual_seed(0)
    gate, up, grad = (torch.randn(7, 33, generator=generator).to(dtype) for _ in range(3))
    plain = [t.clone().requires_grad_() for t in (gate, up)]
    ours = [t.clone().requires_grad_() for t in (gate, up)]
    expected = torch.nn.functional.silu(plain[0]) * plain[1]
    result = swiglu(*ours)
    expected.backward(grad)
    result.backward(grad)
    assert torch.equal(result, expected)
    for mine, reference in zip(ours, plain):
        assert torch.equal(mine.grad, reference.grad)

    def saved_elements(output):
        seen, total, stack = set(), 0, [output.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            total += sum(getattr(node, name).numel() for name in dir(node)
                         if name.startswith("_saved_") and isinstance(getattr(node, name), torch.Tensor))
            total += sum(t.numel() for t in getattr(node, "saved_tensors", ()))
            stack.extend(next_node for next_node, _ in node.next_functions)
        return total

    fresh = [t.clone().requires_grad_() for t in (gate, up)]
    assert saved_elements(swiglu(*fresh)) == 2 * gate.numel()
    assert saved_elements(torch.nn.functional.silu(fresh[0]) * fresh[1]) == 3 * gate.numel()


def test_swiglu_model_gradients_unchanged(monkeypatch):
    """Oracle: the same model with the plain `F.silu(gate) * up` in its MLP. A two-layer model with LoRA on every
    projection gives the same loss and the same LoRA gradients, bit for bit, in float32."""
    import models.mistral as mistral
    from models import add_lora, build_model
    from models.lora import TARGET_NAMES

    config = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5,
                           rope_theta=1e4, sliding_window=None, tie_word_embeddings=True,
                           max_position_embeddings=64)

    def gradients():
        torch.manual_seed(0)  # LoRA's A draws from the global generator
        model = add_lora(build_model(config, seed=0), 4, 8.0, 0.0, TARGET_NAMES)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        loss = model(tokens()).log_softmax(-1)[..., 5].sum()
        loss.backward()
        return loss, {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    loss, grads = gradients()
    monkeypatch.setattr(mistral, "swiglu", lambda gate, up: torch.nn.functional.silu(gate) * up)
    plain_loss, plain_grads = gradients()
    assert torch.equal(loss, plain_loss) and grads.keys() == plain_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], plain_grads[name]), name
