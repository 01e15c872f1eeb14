"""Hand-written LoRA (models/lora.py) and its PEFT adapter format (models/peft.py) against closed forms, invariants and HF peft.

Oracles:
- closed form: a LoRALinear computes y = W0 x + s B A x with s = alpha / r, so dL/dB = s g (A x)^T and
  dL/dA = s B^T g x^T for an upstream gradient g = dL/dy (summed over tokens); derived by the chain rule.
- invariants: B = 0 equals the base model bit for bit (the LoRA term is exactly zero); merged equals unmerged;
  disable_lora equals the base model; a saved and re-loaded adapter gives the same logits.
- reference library: HF transformers + peft 0.21 read the adapter we write (`PeftModel.from_pretrained`) and
  write adapters we read (`get_peft_model(...).save_pretrained`); logits agree to 1e-4 (float32, eager attention).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from models import load_pretrained, save_pretrained
from models.lora import (TARGET_NAMES, AdapterError, LoRALinear, add_lora, disable_lora, load_lora_state_dict,
                         lora_modules, lora_parameters, lora_state_dict, merge_lora)
from models.peft import load_adapter, save_adapter


def tokens(batch=2, length=10, vocab=128, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_abs(a, b):
    return (a.float() - b.float()).abs().max().item()


def randomize_lora_(model, seed=1, std=0.3):
    """Give every A and B O(1)-effect random values (B = 0 would hide any mistake in the branch)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(std * torch.randn(p.shape, generator=generator))
    return model


def test_zero_B_equals_base_model_exactly(tiny_model):
    model = tiny_model()
    x = tokens()
    base = model(x)
    add_lora(model, rank=4, alpha=8, targets="all-linear")
    assert len(lora_modules(model)) == 7 * model.config.num_hidden_layers
    for module in lora_modules(model).values():
        assert torch.count_nonzero(module.lora_A.weight) > 0 and torch.count_nonzero(module.lora_B.weight) == 0
    assert torch.equal(model(x), base)


