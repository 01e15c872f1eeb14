"""eval/bench/against_trl.py on the real model: what TRL is given tokenises to exactly spl's ids.

The benchmark's first-step check (loss and log-probs equal to 1e-5) holds only if both sides train on the same tokens.
Oracle: HF's AutoTokenizer on SmolLM2's tokenizer files (written from the GGUF file's metadata by
models/gguf_tokenizer.py), tokenising TRL's text rows (`render_chat_rows`: HF's apply_chat_template, then the
response and EOS, one string, as TRL's non-conversational path does), against spl's own chat format
(load_tokenizer: encode_prompt and encode_response, each segment on its own).
"""
import numpy as np

from eval.bench.against_trl import render_chat_rows, text
from models.gguf import installed_file
from models.gguf_reader import GGUFFile
from models.gguf_tokenizer import tokenizer_files
from models.tokenizer import load_tokenizer


def test_trl_rows_tokenise_to_spls_ids(tmp_path):
    import transformers

    with GGUFFile(installed_file("smollm2")) as gguf:
        files = tokenizer_files(gguf.metadata, str(gguf.path), 8192)
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    ours, _ = load_tokenizer(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    rng = np.random.default_rng(0)
    rows = [{"chat": text(rng, 40), "chosen": text(rng, 12), "rejected": text(rng, 9)} for _ in range(6)]
    for row, rendered in zip(rows, render_chat_rows(rows, hf)):
        prompt_ids = ours.encode_prompt([{"role": "user", "content": row["chat"]}])
        assert hf(rendered["prompt"])["input_ids"] == prompt_ids
        for side in ("chosen", "rejected"):
            whole = hf(rendered["prompt"] + rendered[side] + hf.eos_token)["input_ids"]  # TRL: prompt + response + EOS
            assert whole == prompt_ids + ours.encode_response(row[side])
