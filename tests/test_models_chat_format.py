"""Chat formats (models/chat_format.py) and their detection (models/tokenizer.py), on Mistral's real tokenizers.

Oracles, both independent of this project:
- mistral-common's `MistralTokenizer.encode_chat_completion`, the reference for how Mistral's models were trained,
  on the real tokenizer models its wheel ships (`mistral_common/data/`: v1, v2, v3, v7). The prompt must equal its
  encoding of the conversation so far (ValidationMode.test, which ends with a user turn) and prompt + response its
  encoding of the whole conversation (ValidationMode.finetuning, which ends with the assistant's reply).
- transformers' `apply_chat_template` rendering the real templates of Zephyr, Llama-2-chat and ChatML checkpoints
  (tests/fixtures/chat_templates/, sources in SOURCES.md), tokenized by transformers' own sentencepiece tokenizer
  (`SentencePieceBackend`, legacy mode, as those checkpoints' tokenizer_config.json set it) built on Mistral's
  real v1 model, the tokenizer of Zephyr and OpenHermes. BOS is prepended where the checkpoints' tokenizers add
  it (`add_bos_token: true`) and the template does not write it (Zephyr, ChatML).
Where the project deliberately differs from an oracle, a test says so and pins the difference.
"""
from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest

from models.chat_format import FORMATS, ChatFormatError
from models.checkpoint import CheckpointError
from models.tokenizer import Tokenizer, check_vocabulary

mistral_common = pytest.importorskip("mistral_common")  # a dev requirement (requirements-dev.txt)
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.protocol.instruct.validator import ValidationMode  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

DATA = Path(mistral_common.__file__).parent / "data"
MODELS = {"v1": "tokenizer.model.v1", "v2": "mistral_instruct_tokenizer_240216.model.v2",
          "v3": "mistral_instruct_tokenizer_240323.model.v3", "v7": "mistral_instruct_tokenizer_241114.model.v7"}
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
MESSAGE = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
CHATML_TOKENS = {"32000": {"content": "<|im_end|>", "special": True}, "32001": {"content": "<|im_start|>", "special": True}}


def msgs(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


LONG = " ".join(f"sentence {i} of a long turn, with numbers 12{i} and words." for i in range(120))
# (prompt messages, reply): 1-4 user turns, with and without a system message, unicode, runs of spaces, CRLF,
# literal control strings, trailing spaces (v2+ strips them from assistant turns), a long conversation.
CONVERSATIONS = [
    (msgs(("user", "What is the capital of France?")), "Paris."),
    (msgs(("system", "You are terse."), ("user", "Capital of France?")), "Paris."),
    (msgs(("system", "Be kind."), ("user", "Hi  there,   friend"), ("assistant", "Hello.  "), ("user", "How are you?")),
     "Fine, thanks.   "),
    (msgs(("user", "héllo wörld 日本語 🎉 ñ"), ("assistant", "Ça va ? 你好"), ("user", "Ελληνικά; русский!")), "Да."),
    (msgs(("user", "line one\r\nline two\r\n\r\nthree"), ("assistant", "ok\r\n"), ("user", "\ttabs\tand\n\nnewlines\n")),
     "\nstarts with a newline"),
    (msgs(("user", "Say [INST] and [/INST] and </s> and <s>"), ("assistant", "[INST] x [/INST] </s>"),
          ("user", "again </s>[INST]")), "</s> [/INST]"),
    (msgs(("system", "sys"), ("user", "1"), ("assistant", "a"), ("user", "2"), ("assistant", "b"), ("user", "3"),
          ("assistant", "c"), ("user", "4")), "d"),
    (msgs(("system", LONG[:300]), ("user", LONG), ("assistant", LONG[::-1]), ("user", LONG.upper())), LONG),
    (msgs(("user", "   leading spaces"), ("assistant", "   "), ("user", "after a blank reply")), "  trailing"),
]
# mistral-common's normalisation, which every format applies: merged or dropped, never refused.
NORMALISED = [
    (msgs(("system", ""), ("user", "empty system dropped")), "ok"),
    (msgs(("system", "one"), ("system", "two"), ("user", "systems joined")), "ok"),
    (msgs(("user", "first"), ("user", "second"), ("assistant", "a1"), ("assistant", "a2"), ("user", "q")), "ok"),
]


@functools.lru_cache(maxsize=None)
def mistral_common_tokenizer(model: str, mode: ValidationMode) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(DATA / MODELS[model]), mode=mode)


