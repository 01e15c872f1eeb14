"""HF-format checkpoint I/O: what we write, HF transformers reads; what is wrong on disk fails with its path named.

Oracles: HF transformers' `from_pretrained` on directories our `save_pretrained` wrote (same logits as our model
within 1e-4); exact round trips (save -> load gives bit-identical tensors); and for bad input, the error's text,
which must name the file or key that is wrong.
"""
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from models import CheckpointError, load_pretrained, save_pretrained

ATOL = 1e-4


def tokens(batch=2, length=12, vocab=128, seed=0):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))  # (B, T)


def hf_load(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def esc(path):
    """A path as a literal inside an error-message regex."""
    return re.escape(str(path))


def listing(directory):
    """{relative path: bytes} of every file under `directory`."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# --- what we write, HF reads ---

SAVE_CASES = {
    "single_file": (dict(sliding_window=5), None),
    "sharded": (dict(sliding_window=5), 20_000),
    "tied": (dict(tie_word_embeddings=True, sliding_window=None), None),
    "tied_sharded_head_dim": (dict(tie_word_embeddings=True, head_dim=16, num_key_value_heads=1), 20_000),
    "llama": (dict(model_type="llama"), None),
}


@pytest.mark.parametrize("case", SAVE_CASES)
def test_save_then_hf_from_pretrained(case, tiny_model, tmp_path):
    """HF transformers loads what `save_pretrained` wrote into the same architecture: same logits within 1e-4;
    sharded saves are split into several files with an index; tied saves keep one tensor."""
    overrides, max_shard_bytes = SAVE_CASES[case]
    model = tiny_model(rope_theta=1e6, **overrides)
    path = save_pretrained(model, tmp_path / "ours", max_shard_bytes=max_shard_bytes)
    shards = sorted(path.glob("model-*-of-*.safetensors"))
    if max_shard_bytes is None:
        assert (path / "model.safetensors").is_file() and not shards
    else:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    hf_model = hf_load(path)
    expected_class = "LlamaForCausalLM" if case == "llama" else "MistralForCausalLM"
    assert type(hf_model).__name__ == expected_class
    assert hf_model.config.rope_parameters["rope_theta"] == 1e6
    if model.config.tie_word_embeddings:
        assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()
    x = tokens(length=16)
    with torch.no_grad():
        assert (model(x) - hf_model(x).logits).abs().max().item() < ATOL


@pytest.mark.parametrize("tied, max_shard_bytes", [(False, None), (True, 20_000)], ids=["untied", "tied_sharded"])
def test_round_trip_is_exact(tied, max_shard_bytes, tiny_model, tmp_path):
    """save -> load gives the same config and bit-identical tensors; a tied head stays one shared tensor."""
    model = tiny_model(tie_word_embeddings=tied, sliding_window=7, head_dim=16)
    loaded = load_pretrained(save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=max_shard_bytes))
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    assert not any(p.is_meta for p in loaded.parameters())


def test_load_with_dtype(tiny_model, tmp_path):
    """dtype=bfloat16 gives exactly the float32 weights rounded to bfloat16; a bf16 save records its dtype and
    HF reads it back with the same weights."""
    model = tiny_model(tie_word_embeddings=True)
    path = save_pretrained(model, tmp_path / "f32")
    loaded = load_pretrained(path, dtype=torch.bfloat16)
    for (name, p), q in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert q.dtype == torch.bfloat16 and torch.equal(q, p.to(torch.bfloat16)), name
    path16 = save_pretrained(loaded, tmp_path / "bf16")
    assert json.loads((path16 / "config.json").read_text())["dtype"] == "bfloat16"
    hf_model = hf_load(path16, dtype=torch.bfloat16)
    assert torch.equal(hf_model.model.layers[1].mlp.up_proj.weight, loaded.layers[1].mlp.up_proj.weight)


def test_tied_checkpoint_that_also_stores_the_head(hf_checkpoint):
    """Some tied checkpoints store lm_head.weight too. A stored copy equal to the embedding loads tied, with HF's
    logits on the same directory; a different one is refused (HF transformers would silently untie the two,
    making the model something other than what config.json says)."""
    path, hf_model = hf_checkpoint(tie_word_embeddings=True)
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    model = load_pretrained(path)
    assert model.lm_head.weight is model.embed_tokens.weight
    x = tokens()
    with torch.no_grad():
        assert (model(x) - hf_model(x).logits).abs().max().item() < ATOL
    del model  # its weights are memory-mapped from the file rewritten below

    weights["lm_head.weight"][3, 5] += 1.0
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"^{esc(path)}: tie_word_embeddings is true but lm_head\.weight "
                                              r"\(model\.safetensors\) differs from model\.embed_tokens\.weight"):
        load_pretrained(path)


# --- what is wrong on disk fails, naming it ---

def _edit_weights(path, edit):
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match=rf"^{esc(tmp_path / 'nowhere')}: no such model directory$"):
        load_pretrained(tmp_path / "nowhere")


def test_missing_config(hf_checkpoint):
    path, _ = hf_checkpoint()
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match=rf"^{esc(path)}: missing config\.json$"):
        load_pretrained(path)


def test_invalid_config_json(hf_checkpoint):
    path, _ = hf_checkpoint()
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"^{esc(path / 'config.json')}: not valid JSON"):
        load_pretrained(path)


def test_missing_weight_file(hf_checkpoint):
    path, _ = hf_checkpoint()
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError,
                       match=rf"^{esc(path)}: no model\.safetensors or model\.safetensors\.index\.json$"):
        load_pretrained(path)


def test_pytorch_bin_only_is_refused_with_a_hint(hf_checkpoint):
    path, _ = hf_checkpoint()
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"found pytorch_model\.bin: only safetensors is read"):
        load_pretrained(path)


def test_wrong_shaped_tensor(hf_checkpoint):
    """A tensor whose shape disagrees with config.json names the key, both shapes and the file."""
    path, _ = hf_checkpoint()
    _edit_weights(path, lambda w: w.update({"model.layers.1.self_attn.k_proj.weight": torch.zeros(8, 32)}))
    with pytest.raises(CheckpointError, match=rf"^{esc(path)}: mis-shaped tensors: "
                                              r"model\.layers\.1\.self_attn\.k_proj\.weight: \(8, 32\) in "
                                              r"model\.safetensors, config expects \(16, 32\)$"):
        load_pretrained(path)


def test_unknown_key(hf_checkpoint):
    path, _ = hf_checkpoint()
    _edit_weights(path, lambda w: w.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}))
    with pytest.raises(CheckpointError,
                       match=rf"^{esc(path)}: unexpected keys: "
                             r"model\.layers\.0\.self_attn\.q_proj\.bias \(model\.safetensors\)$"):
        load_pretrained(path)


def test_missing_key(hf_checkpoint):
    path, _ = hf_checkpoint()
    _edit_weights(path, lambda w: w.pop("model.layers.1.post_attention_layernorm.weight"))
    with pytest.raises(CheckpointError,
                       match=rf"^{esc(path)}: missing keys: model\.layers\.1\.post_attention_layernorm\.weight$"):
        load_pretrained(path)


def test_all_problems_reported_together(hf_checkpoint):
    """One error lists every problem at once, so a bad conversion is fixed in one round."""
    path, _ = hf_checkpoint()

    def edit(weights):
        weights.pop("model.norm.weight")
        weights["model.extra.weight"] = torch.zeros(1)
        weights["lm_head.weight"] = torch.zeros(3, 32)
    _edit_weights(path, edit)
    with pytest.raises(CheckpointError) as error:
        load_pretrained(path)
    message = str(error.value)
    assert "missing keys: model.norm.weight" in message
    assert "unexpected keys: model.extra.weight (model.safetensors)" in message
    assert "mis-shaped tensors: lm_head.weight: (3, 32)" in message


def test_shard_listed_in_index_but_absent(hf_checkpoint):
    path, _ = hf_checkpoint(max_shard_size="20KB")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError,
                       match=rf"^{esc(path / 'model.safetensors.index.json')}: shard files missing: {esc(shard)}$"):
        load_pretrained(path)


def test_corrupt_index(hf_checkpoint):
    path, _ = hf_checkpoint(max_shard_size="20KB")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a valid safetensors index"):
        load_pretrained(path)


def test_save_refuses_existing_directory_and_leaves_it_untouched(tiny_model, tmp_path):
    """An existing directory (here: a previous checkpoint) is refused, byte for byte unchanged, and no staging
    directory is left beside it."""
    target = save_pretrained(tiny_model(seed=1), tmp_path / "ckpt")
    before = listing(tmp_path)
    with pytest.raises(CheckpointError, match=rf"^{esc(target)}: already exists; refusing to overwrite$"):
        save_pretrained(tiny_model(seed=2), target)
    assert listing(tmp_path) == before


def test_failed_save_leaves_nothing(tiny_model, tmp_path):
    """A parameter with no HF name (e.g. an unmerged LoRA layer) fails the save before anything is written, and an
    error while writing removes the staging directory: the target never exists half-written."""
    model = tiny_model()
    model.layers[0].self_attn.q_proj.register_parameter("lora_A", torch.nn.Parameter(torch.zeros(2, 32)))
    with pytest.raises(CheckpointError, match=r"^layers\.0\.self_attn\.q_proj\.lora_A: no HF name"):
        save_pretrained(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(FileNotFoundError):
        save_pretrained(tiny_model(), tmp_path / "ckpt2", tokenizer_path=tmp_path / "no_tokenizer.model")
    assert list(tmp_path.iterdir()) == []


def test_saved_directory_has_ordinary_permissions(tiny_model, tmp_path):
    """A saved model is staged in a private temporary directory; once published it must have the modes a
    plain mkdir/open give under the process umask (others can read and serve it)."""
    import os
    import stat

    umask = os.umask(0o022)
    try:
        path = save_pretrained(tiny_model(), tmp_path / "m")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {0o644}


def test_all_finite_equals_isfinite_all():
    """The loader's one-pass check against its definition, `torch.isfinite(t).all()`: NaN, +inf and -inf at the
    first, a middle and the last entry, in every floating dtype a checkpoint holds, and the empty tensor."""
    from models.checkpoint import all_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        base = torch.randn(7, 13).to(dtype)
        assert all_finite(base) and all_finite(base[:0])
        for bad in (float("nan"), float("inf"), float("-inf")):
            for index in (0, 45, 90):
                t = base.clone().view(-1)
                t[index] = bad
                assert all_finite(t) == bool(torch.isfinite(t).all()) is False, (dtype, bad, index)
