"""Scale features on CPU: activation checkpointing, bfloat16 weights with float32 LoRA, and the step benchmark.

Oracles: invariants and a reference counter. Checkpointing recomputes each block in the backward pass from the
same inputs and the same RNG state (dropout included), so every LoRA gradient equals the run without it; that
it is really on is checked by what autograd saves (only block inputs, not every activation). bfloat16 keeps
the frozen weights bf16 and everything trained float32: parameters, gradients, AdamW moments, checkpoints, the
adapter; its loss equals the float32 model's up to bf16 rounding. The benchmark's analytic FLOP count
(eval/bench/step.py docstring) equals what torch.utils.flop_counter counts in the step's matrix products.
"""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.flop_counter import FlopCounterMode

import train
import spl.config as train_config
from data.batching import collate
from data.tokenization import PreferenceExample
from eval.bench import step as bench_step
from models import add_lora, load_pretrained
from spl.step import Objective, preference_step, reference_logprobs


def pairs_batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    examples = [PreferenceExample([1] + ids(5), ids(4) + [2], ids(6) + [2], 0.8, index=0),
                PreferenceExample([1] + ids(3), ids(7) + [2], ids(2) + [2], 0.6, index=1)]
    return collate(examples, pad_id=0)


def lora_model(tiny_model, dtype, dropout=0.1):
    model = add_lora(tiny_model(seed=0, dtype=dtype), rank=4, alpha=8, dropout=dropout, targets="all-linear")
    with torch.no_grad():  # off B = 0, so gradients reach A too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model.train()


def lora_grads(model, batch, ref, checkpointing):
    """One SPL step's LoRA gradients, from the same RNG state (the dropout masks)."""
    model.gradient_checkpointing = checkpointing
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    loss, _, _ = preference_step(model, batch, *ref, Objective("spl", alpha=0.3, beta=0.1), compile=False)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def saved_bytes(model, tokens, checkpointing):
    """Bytes autograd keeps for backward during one forward pass."""
    model.gradient_checkpointing = checkpointing
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.hidden_states(tokens)
    return total[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_checkpointing_gives_the_same_gradients(tiny_model, dtype):
    model = lora_model(tiny_model, dtype, dropout=0.1)
    batch = pairs_batch(model.config.vocab_size)
    ref = reference_logprobs(model, batch, compile=False)
    plain = lora_grads(model, batch, ref, checkpointing=False)
    recomputed = lora_grads(model, batch, ref, checkpointing=True)
    assert plain.keys() == recomputed.keys() and len(plain) == 2 * 7 * model.config.num_hidden_layers
    for name in plain:
        assert plain[name].dtype == torch.float32
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-6, atol=1e-7, msg=name)
    # It is on: with it autograd keeps each block's input and what lies outside the blocks; without it, every
    # block's activations (on this model 16x more).
    assert saved_bytes(model, batch["input_ids"], True) < saved_bytes(model, batch["input_ids"], False) / 4
    model.eval()  # and off where there is no backward pass: eval mode recomputes nothing
    assert saved_bytes(model, batch["input_ids"], True) == saved_bytes(model, batch["input_ids"], False)


def test_bfloat16_weights_train_float32_lora(tiny_run):
    """bf16 frozen weights, float32 LoRA: the step's dtypes, and its loss against the same model in float32."""
    losses = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = add_lora(load_pretrained(tiny_run["model"], dtype=dtype), rank=4, alpha=8, targets="all-linear")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
        batch = pairs_batch(model.config.vocab_size)
        ref = reference_logprobs(model, batch, compile=False)
        assert all(r.dtype == torch.float32 for r in ref)
        loss, _, _ = preference_step(model.train(), batch, *ref, Objective("spl", alpha=0.3, beta=0.1), compile=False)
        losses[dtype] = float(loss.detach())
        loss.backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-2)
        optimizer.step()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trainable and all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trainable)
    moments = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(trainable) and all(m.dtype == torch.float32 for m in moments)
    assert losses[torch.bfloat16] == pytest.approx(losses[torch.float32], rel=2e-2)


def test_train_bfloat16_keeps_checkpoints_and_adapter_float32(tiny_run, tmp_path):
    out = tmp_path / "run"
    argv = ["--model", str(tiny_run["model"]), "--data", str(tiny_run["data"]), "--out", str(out), "--steps", "2",
            "--batch-size", "4", "--lr", "1e-2", "--lora-rank", "4", "--no-progress", "--no-plot", "--max-length", "40",
            "--max-prompt-length", "24", "--dtype", "bfloat16", "--grad-checkpointing", "--save-every", "2"]
    assert train.main(argv) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["loss"] == r["loss"] and r["grad_norm"] > 0 for r in records)
    checkpoint = out / "checkpoints" / "step_000002"
    assert all(t.dtype == torch.float32 for t in load_file(str(checkpoint / "trainable.safetensors")).values())
    from spl.runs import load_checkpoint
    state = load_checkpoint(checkpoint)[1]["state"]
    assert state and all(s[key].dtype == torch.float32 for s in state.values() for key in ("exp_avg", "exp_avg_sq"))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in adapter.values())
    assert any(t.abs().max() > 0 for name, t in adapter.items() if "lora_B" in name)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bf16_lora_branch_equals_autograd(dropout):
    """models.lora._LoRABranch (bf16 input, float32 A and B, a given dropout mask) against the same expression
    written through autograd, B A dropout(float32(x)): the output and the gradients of x, A and B."""
    from models.lora import _LoRABranch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g).bfloat16().requires_grad_()
    A = (torch.randn(4, 16, generator=g) / 4).requires_grad_()
    B = torch.randn(8, 4, generator=g).requires_grad_()
    keep = torch.rand(2, 5, 16, generator=g) > dropout if dropout else None
    scale = 1 / (1 - dropout)
    upstream = torch.randn(2, 5, 8, generator=g)
    got = _LoRABranch.apply(x, A, B, keep, scale)
    (got * upstream).sum().backward()
    got_grads = [t.grad.clone() for t in (x, A, B)]
    for t in (x, A, B):
        t.grad = None
    x32 = x.float() * keep * scale if dropout else x.float()
    expected = F.linear(F.linear(x32, A), B)
    (expected * upstream).sum().backward()
    assert got.dtype == torch.float32 and got_grads[0].dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for got_grad, t in zip(got_grads, (x, A, B)):
        torch.testing.assert_close(got_grad, t.grad, rtol=1e-6, atol=1e-6)