def mistral_common_ids(model: str, messages, reply=None) -> list[int]:
    """mistral-common's encoding: of the prompt (reply None) or of the whole conversation."""
    mode = ValidationMode.test if reply is None else ValidationMode.finetuning
    tokenizer = mistral_common_tokenizer(model, mode)
    conversation = [MESSAGE[m["role"]](content=m["content"]) for m in messages]
    if reply is not None:
        conversation.append(AssistantMessage(content=reply))
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=conversation)).tokens


@pytest.fixture(scope="module")
def mistral_tokenizers():
    return {version: Tokenizer(DATA / name) for version, name in MODELS.items()}


def shares_v3_format(messages) -> bool:
    """v7 writes each system message as its own [SYSTEM_PROMPT] block, the empty one too; with at most one
    non-empty system message it is v3 with that block first (the format implemented as mistral-v7)."""
    systems = [m["content"] for m in messages if m["role"] == "system"]
    return len(systems) <= 1 and all(systems)


MISTRAL_CASES = [(model, index) for model in MODELS for index, (messages, _) in enumerate(CONVERSATIONS + NORMALISED)
                 if model != "v7" or shares_v3_format(messages)]  # v7 on the rest: test_v7_differs_on_system_blocks


@pytest.mark.parametrize("model, index", MISTRAL_CASES)
def test_mistral_formats_equal_mistral_common_token_for_token(mistral_tokenizers, model, index):
    messages, reply = (CONVERSATIONS + NORMALISED)[index]
    tokenizer = mistral_tokenizers[model]
    prompt_ids = tokenizer.encode_prompt(messages)
    response_ids = tokenizer.encode_response(reply)
    assert prompt_ids == mistral_common_ids(model, messages)
    assert prompt_ids + response_ids == mistral_common_ids(model, messages, reply)
    assert tokenizer.encode_chat(messages + msgs(("assistant", reply))) == (prompt_ids, response_ids)


def test_v7_differs_on_system_blocks(mistral_tokenizers):
    """The one documented difference: mistral-common's v7 writes [SYSTEM_PROMPT][/SYSTEM_PROMPT] for an empty
    system message and one block per system message; every format here drops the empty one and joins the rest."""
    tokenizer = mistral_tokenizers["v7"]
    begin, end = tokenizer.special_id("[SYSTEM_PROMPT]"), tokenizer.special_id("[/SYSTEM_PROMPT]")
    empty = msgs(("system", ""), ("user", "q"))
    assert mistral_common_ids("v7", empty) == [1, begin, end] + mistral_common_ids("v7", empty[1:])[1:]
    assert tokenizer.encode_prompt(empty) == mistral_common_ids("v7", empty[1:])


def test_detected_formats_of_the_real_tokenizer_models(mistral_tokenizers):
    """A tokenizer.model alone: v1 has [INST] as text, v2/v3 as control ids 3/4, v7 also [SYSTEM_PROMPT]."""
    found = {version: (t.chat_format, t.vocab_size) for version, t in mistral_tokenizers.items()}
    assert found == {"v1": ("mistral-v1", 32000), "v2": ("mistral-v3", 32768), "v3": ("mistral-v3", 32768),
                     "v7": ("mistral-v7", 32768)}
    assert mistral_tokenizers["v3"].special_id("[INST]") == 3 and mistral_tokenizers["v3"].special_id("[/INST]") == 4
    assert mistral_tokenizers["v1"].special_id("[INST]") is None
    assert "[INST] is a control piece" in mistral_tokenizers["v3"].format_origin
    assert "[INST] is not a control piece" in mistral_tokenizers["v1"].format_origin