def test_lora_linear_closed_form_and_gradients():
    """y = W0 x + s B A x; dL/dB = s sum_t g_t (A x_t)^T; dL/dA = s B^T sum_t g_t x_t^T; W0 gets no gradient."""
    torch.manual_seed(0)
    weight = torch.randn(6, 5)
    layer = LoRALinear(weight.clone(), rank=3, alpha=6.0)
    with torch.no_grad():
        layer.lora_A.weight.normal_()
        layer.lora_B.weight.normal_()
    A, B, s = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone(), 6.0 / 3
    x = torch.randn(2, 4, 5)
    g = torch.randn(2, 4, 6)
    y = layer(x)
    torch.testing.assert_close(y, x @ weight.T + s * (x @ A.T) @ B.T, rtol=1e-5, atol=1e-5)
    (y * g).sum().backward()
    xs, gs = x.reshape(-1, 5), g.reshape(-1, 6)  # (tokens, in), (tokens, out)
    torch.testing.assert_close(layer.lora_B.weight.grad, s * gs.T @ (xs @ A.T), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.weight.grad, s * B.T @ gs.T @ xs, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None and not layer.weight.requires_grad


def test_swiglu_into_lora_down_projection_closed_form_and_what_it_keeps():
    """`LoRALinear.from_swiglu(gate, up)` (the MLP's down projection, `_SwiGLULoRA`) against the closed form,
    float64: p = silu(gate) * up, y = W0 p + s B A p; with g = dL/dy, g_p = W0^T g + s A^T B^T g (per token),
    dL/dB = s g (A p)^T, dL/dA = s B^T g p^T, dL/dup = g_p * silu(gate), dL/dgate = g_p * up * silu'(gate) with
    silu'(z) = sigma(z) (1 + z (1 - sigma(z))). Invariant: autograd keeps gate and up but not p (two [N, F] tensors,
    where `self(swiglu(gate, up))` keeps three). A disabled branch and no-grad take the unfused path itself; with
    dropout the Function equals the unfused modules for the same seed."""
    from models.mistral import swiglu

    torch.manual_seed(0)
    N, F_, D, r, s = 7, 12, 5, 3, 4.0 / 3
    weight = torch.randn(D, F_, dtype=torch.float64)
    layer = LoRALinear(weight.clone(), rank=r, alpha=4.0).double()
    with torch.no_grad():
        layer.lora_A.weight.normal_()
        layer.lora_B.weight.normal_()
    A, B = layer.lora_A.weight.detach().clone(), layer.lora_B.weight.detach().clone()
    gate = torch.randn(2, N, F_, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, N, F_, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, N, D, dtype=torch.float64)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        y = layer.from_swiglu(gate, up)
    activations = [shape for shape in kept if math.prod(shape) == 2 * N * F_]  # [N, F] tensors kept
    assert activations == [gate.shape, gate.shape]
    sig = torch.sigmoid(gate.detach())
    p = gate.detach() * sig * up.detach()
    torch.testing.assert_close(y, p @ weight.T + s * (p @ A.T) @ B.T, rtol=1e-12, atol=1e-12)
    (y * g).sum().backward()
    ps, gs = p.reshape(-1, F_), g.reshape(-1, D)
    grad_p = g @ weight + s * (g @ B) @ A  # (2, N, F)
    torch.testing.assert_close(layer.lora_B.weight.grad, s * gs.T @ (ps @ A.T), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.lora_A.weight.grad, s * B.T @ gs.T @ ps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(up.grad, grad_p * gate.detach() * sig, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gate.grad, grad_p * up.detach() * sig * (1 + gate.detach() * (1 - sig)),
                               rtol=1e-12, atol=1e-12)
    assert layer.weight.grad is None

    kept.clear()  # the unfused modules keep the product too: what the Function saves
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.shape) or t, lambda t: t):
        layer(swiglu(gate, up))
    assert len([shape for shape in kept if math.prod(shape) == 2 * N * F_]) == 3
    for setup in ("disabled", "no_grad"):  # the fallbacks: the unfused path itself
        other = LoRALinear(weight.clone(), rank=r, alpha=4.0).double()
        other.load_state_dict(layer.state_dict())
        other.disabled = setup == "disabled"
        with torch.no_grad() if setup == "no_grad" else torch.enable_grad():
            assert torch.equal(other.from_swiglu(gate, up), other(swiglu(gate, up))), setup

    # Dropout (training): the same mask as the unfused modules draw from the same seed, so the same values and
    # gradients; autograd keeps gate, up and the one-byte mask, not p (the unfused modules keep p too).
    dropping = LoRALinear(weight.clone(), rank=r, alpha=4.0, dropout=0.5).double().train()
    dropping.load_state_dict(layer.state_dict())
    results = []
    for fused in (True, False):
        gate.grad = up.grad = None
        dropping.zero_grad(set_to_none=True)
        kept.clear()
        torch.manual_seed(1)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append((t.dtype, t.shape)) or t, lambda t: t):
            y = dropping.from_swiglu(gate, up) if fused else dropping(swiglu(gate, up))
        (y * g).sum().backward()
        results.append([y.detach(), gate.grad, up.grad, dropping.lora_A.weight.grad, dropping.lora_B.weight.grad])
        floats = [shape for dtype, shape in kept if dtype == torch.float64 and math.prod(shape) == 2 * N * F_]
        assert len(floats) == 2 if fused else len(floats) >= 3
        assert (torch.bool, gate.shape) in kept if fused else True
    assert (results[0][0] != p @ weight.T + s * (p @ A.T) @ B.T).any()  # the mask dropped something
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_kaiming_init_matches_pytorch_linear_default():
    """A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)) (gain sqrt(2/(1+5)), bound gain*sqrt(3/in))."""
    layer = LoRALinear(torch.zeros(8, 400), rank=64, alpha=64)
    bound = 1 / math.sqrt(400)
    A = layer.lora_A.weight
    assert A.abs().max() <= bound and A.abs().max() > 0.95 * bound
    assert abs(A.var().item() - bound ** 2 / 3) < 0.05 * bound ** 2 / 3  # variance of U(-b, b) is b^2 / 3