def unique_saved_bytes(model, tokens):
    """Bytes of the distinct storages autograd keeps for backward during one forward pass."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.hidden_states(tokens)
    return sum(storages.values())


def test_bf16_lora_keeps_no_float32_copy_of_its_inputs(tiny_model):
    """What LoRA adds to a bf16 model's saved activations: the inputs of its layers once each in bf16 (A's gradient
    needs them; the frozen matmul alone keeps none, its weight needs no gradient), and per target u = A x (float32,
    r per token), the dropout mask (one byte per element), A and B; not a float32 copy of the input per target,
    which is what autograd through `lora_A(x.float())` keeps. The base model's own saved tensors are measured with
    LoRA disabled and the embeddings made trainable (so that its activations need gradients, as under LoRA)."""
    from models import disable_lora
    from models.lora import lora_modules

    model = lora_model(tiny_model, torch.bfloat16, dropout=0.1)
    model.embed_tokens.weight.requires_grad_(True)
    tokens = torch.randint(3, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with_lora = unique_saved_bytes(model, tokens)
    with disable_lora(model):
        base = unique_saved_bytes(model, tokens)
    N, c = tokens.numel(), model.config
    inputs = c.num_hidden_layers * N * 2 * (c.hidden_size + c.num_attention_heads * c.head_dim + c.hidden_size
                                            + c.intermediate_size)  # bf16: attention, o, MLP, down inputs
    allowed = inputs + sum(N * (4 * m.rank + m.in_features) + 4 * m.rank * (m.in_features + m.out_features)
                           for m in lora_modules(model).values())  # u, mask, A, B
    float32_copies = sum(N * 4 * m.in_features for m in lora_modules(model).values())
    assert base < with_lora <= base + allowed < base + float32_copies


def test_bfloat16_full_finetune_is_refused():
    with pytest.raises(train_config.UsageError, match="full fine-tune"):
        train_config.validate(train_config.TrainConfig(dtype="bfloat16", lora_rank=0))


@pytest.mark.parametrize("shape", [
    bench_step.Shape(dim=64, layers=2, ffn=96, heads=4, kv_heads=2, vocab=300, rank=4, pairs=2, seq=24, prompt=5),
    bench_step.Shape(dim=64, layers=3, ffn=80, heads=4, kv_heads=1, vocab=200, rank=8, pairs=1, seq=16, prompt=3),
])
def test_bench_flop_count_equals_torch_flop_counter(shape):
    """The analytic count of the step's matrix products (frozen, LoRA, output head) equals FlopCounterMode's
    mm/addmm count of one real step. (Attention is left out: torch's CPU attention kernel is not in the counter's
    registry, and the counter would count the masked half of causal attention.) The in-place addmm_ with which
    LoRA adds its update into the base output (models/lora.py) is not in the registry either; it is counted here
    as addmm is, 2 m k n for [m, k] @ [k, n]."""
    def addmm_inplace_flops(self_shape, a_shape, b_shape, out_shape=None, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    step = bench_step.ours_step(shape, torch.float32, torch.device("cpu"), None, False, False)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_inplace_flops}) as counter:
        step()
    counted = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    matmuls = counted.get("aten.mm", 0) + counted.get("aten.addmm", 0) + counted.get("aten.addmm_", 0)
    flops = bench_step.step_flops(shape)
    assert flops["frozen"] + flops["lora"] + flops["head"] == matmuls
    assert flops["total"] == matmuls + flops["attention"]


def test_bench_step_smoke(capsys):
    """eval/bench/step.py runs scaled down on CPU and reports a consistent record (its main, in this process: the
    script's own start is one import of torch)."""
    bench_step.main(["--device", "cpu", "--scale", "0.03125", "--vocab", "512", "--compile", "off", "--iters", "1",
                     "--matmul-size", "256", "--profile", "5"])
    stdout = capsys.readouterr().out
    record = json.loads(stdout.strip().splitlines()[-1])
    assert (record["dim"], record["heads"], record["layers"], record["seq"], record["vocab"]) == (128, 1, 1, 32, 512)
    assert record["tokens"] == 2 * record["pairs"] * record["seq"] and record["time_ms"] > 0
    assert record["tokens_per_s"] == pytest.approx(record["tokens"] / record["cpu_time_ms"] * 1000)  # CPU: per CPU s
    assert 0 < record["mfu"] and record["peak_mb"] > 0 and record["first_loss"] > 0
    assert "MFU" in stdout
    # --profile: the step's self CPU time by group, shares of one whole; the GEMMs are a group of their own
    assert sum(record["profile"].values()) == pytest.approx(1.0) and record["profile"]["matmul"] > 0
    assert set(record["matmul_tflops_per_s_by_layout"]) == {"a @ b", "a @ b.T", "a.T @ b"}
    assert record["matmul_tflops_per_s"] == max(record["matmul_tflops_per_s_by_layout"].values())