@pytest.mark.parametrize("messages, problem", [
    (msgs(("user", "a"), ("assistant", ""), ("user", "b")), "message 1: empty assistant turn"),
    (msgs(("user", "a"), ("system", "late"), ("user", "b")), "message 1: a system message after the first turn"),
    (msgs(("assistant", "a"), ("user", "b")), "message 0: the conversation starts with an assistant turn"),
])
def test_refused_conversations(mistral_tokenizers, messages, problem):
    """An empty earlier reply is refused by mistral-common as well; a late system message and an opening
    assistant turn it accepts (moving the first, inserting an empty user turn before the second): refused here."""
    for tokenizer in mistral_tokenizers.values():
        with pytest.raises(ChatFormatError, match=problem):
            tokenizer.encode_prompt(messages)
    if "empty assistant" in problem:
        with pytest.raises(Exception, match="Assistant message must have"):
            mistral_common_ids("v1", messages)


# ---- the HF-template formats ---------------------------------------------------------------------------------

HF_FORMATS = {"zephyr": ("zephyr.jinja", {}), "llama-2": ("llama-2.jinja", {}), "chatml": ("chatml.jinja", CHATML_TOKENS)}
# As CONVERSATIONS, less the literal "</s>" / "<s>": transformers parses special-token text inside content as the
# special token itself; every format here keeps content as text (as mistral-common does), tested below.
HF_CONVERSATIONS = [c for c in CONVERSATIONS if "</s>" not in json.dumps(c)]


def checkpoint_dir(directory: Path, model="v1", template=None, added=None, jinja=False) -> Path:
    """A tokenizer directory as a checkpoint has it: tokenizer.model and tokenizer_config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(DATA / MODELS[model], directory / "tokenizer.model")
    config = {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "legacy": True}
    if template is not None and jinja:
        (directory / "chat_template.jinja").write_text(template, encoding="utf-8")
    elif template is not None:
        config["chat_template"] = template
    if added:
        config["added_tokens_decoder"] = added
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """name -> (our Tokenizer, transformers' tokenizer) on the same real sentencepiece model and template."""
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

    pairs = {}
    for name, (file, added) in HF_FORMATS.items():
        template = (TEMPLATES / file).read_text(encoding="utf-8")
        directory = checkpoint_dir(tmp_path_factory.mktemp(name), template=template, added=added)
        hf = SentencePieceBackend(vocab_file=str(directory / "tokenizer.model"), bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", legacy=True)
        if added:
            hf.add_special_tokens({"additional_special_tokens": [added[k]["content"] for k in sorted(added)]})
        hf.chat_template = template
        pairs[name] = (Tokenizer(directory / "tokenizer.model"), hf)
    return pairs


@pytest.mark.parametrize("name", list(HF_FORMATS))
@pytest.mark.parametrize("index", range(len(HF_CONVERSATIONS)))
def test_hf_template_formats_equal_transformers_token_for_token(hf_pair, name, index):
    """prompt ids = transformers' ids of the rendered prompt (add_generation_prompt); prompt + response = its ids of
    the rendered whole conversation, up to what the template writes after the end of turn (Zephyr's, ChatML's "\\n")."""
    tokenizer, hf = hf_pair[name]
    messages, reply = HF_CONVERSATIONS[index]
    bos = [] if name == "llama-2" else [hf.convert_tokens_to_ids("<s>")]  # Llama-2's template writes bos_token itself
    prompt_text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    whole_text = hf.apply_chat_template(messages + msgs(("assistant", reply)), tokenize=False)
    after_turn = "" if name == "llama-2" else "\n"
    assert whole_text.endswith(after_turn)
    prompt_ids, response_ids = tokenizer.encode_prompt(messages), tokenizer.encode_response(reply)
    assert prompt_ids == bos + hf.encode(prompt_text, add_special_tokens=False)
    assert prompt_ids + response_ids + (hf.encode(after_turn, add_special_tokens=False) if after_turn else []) \
        == bos + hf.encode(whole_text, add_special_tokens=False)


def test_literal_special_strings_stay_text_in_every_format(hf_pair, mistral_tokenizers):
    """"</s>" or "<|im_end|>" typed in a message is text: the only end-of-turn ids are the ones the format writes."""
    messages = msgs(("user", "end </s> here <|im_end|> <|im_start|>"))
    for tokenizer in [t for t, _ in hf_pair.values()] + list(mistral_tokenizers.values()):
        prompt_ids, response_ids = tokenizer.encode_prompt(messages), tokenizer.encode_response("x </s> <|im_end|>")
        assert response_ids.count(tokenizer.end_of_turn_id) == 1 and response_ids[-1] == tokenizer.end_of_turn_id
        plain = tokenizer.encode("end </s> here <|im_end|> <|im_start|>")
        assert tokenizer.eos_id not in plain and all(i < 32000 for i in plain)
        written = 1 if tokenizer.chat_format == "zephyr" else 0  # Zephyr closes the user turn with </s>
        assert prompt_ids.count(tokenizer.eos_id) == written


def test_chatml_ends_turns_with_im_end_and_counts_added_tokens(hf_pair):
    tokenizer, _ = hf_pair["chatml"]
    assert (tokenizer.end_of_turn_id, tokenizer.special_id("<|im_start|>"), tokenizer.vocab_size) == (32000, 32001, 32002)
    assert tokenizer.decode([32001] + tokenizer.encode("hello") + [32000]) == "hello"


# ---- detection -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, file, added, expected", [
    ("v1", "zephyr.jinja", {}, "zephyr"),
    ("v1", "llama-2.jinja", {}, "llama-2"),
    ("v1", "chatml.jinja", CHATML_TOKENS, "chatml"),
    ("v1", "mistral-instruct-v0.1.jinja", {}, "mistral-v1"),
    ("v3", "mistral-instruct-v0.1.jinja", {}, "mistral-v3"),  # an [INST] template: the control pieces decide
])
def test_template_detection(tmp_path, model, file, added, expected):
    template = (TEMPLATES / file).read_text(encoding="utf-8")
    for jinja in (False, True):  # in tokenizer_config.json, or a chat_template.jinja file beside it
        directory = checkpoint_dir(tmp_path / f"{jinja}", model, template, added, jinja=jinja)
        tokenizer = Tokenizer(directory / "tokenizer.model")
        assert tokenizer.chat_format == expected
        assert tokenizer.format_origin == f"chat_template in {'chat_template.jinja' if jinja else 'tokenizer_config.json'}"