def test_only_lora_parameters_train_and_names_are_kept(tiny_model):
    model = tiny_model()
    base_keys = set(model.state_dict())
    add_lora(model, rank=2, alpha=4, targets=("q_proj", "v_proj", "down_proj"))
    lora_keys = {f"layers.{i}.{m}.lora_{ab}.weight" for i in range(2)
                 for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for ab in "AB"}
    assert set(model.state_dict()) == base_keys | lora_keys  # base weights keep their names (torchtune's layout)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == lora_keys
    assert set(lora_state_dict(model)) == lora_keys
    assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}


def test_gradients_reach_A_and_B_only(tiny_model):
    model = randomize_lora_(add_lora(tiny_model(), rank=4, alpha=4, targets="all-linear"))
    model.train()
    F.cross_entropy(model(tokens()).flatten(0, 1), tokens(seed=1).flatten()).backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_merged_equals_unmerged_and_saves_plain_checkpoint(tiny_model, tmp_path):
    model = tiny_model()
    base_keys = set(model.state_dict())
    randomize_lora_(add_lora(model, rank=4, alpha=8, targets="all-linear"))
    x = tokens()
    with torch.no_grad():
        unmerged = model(x)
        with disable_lora(model):
            base = model(x)
        assert max_abs(unmerged, base) > 0.1  # the adapter matters, so the comparison below can fail
        merge_lora(model)
        merged = model(x)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=2e-4)  # float32 reassociation
    assert not lora_modules(model) and set(model.state_dict()) == base_keys
    save_pretrained(model, tmp_path / "merged")
    torch.testing.assert_close(load_pretrained(tmp_path / "merged")(x), merged, rtol=0, atol=0)


def test_disable_lora_is_base_model_and_restores_state(tiny_model):
    model = tiny_model()
    x = tokens()
    base = model(x)
    randomize_lora_(add_lora(model, rank=4, alpha=8))
    adapted = model(x)
    assert max_abs(adapted, base) > 0.1
    layers = list(lora_modules(model).values())
    layers[0].disabled = True  # a prior state that must survive the context
    with disable_lora(model):
        assert torch.equal(model(x), base)
        assert all(layer.disabled for layer in layers)
    assert [layer.disabled for layer in layers] == [True] + [False] * (len(layers) - 1)
    layers[0].disabled = False
    assert torch.equal(model(x), adapted)
    with pytest.raises(RuntimeError, match="inside"):
        with disable_lora(model):
            raise RuntimeError("inside")
    assert not any(layer.disabled for layer in layers)
    assert torch.equal(model(x), adapted)


def test_dropout_acts_on_lora_branch_only():
    """With B = 0 dropout cannot change the output (train equals eval equals W0 x, so the base path is not
    dropped); with B random, train output = W0 x + s B A dropout(x) for the dropout mask the same seed draws."""
    torch.manual_seed(0)
    weight = torch.randn(6, 5)
    layer = LoRALinear(weight, rank=2, alpha=2, dropout=0.5)
    x = torch.randn(3, 5)
    layer.train()
    train_zero = layer(x)
    layer.eval()
    assert torch.equal(train_zero, layer(x))
    torch.testing.assert_close(train_zero, x @ weight.T, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    A, B = layer.lora_A.weight.detach(), layer.lora_B.weight.detach()
    layer.train()
    torch.manual_seed(7)
    train_out = layer(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, 0.5, training=True)  # zeros half the entries, scales the rest by 2
    torch.testing.assert_close(train_out, x @ weight.T + (dropped @ A.T) @ B.T, rtol=1e-5, atol=1e-5)
    layer.eval()
    eval_out = layer(x)
    torch.testing.assert_close(eval_out, x @ weight.T + (x @ A.T) @ B.T, rtol=1e-5, atol=1e-5)
    assert max_abs(train_out, eval_out) > 1e-3
    # Gradients through the dropped branch (the branch's Function, which keeps x and a one-byte mask): with
    # m = dropped / x the mask scaled by 2, dL/dB = s g (A m x)^T, dL/dA = s B^T g (m x)^T, dL/dx = W0^T g + m A^T B^T g.
    layer.train()
    x.requires_grad_(True)
    g = torch.randn(3, 6)
    torch.manual_seed(7)
    (layer(x) * g).sum().backward()
    m = dropped / x.detach().masked_fill(x.detach() == 0, 1)  # 0 or 2
    torch.testing.assert_close(layer.lora_B.weight.grad, g.T @ (dropped @ A.T), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A.weight.grad, B.T @ g.T @ dropped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, g @ weight + m * ((g @ B) @ A), rtol=1e-5, atol=1e-5)


def test_lora_stays_float32_on_bf16_base(tiny_model):
    model = randomize_lora_(add_lora(tiny_model(dtype=torch.bfloat16), rank=4, alpha=8, targets="all-linear"),
                            std=0.1)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if ".lora_" in name else torch.bfloat16), name
    x = tokens()
    logits = model(x)
    logits.logsumexp(-1).mean().backward()
    assert all(p.grad.dtype == torch.float32 for p in lora_parameters(model))
    # Oracle: the same (bf16-representable) base weights and the same adapter, computed in float32 throughout;
    # bf16 rounding of the base path bounds the gap, well below the adapter's own effect on the logits.
    reference = randomize_lora_(add_lora(tiny_model(dtype=torch.bfloat16).float(), rank=4, alpha=8,
                                         targets="all-linear"), std=0.1)
    with torch.no_grad():
        expected = reference(x)
        with disable_lora(reference):
            assert max_abs(reference(x), expected) > 1.0
    tolerance = 0.05 * expected.abs().max().item()
    assert max_abs(logits, expected) < tolerance
    # merge: W0 + s B A summed in float32, then one rounding to bf16: |error| <= 2^-8 |exact| elementwise.
    exact = {name: m.weight.float() + 2.0 * m.lora_B.weight.detach() @ m.lora_A.weight.detach()
             for name, m in lora_modules(reference).items()}
    merged = merge_lora(model)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in merged.parameters())
    for name, weight in exact.items():
        got = merged.get_submodule(name).weight.float()
        assert torch.all((got - weight).abs() <= 2.0 ** -8 * weight.abs()), name
    with torch.no_grad():
        assert max_abs(merged(x), expected) < tolerance


