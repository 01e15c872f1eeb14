"""train.py and sample.py on tiny random checkpoints whose only tokenizer is a byte-level BPE file.

Two checkpoints as users have them: one carrying only Mistral's tekken.json (the real tekken_240911.json from the
mistral-common wheel, 131072 ids), one carrying tokenizer.json + tokenizer_config.json + chat_template.jinja as
transformers 5's save_pretrained writes them (a BPE trained here, the SmolLM2 ChatML template). Oracles:
mistral-common's and transformers' apply_chat_template ids for what sample.py feeds the model; the invariant that a
refused run leaves no run directory; the reference-cache key's tokenizer hash against the file's sha256. The
weights are random (1 layer, hidden 16): only the plumbing is under test.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import sample
import train
from models import MistralConfig, build_model, save_pretrained
from models.files import file_sha256
from models.tokenizer import load_tokenizer

mistral_common = pytest.importorskip("mistral_common")
pytest.importorskip("tokenizers")
from test_models_bpe import mistral_common_ids, mistral_common_tekkenizer, train_tokenizer_json  # noqa: E402
from test_train_formats import pairs, run_args  # noqa: E402,F401  (tests/ is on sys.path under pytest)

DATA = Path(mistral_common.__file__).parent / "data"
TEKKEN = DATA / "tekken_240911.json"
TEMPLATE = Path(__file__).parent / "fixtures" / "chat_templates" / "smollm2.jinja"


def config(vocab_size: int) -> MistralConfig:
    return MistralConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e6,
                         sliding_window=None, tie_word_embeddings=False, max_position_embeddings=256)


def tekken_checkpoint(directory: Path, vocab_size: int = 131072) -> Path:
    save_pretrained(build_model(config(vocab_size), seed=0), directory)
    shutil.copy(TEKKEN, directory / "tekken.json")
    return directory


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """tokenizer.json, tokenizer_config.json and chat_template.jinja, written by transformers 5's save_pretrained
    from a BPE trained here (SmolLM2's pre-tokenizer) with SmolLM2's ChatML template."""
    import transformers

    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer_json("smollm2"),
                                              bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")
    hf.chat_template = TEMPLATE.read_text(encoding="utf-8")
    directory = tmp_path_factory.mktemp("hf_tokenizer")
    hf.save_pretrained(directory)
    return directory, transformers.AutoTokenizer.from_pretrained(directory)


def hf_checkpoint(directory: Path, tokenizer_dir: Path, vocab_size: int) -> Path:
    save_pretrained(build_model(config(vocab_size), seed=0), directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def sample_prompt_ids(model: Path, capsys, prompt: str) -> tuple[list[int], str]:
    assert sample.main(["--model", str(model), "--prompt", prompt, "--max-new-tokens", "2", "--threads", "1",
                        "--json"]) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.splitlines()[0])["prompt_ids"], captured.err


def test_tekken_checkpoint_trains_and_samples(tmp_path, pairs, capsys):
    model = tekken_checkpoint(tmp_path / "model")
    assert train.main(run_args(model, pairs, tmp_path / "run")) == 0
    assert ("tokenizer: tekken.json (tekken, 131072 ids); chat format: mistral-v3 (no chat_template; config.version "
            "v3 of tekken.json)") in capsys.readouterr().out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    prompt = "Héllo 日本語, say [INST] and </s> 123!"
    prompt_ids, err = sample_prompt_ids(model, capsys, prompt)
    assert prompt_ids == mistral_common_ids(mistral_common_tekkenizer(TEKKEN), "v3",
                                            [{"role": "user", "content": prompt}])
    assert "chat format: mistral-v3" in err


def test_tokenizer_json_checkpoint_trains_and_samples(tmp_path, pairs, capsys, hf_tokenizer_dir):
    tokenizer_dir, hf = hf_tokenizer_dir
    model = hf_checkpoint(tmp_path / "model", tokenizer_dir, len(hf))
    assert not (model / "tokenizer.model").exists()
    assert train.main(run_args(model, pairs, tmp_path / "run")) == 0
    assert (f"tokenizer: tokenizer.json (tokenizer.json (byte-level BPE), {len(hf)} ids); chat format: chatml "
            f"(chat_template in chat_template.jinja)") in capsys.readouterr().out
    prompt = "Which pet is best? 42 cats"
    prompt_ids, err = sample_prompt_ids(model, capsys, prompt)
    assert prompt_ids == hf.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
    assert "chat format: chatml" in err


def test_full_fine_tune_from_init_config_exports_the_bpe_tokenizer(tmp_path, pairs, capsys, hf_tokenizer_dir):
    """--init-config DIR/config.json reads DIR's tokenizer.json; the exported model carries it, its
    tokenizer_config.json and chat_template.jinja, and loads with the same format."""
    tokenizer_dir, hf = hf_tokenizer_dir
    source = hf_checkpoint(tmp_path / "source", tokenizer_dir, len(hf))
    out = tmp_path / "run"
    args = run_args(source, pairs, out, "--lora-rank", "0")
    args[args.index("--model"):args.index("--model") + 2] = ["--init-config", str(source / "config.json")]
    assert train.main(args) == 0
    capsys.readouterr()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / "model" / name).read_bytes() == (tokenizer_dir / name).read_bytes()
    exported, path = load_tokenizer(out / "model")
    assert (path.name, exported.chat_format) == ("tokenizer.json", "chatml")


def test_a_larger_vocabulary_is_refused_before_the_run_directory_exists(tmp_path, pairs, capsys):
    model = tekken_checkpoint(tmp_path / "model", vocab_size=32768)
    out = tmp_path / "run"
    assert train.main(run_args(model, pairs, out)) == 1
    assert capsys.readouterr().err.strip() == (f"train.py: error: {model / 'tekken.json'}: 131072 tokens, more than "
                                               f"the vocab_size 32768 of the model in {model} (a tokenizer of another "
                                               f"model?)")
    assert not out.exists()


def cached_tokenizer_sha256(out: Path) -> tuple[str, str]:
    """(cache directory name, the tokenizer_sha256 in its key) of a run's reference-log-prob cache."""
    from safetensors import safe_open

    (cache,) = (out / "cache").glob("ref_logps-*")
    with safe_open(str(cache / "ref_logps.safetensors"), framework="pt") as file:
        return cache.name, file.metadata()["tokenizer_sha256"]


def test_reference_cache_key_follows_the_tokenizer_files_content(tmp_path, pairs, capsys, hf_tokenizer_dir):
    """The key hashes the file the tokenizer was read from (tokenizer.json here): the same ids from a file with
    other bytes still give another key and another cache, so a cache is never reused across tokenizer files."""
    tokenizer_dir, hf = hf_tokenizer_dir
    model = hf_checkpoint(tmp_path / "model", tokenizer_dir, len(hf))
    assert train.main(run_args(model, pairs, tmp_path / "run")) == 0
    before = cached_tokenizer_sha256(tmp_path / "run")
    assert before[1] == file_sha256(model / "tokenizer.json")
    document = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))
    (model / "tokenizer.json").write_text(json.dumps(document, indent=1), encoding="utf-8")  # same tokens
    assert train.main(run_args(model, pairs, tmp_path / "run2")) == 0
    after = cached_tokenizer_sha256(tmp_path / "run2")
    assert after[1] == file_sha256(model / "tokenizer.json") != before[1] and after[0] != before[0]
    capsys.readouterr()