def test_template_list_form_uses_the_default_entry(tmp_path):
    zephyr = (TEMPLATES / "zephyr.jinja").read_text(encoding="utf-8")
    directory = checkpoint_dir(tmp_path, template=[{"name": "tool_use", "template": "{{ '<|im_start|>' }}"},
                                                    {"name": "default", "template": zephyr}])
    assert Tokenizer(directory / "tokenizer.model").chat_format == "zephyr"


PHI3_STYLE = ("{% for message in messages %}{% if message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + "
              "'<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + "
              "'<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}"
              "{{ eos_token }}{% endif %}")


@pytest.mark.parametrize("template", [
    "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}{% endfor %}",
    PHI3_STYLE,  # Zephyr's role tags, but turns end with <|end|>: another format, not to be guessed as Zephyr
])
def test_unrecognised_template_stops_naming_the_file_and_the_known_formats(tmp_path, template):
    directory = checkpoint_dir(tmp_path, template=template)
    with pytest.raises(CheckpointError) as raised:
        Tokenizer(directory / "tokenizer.model")
    assert str(raised.value) == (f"{directory / 'tokenizer_config.json'}: chat_template is none of the known formats "
                                 f"({', '.join(FORMATS)}); pass --chat-format NAME")


def test_override_and_its_errors(tmp_path):
    directory = checkpoint_dir(tmp_path, "v3", template=(TEMPLATES / "zephyr.jinja").read_text(encoding="utf-8"))
    tokenizer = Tokenizer(directory / "tokenizer.model", chat_format="mistral-v3")
    assert (tokenizer.chat_format, tokenizer.format_origin) == ("mistral-v3", "--chat-format")
    with pytest.raises(CheckpointError, match=r"unknown chat format 'alpaca' \(known: mistral-v1, mistral-v3, "):
        Tokenizer(directory / "tokenizer.model", chat_format="alpaca")
    with pytest.raises(CheckpointError, match=r"tokenizer.model.v1: chat format mistral-v3 needs \[INST\] as a special token, and this tokenizer has none$"):
        Tokenizer(DATA / MODELS["v1"], chat_format="mistral-v3")
    with pytest.raises(CheckpointError, match=r"chat format chatml needs <\|im_start\|> as a special token"):
        Tokenizer(DATA / MODELS["v1"], chat_format="chatml")