def test_lora_state_dict_round_trip(tiny_model):
    source = randomize_lora_(add_lora(tiny_model(), rank=4, alpha=8), seed=3)
    target = add_lora(tiny_model(), rank=4, alpha=8)
    load_lora_state_dict(target, lora_state_dict(source))
    x = tokens()
    assert torch.equal(target(x), source(x))
    state = dict(lora_state_dict(source))
    state.pop("layers.0.self_attn.q_proj.lora_A.weight")
    with pytest.raises(AdapterError, match=r"missing keys: layers\.0\.self_attn\.q_proj\.lora_A\.weight"):
        load_lora_state_dict(target, state)


def test_adapter_round_trip_and_overwrite(tiny_model, tmp_path):
    model = randomize_lora_(add_lora(tiny_model(), rank=4, alpha=8, dropout=0.05, targets=("v_proj", "q_proj")))
    directory = save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.05)
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["base_model_name_or_path"] == "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no staging directory left behind
    fresh = load_adapter(tiny_model(), directory)
    assert not any(m.training for m in fresh.modules())  # new LoRA layers inherit eval mode: dropout stays off
    assert torch.equal(fresh(tokens()), model(tokens()))
    assert all(m.dropout_p == 0.05 for m in lora_modules(fresh).values())

    with pytest.raises(AdapterError, match="already exists"):
        save_adapter(model, directory)
    randomize_lora_(model, seed=5)
    save_adapter(model, directory, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert torch.equal(load_adapter(tiny_model(), directory)(tokens()), model(tokens()))


def test_adapter_loads_into_peft(hf_checkpoint, tmp_path):
    """Ours -> PEFT: our adapter, read by PeftModel.from_pretrained onto HF's model, gives our logits."""
    from peft import PeftModel

    path, hf_model = hf_checkpoint()
    ours = load_pretrained(path).eval()
    randomize_lora_(add_lora(ours, rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "up_proj")))
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(path))
    peft_model = PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    x = tokens()
    with torch.no_grad():
        expected = peft_model(x).logits
        with peft_model.disable_adapter():
            base = peft_model(x).logits
        got = ours(x)
    assert max_abs(expected, base) > 0.1  # PEFT really applied the adapter
    assert max_abs(got, expected) < 1e-4


