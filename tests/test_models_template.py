"""models/template.py: a byte-level BPE checkpoint's chat template, rendered, must give the built-in format's ids.

Oracles: transformers' apply_chat_template(tokenize=False) for the rendering and its tokenizer(text,
add_special_tokens=False) for the ids of a rendered text, on the real templates in tests/fixtures; and a template
whose markers say ChatML but whose content differs (a date line it writes into every user turn), which loading
must refuse in one line naming the probe and the first differing token.
"""
from __future__ import annotations

import json

import pytest

from models.bpe import BPETokenizer
from models.checkpoint import CheckpointError
from models.template import PROBES, render, text_ids

pytest.importorskip("tokenizers")
from test_models_bpe import TEMPLATES, write_tokenizer_dir  # noqa: E402

CASES = {  # template -> (tokenizer kind, eos, bos)
    "chatml.jinja": ("gpt2", "<|im_end|>", "<|im_start|>"),
    "smollm2.jinja": ("smollm2", "<|im_end|>", "<|im_start|>"),
    "zephyr.jinja": ("gpt2", "<|endoftext|>", None),
    "llama-3.jinja": ("llama3", "<|eot_id|>", "<|begin_of_text|>"),
}


@pytest.mark.parametrize("template", list(CASES))
def test_render_and_ids_equal_transformers(tmp_path, template):
    import transformers

    kind, eos, bos = CASES[template]
    directory = write_tokenizer_dir(tmp_path, kind, template, eos, bos)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    ours = BPETokenizer(directory / "tokenizer.json")  # loading runs the check itself: it passes
    source = (TEMPLATES / template).read_text(encoding="utf-8")
    for messages in PROBES.values():
        text = render(source, messages, bos or "", eos)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text_ids(ours, text) == hf(text, add_special_tokens=False)["input_ids"]


def test_a_template_the_format_does_not_reproduce_is_refused_in_one_line(tmp_path):
    directory = write_tokenizer_dir(tmp_path, "gpt2", "chatml.jinja", "<|im_end|>", "<|im_start|>")
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["chat_template"] = config["chat_template"].replace("message['content']",
                                                              "'Today is Monday. ' + message['content']")
    assert "Today is Monday" in config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError) as refused:
        BPETokenizer(directory / "tokenizer.json")
    line = str(refused.value)
    assert "\n" not in line and line.startswith(str(directory / "tokenizer_config.json"))
    assert "the built-in chatml format differs from this chat_template on one user turn, at token " in line
    assert "the template gives 'Today is Mon" in line and "the format 'Which pet" in line
    assert "(after '<|im_start|>user\\n')" in line and "--chat-format" in line
    assert BPETokenizer(directory / "tokenizer.json", "chatml").chat_format == "chatml"  # the user's choice stands


@pytest.mark.parametrize("name", ["zephyr", "llama-2", "chatml"])
def test_sentencepiece_templates_pass_and_a_changed_one_is_refused(tmp_path, name):
    """Over sentencepiece the check compares text, whitespace aside: the real Zephyr, Llama-2 and ChatML templates
    (the fixtures the format tests use against apply_chat_template) pass; the same template writing a date line
    into every user turn is refused in one line naming where the texts part."""
    from models.tokenizer import Tokenizer
    from test_train_formats import CHECKPOINTS, make_checkpoint

    tokenizer_model, template, added, vocab_size, _ = CHECKPOINTS[name]
    directory = make_checkpoint(tmp_path / name, tokenizer_model, template, added, vocab_size)
    assert Tokenizer(directory / "tokenizer.model").chat_format == name  # loading ran the check: it passed
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    changed = config["chat_template"].replace("message['content']", "'Today is Monday. ' + message['content']")
    assert changed != config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config | {"chat_template": changed}), encoding="utf-8")
    with pytest.raises(CheckpointError) as refused:
        Tokenizer(directory / "tokenizer.model")
    line = str(refused.value)
    assert "\n" not in line and f"the built-in {name} format differs from this chat_template on " in line
    assert "(whitespace aside): the template gives 'TodayisMonday." in line and "--chat-format" in line