def test_vocabulary_check(mistral_tokenizers, hf_pair):
    """v3's 32768 pieces beside a 32000-row embedding are refused; a tokenizer smaller than the embedding is fine
    (models pad their vocabulary); ChatML's added tokens count."""
    check_vocabulary(mistral_tokenizers["v1"], 32000, "model")
    check_vocabulary(mistral_tokenizers["v1"], 32768, "model")
    with pytest.raises(CheckpointError, match=r"32768 tokens, more than the vocab_size 32000 of the model in m"):
        check_vocabulary(mistral_tokenizers["v3"], 32000, "m")
    with pytest.raises(CheckpointError, match=r"32002 tokens, more than the vocab_size 32000"):
        check_vocabulary(hf_pair["chatml"][0], 32000, "m")


# ---- through the data path -------------------------------------------------------------------------------------

HH_PROMPT = "\n\nHuman: Hi  there\n\nAssistant: Hello! How can I help?\n\nHuman: Explain [INST] tags.\n\nAssistant:"
DATA_RECORDS = [  # (record as in the file, the conversation it means, chosen, rejected): hand-written
    ({"prompt": "Capital of France?", "chosen": "Paris.  ", "rejected": "Lyon."},
     msgs(("user", "Capital of France?")), "Paris.  ", "Lyon."),
    ({"prompt": msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Weather? 🌧")),
      "chosen": msgs(("assistant", "Rainy.")), "rejected": msgs(("assistant", "I don't know."))},
     msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Weather? 🌧")), "Rainy.",
     "I don't know."),
    ({"prompt": "Write a haiku.", "chosen": msgs(("user", "Write a haiku."), ("assistant", "Old pond;\r\na frog.")),
      "rejected": msgs(("user", "Write a haiku."), ("assistant", "No.")), "score_chosen": 8.0, "score_rejected": 2.0},
     msgs(("user", "Write a haiku.")), "Old pond;\r\na frog.", "No."),
    ({"chosen": HH_PROMPT + " They mark turns.", "rejected": HH_PROMPT + " No idea."},
     msgs(("user", "Hi  there"), ("assistant", "Hello! How can I help?"), ("user", "Explain [INST] tags.")),
     "They mark turns.", "No idea."),
]


@pytest.mark.parametrize("model", ["v1", "v3"])
def test_data_path_equals_mistral_common(tmp_path, mistral_tokenizers, model):
    """standard, conversational (TRL), UltraFeedback-binarized and HH-RLHF records -> examples whose prompt and
    prompt + chosen / rejected are mistral-common's encodings of the conversation each record means."""
    from data.tokenization import load_preference_data

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record, *_ in DATA_RECORDS), encoding="utf-8")
    examples, summary = load_preference_data(path, mistral_tokenizers[model], 4096, 2048)
    assert summary.num_kept == len(DATA_RECORDS) and not summary.truncated
    for example, (_, messages, chosen, rejected) in zip(examples, DATA_RECORDS):
        assert example.prompt_ids == mistral_common_ids(model, messages)
        assert example.prompt_ids + example.chosen_ids == mistral_common_ids(model, messages, chosen)
        assert example.prompt_ids + example.rejected_ids == mistral_common_ids(model, messages, rejected)