def test_peft_adapter_loads_into_ours(hf_checkpoint, tmp_path):
    """PEFT -> ours: an adapter written by get_peft_model(...).save_pretrained, loaded by load_adapter."""
    from peft import LoraConfig, get_peft_model

    path, hf_model = hf_checkpoint()
    lora_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["o_proj", "gate_proj", "down_proj"],
                             task_type="CAUSAL_LM")
    peft_model = get_peft_model(hf_model, lora_config)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    peft_model.save_pretrained(tmp_path / "peft_adapter")
    peft_model.eval()
    x = tokens()
    with torch.no_grad():
        expected = peft_model(x).logits
        ours = load_adapter(load_pretrained(path).eval(), tmp_path / "peft_adapter")
        got = ours(x)
        with disable_lora(ours):
            base = ours(x)
    assert {m.rank for m in lora_modules(ours).values()} == {8}
    assert max_abs(expected, base) > 0.1
    assert max_abs(got, expected) < 1e-4


def test_bad_targets_and_double_add(tiny_model):
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['qkv'\]; valid targets are .*'q_proj'"):
        add_lora(tiny_model(), rank=4, alpha=8, targets=("q_proj", "qkv"))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        add_lora(tiny_model(), rank=0, alpha=8)
    model = add_lora(tiny_model(), rank=4, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        add_lora(model, rank=4, alpha=8)
    with pytest.raises(ValueError, match="no LoRA layers"):
        with disable_lora(tiny_model()):
            pass
    assert set(TARGET_NAMES) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_bad_adapters_raise_clear_errors(tiny_model, tmp_path):
    model = randomize_lora_(add_lora(tiny_model(), rank=4, alpha=8, targets=("q_proj", "v_proj")))
    directory = save_adapter(model, tmp_path / "adapter")

    with pytest.raises(AdapterError, match=r"r=4, lora_alpha=8, .* but the model's LoRA has r=2"):
        load_adapter(add_lora(tiny_model(), rank=2, alpha=8, targets=("q_proj", "v_proj")), directory)
    with pytest.raises(AdapterError, match=r"targets=\['q_proj', 'v_proj'\] but .*targets=\['q_proj'\]"):
        load_adapter(add_lora(tiny_model(), rank=4, alpha=8, targets="q_proj"), directory)
    with pytest.raises(AdapterError, match="no such adapter directory"):
        load_adapter(tiny_model(), tmp_path / "nowhere")

    weights = {k: v.clone() for k, v in load_file(directory / "adapter_model.safetensors").items()}  # not mmapped
    # Ours has a manifest (models/files.py): a file cut short is named before it is parsed.
    data = (directory / "adapter_model.safetensors").read_bytes()
    (directory / "adapter_model.safetensors").write_bytes(data[:100])
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: 100 bytes, manifest\.json says"):
        load_adapter(tiny_model(), directory)
    # Edited by hand below, like an adapter another tool wrote: without a manifest, the key checks apply.
    (directory / "manifest.json").unlink()
    save_file(weights, directory / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors: not a readable safetensors file"):
        (directory / "adapter_model.safetensors").write_bytes(data[:100])
        load_adapter(tiny_model(), directory)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert key in weights  # PEFT's naming: adapter name "default" dropped
    broken = {
        "missing keys: " + key.replace(".", r"\."): {k: v for k, v in weights.items() if k != key},
        r"unexpected keys: base_model\.model\.model\.layers\.0\.self_attn\.k_proj\.lora_A\.weight":
            weights | {key.replace("1.self_attn.v_proj.lora_B", "0.self_attn.k_proj.lora_A"): torch.zeros(4, 32)},
        r"mis-shaped tensors: .*v_proj\.lora_B\.weight: \(16, 3\), model expects \(16, 4\)":
            weights | {key: torch.zeros(16, 3)},
    }
    for message, state in broken.items():
        save_file(state, directory / "adapter_model.safetensors")
        with pytest.raises(AdapterError, match=message):
            load_adapter(tiny_model(), directory)

    (directory / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="missing adapter_model.safetensors"):
        load_adapter(tiny_model(), directory)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps(config | {"use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora=True is not supported"):
        load_adapter(tiny_model(), directory)
    (directory / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"adapter_config\.json: no such file"):
        load_adapter(tiny_model(), directory)
