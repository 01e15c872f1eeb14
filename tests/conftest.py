"""Shared fixtures: tiny random checkpoints written by HF transformers itself, and tiny models of ours.

HF transformers is imported inside the fixtures (it takes seconds to import and is a test-only dependency), so
test files that do not ask for these fixtures never pay for it.

Weights are drawn at a scale where every part of the network matters (`randomize_weights_`): HF's default
init (normal, std 0.02) makes attention almost uniform and logits almost constant, so a wrong RoPE theta, a
wrong window or a swapped projection could hide under a 1e-4 tolerance.
"""
from __future__ import annotations

import pytest
import torch

def pytest_configure(config):
    """Under pytest-xdist (the README's test command runs `-n auto`: one worker per core), each worker computes on
    one intra-op thread: two workers of two threads each on a 2-core machine would oversubscribe it, and ATen's
    idle OpenMP threads spin (see `one_thread`). Scripts the tests start as processes choose their own threads."""
    import os
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (each file's whole run takes 10-40 s: a real model, torchrun launches, an experiment's
    --quick, train.py processes) go first, the rest after in their order. pytest-xdist hands out whole files
    (`--dist loadfile`) in this order (`--no-loadscope-reorder`; by default it puts the files with the most tests
    first, which left the slow few-test files for last and one worker running them alone): longest first, the
    two workers finish together."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: order kept within each group


def pytest_collection_finish(session):
    """What the collection imported (torch, the project, the test modules: most of a worker's objects) lives until
    the worker exits: gc.freeze() takes it out of the cyclic collector's full passes, which walked all of it each
    time (0.19 s a pass, 4.3 of the 5.7 CPU-s the collector spent in a one-process run of the suite)."""
    import gc
    gc.freeze()


@pytest.fixture
def one_thread():
    """One intra-op thread for the test. ATen's CPU kernels (log_sigmoid among them) parallelise even a
    30-element tensor; on a busy 2-core machine every call then waits for a worker thread (~10 ms, against ~2 us
    on one thread), and the LBFGS and Monte-Carlo tests make thousands of calls. Modules that need it say
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The architecture every tiny test model starts from; tests override single fields.
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=None, max_position_embeddings=256, rms_norm_eps=1e-6,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def randomize_weights_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """In place, by parameter kind (the same rule for HF's modules and ours):
    norm weights 1 + 0.1 N(0, 1); embeddings N(0, 1); linear weights [out, in] N(0, 1 / in), so that
    activations, attention scores q.k / sqrt(hd) and logits are all O(1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights appear once
            noise = torch.randn(param.shape, generator=generator)
            if param.dim() == 1:
                param.copy_(1.0 + 0.1 * noise)
            elif "embed" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / param.shape[1] ** 0.5)
    return model


@pytest.fixture
def randomize():
    """`randomize(model, seed=0)`: see `randomize_weights_`."""
    return randomize_weights_


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: `make(name="hf", model_type="mistral", max_shard_size=None, seed=0, **config_overrides)` ->
    `(path, hf_model)`. Builds HF's `MistralForCausalLM` (or `LlamaForCausalLM` for model_type "llama") in
    float32 with eager attention, randomizes its weights, and writes it under tmp_path with HF's own
    `save_pretrained` (`max_shard_size` e.g. "20KB" gives a sharded checkpoint). The returned model is the
    oracle: in eval mode, float32, the very weights on disk."""
    import transformers

    def make(name: str = "hf", model_type: str = "mistral", max_shard_size=None, seed: int = 0, **overrides):
        fields = TINY | overrides
        if model_type == "llama":
            fields.pop("sliding_window")
            config = transformers.LlamaConfig(**fields, attn_implementation="eager")
            model = transformers.LlamaForCausalLM(config)
        else:
            config = transformers.MistralConfig(**fields, attn_implementation="eager")
            model = transformers.MistralForCausalLM(config)
        model = randomize_weights_(model.float(), seed).eval()
        path = tmp_path / name
        if max_shard_size is None:
            model.save_pretrained(path)
        else:
            model.save_pretrained(path, max_shard_size=max_shard_size)
        return path, model

    return make


@pytest.fixture
def tiny_model():
    """Factory: `make(seed=0, dtype=torch.float32, **config_overrides)` -> our randomized `Mistral` in eval mode."""
    from models import Mistral, MistralConfig

    def make(seed: int = 0, dtype=torch.float32, **overrides):
        fields = TINY | overrides
        fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
        config = MistralConfig(rope_theta=fields.pop("rope_theta", 10000.0), **fields)
        return randomize_weights_(Mistral(config), seed).to(dtype).eval()

    return make


TINY_TEXT = [
    "the cat sat on the mat and looked at the dog",
    "a dog ran to the park with a red ball",
    "which pet is best? cats are calm, dogs are loyal, fish are quiet",
    "the sun is warm and the sky is blue today",
]


def train_tiny_tokenizer(prefix, vocab_size: int = 300) -> str:
    """A sentencepiece BPE model trained on TINY_TEXT with Mistral's special ids and byte fallback; returns
    the path of the .model file."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_TEXT * 20), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        user_defined_symbols=["[INST]", "[/INST]"], minloglevel=2)
    return f"{prefix}.model"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A tiny random Mistral saved in HF format with a tokenizer trained here, plus 24 soft-labelled preference
    pairs: {"model": dir, "data": jsonl, "root": dir}. For end-to-end tests of train.py and its pieces."""
    import json

    from models import MistralConfig, build_model, save_pretrained

    root = tmp_path_factory.mktemp("tiny_run")
    tokenizer = train_tiny_tokenizer(root / "sp")
    config = MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                           rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False,
                           max_position_embeddings=512)
    model_dir = root / "model"
    save_pretrained(build_model(config, seed=0), model_dir, tokenizer_path=tokenizer)
    rows = [{"prompt": f"which pet is best? {i}", "chosen": "dogs are loyal", "rejected": "fish are quiet",
             "chosen_prob": 0.75} for i in range(24)]
    data = root / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {"model": model_dir, "data": data, "root": root}


@pytest.fixture
def script(monkeypatch, capsys):
    """Factory: `script(name, argv, cwd=None)` -> (exit code, stdout, stderr): train.py's or sample.py's main(argv)
    run in this process as a user's process would run it, without the seconds a new process spends importing
    torch. An exception escaping main() is printed to stderr as the process would print it (a traceback), so a
    test's "no traceback" still sees it. The process-wide state a script sets is restored afterwards: torch's
    thread count and RNG, numpy's and Python's RNGs, the SIGINT/SIGTERM handlers, the working directory and the
    environment (a leak would change the tests that run after)."""
    import os
    import random
    import signal
    import sys
    import traceback

    import numpy as np

    saved = (torch.get_num_threads(), torch.get_rng_state(), np.random.get_state(), random.getstate(),
             {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}, dict(os.environ))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # as the subprocess cases ran: not under torchrun
        monkeypatch.delenv(name, raising=False)

    def run(name: str, argv: list[str], cwd=None):
        module = __import__(name.removesuffix(".py"))
        if cwd is not None:
            monkeypatch.chdir(cwd)
        capsys.readouterr()
        try:
            code = module.main([str(a) for a in argv])
        except KeyboardInterrupt:
            raise
        except BaseException:  # what the process would have printed before exiting 1
            traceback.print_exc(file=sys.stderr)
            code = 1
        out, err = capsys.readouterr()
        return code, out, err

    yield run
    threads, rng, np_rng, py_rng, handlers, environ = saved
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)
    np.random.set_state(np_rng)
    random.setstate(py_rng)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    os.environ.clear()
    os.environ.update(environ)
