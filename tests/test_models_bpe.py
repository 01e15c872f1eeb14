"""models/bpe.py: byte-level BPE tokenizers, token for token against the libraries that define them.

Oracles:
- mistral-common (`Tekkenizer`, tiktoken inside; `MistralTokenizer.encode_chat_completion`) on the two real tekken
  files its wheel ships (tekken_240718.json, tekken_240911.json: version v3, 131072 ids) for plain text and chats,
  and on tekken files of versions v7, v11 and v13 cut from them (with the vocabulary cut below the file's list, as
  mistral-common cuts it);
- HF `tokenizers` on tokenizer.json files trained here (GPT-2's ByteLevel regex; SmolLM2's Digits + ByteLevel;
  Llama 3's Split regex + ByteLevel with NFC and ignore_merges) and transformers' `apply_chat_template` with real
  templates (tests/fixtures/chat_templates/) over them;
- invariants: the prompt is a token prefix of the whole conversation; a literal special string stays text.
"""
from __future__ import annotations

import base64
import functools
import json
import random
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest

from models.bpe import BPETokenizer, bytes_to_unicode
from models.chat_format import FORMATS, ChatFormatError
from models.checkpoint import CheckpointError
from models.tokenizer import check_vocabulary, load_tokenizer
from test_models_chat_format import CONVERSATIONS as CHATS, DATA_RECORDS, msgs  # tests/ is on sys.path

mistral_common = pytest.importorskip("mistral_common")  # test oracles (requirements-dev.txt)
tokenizers = pytest.importorskip("tokenizers")
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage  # noqa: E402
from mistral_common.protocol.instruct.normalize import get_normalizer  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator  # noqa: E402
from mistral_common.tokens.tokenizers import instruct  # noqa: E402
from mistral_common.tokens.tokenizers.base import SpecialTokens, TokenizerVersion  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402
from mistral_common.tokens.tokenizers.tekken import Tekkenizer  # noqa: E402

DATA = Path(mistral_common.__file__).parent / "data"
TEKKEN_FILES = ("tekken_240718.json", "tekken_240911.json")
TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
MESSAGE = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
INSTRUCT = {"v3": instruct.InstructTokenizerV3, "v7": instruct.InstructTokenizerV7,
            "v11": instruct.InstructTokenizerV11, "v13": instruct.InstructTokenizerV13}

TEXTS = ["Hello, world!", "héllo wörld ñ Ελληνικά русский عربي हिन्दी", "日本語と中文と한국어", "emoji 🎉😀👍🏽 ZWJ 👨‍👩‍👧",
         "digits 1234567890 3.14159 1,000,000 2024-12-06", "runs     of   spaces\t\ttabs", "\n\n\nnewlines\n \n  \n",
         "CRLF line\r\nnext\r\n\r\n", "def f(x):\n    return x ** 2  # code\n\nprint(f(3))", "literal [INST] x [/INST]",
         "end </s> and <s> and <unk>", "I'm sure they'll say it's WON'T", "", " ", "  leading and trailing  ",
         "odd spaces\x1c\x85\u2028\u00a0\u3000x", "area 3 m² ½ x²² ٣٤ Ⅻ", "a" * 300 + " " + "ab" * 120,
         "!!!???...---===", "naïve café\u0301"]
ALPHABET = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \t\n\r.,;:!?'\"()[]{}<>/\\-_+=*&^%$#@~`|") \
    + list("éüñçßøΩЖжλ日本語中文한국어🎉😀👍🏽\u0301\u200d\x1c\x85\u2028\u00a0\u3000\u0660\u00b2\u2160") + [
    "[INST]", "</s>", "'s", "'LL", " the", "\r\n"]


def random_texts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) for _ in range(count)]


# ---- tekken against mistral-common -------------------------------------------------------------------------

def tekken_dir(tmp_path_factory, name: str) -> Path:
    directory = tmp_path_factory.mktemp(name.removesuffix(".json"))
    (directory / "tekken.json").symlink_to(DATA / name)
    return directory


def mistral_common_tekkenizer(path) -> Tekkenizer:
    """Tekkenizer.from_file(path), less the list of 131072 token strings it builds for `vocab()` (1.5 s a file),
    which encoding and decoding never read."""
    with mock.patch.object(Tekkenizer, "id_to_piece", lambda self, token_id: ""):
        return Tekkenizer.from_file(path)


@pytest.fixture(scope="module")
def tekken(tmp_path_factory):
    """file name -> (ours, mistral-common's Tekkenizer) on the real file."""
    return {name: (BPETokenizer(tekken_dir(tmp_path_factory, name) / "tekken.json"),
                   mistral_common_tekkenizer(DATA / name)) for name in TEKKEN_FILES}


def mistral_common_ids(tekkenizer, version: str, messages, reply=None) -> list[int]:
    """mistral-common's ids of the prompt (reply None) or of the whole conversation, with `version`'s instruct
    tokenizer, validator and normaliser over `tekkenizer` (MistralTokenizer.from_file wires the same three)."""
    mode = ValidationMode.test if reply is None else ValidationMode.finetuning
    tokenizer_version = TokenizerVersion(version)
    tokenizer = MistralTokenizer(INSTRUCT[version](tekkenizer), get_validator(tokenizer_version, mode),
                                 get_normalizer(tokenizer_version, None))
    conversation = [MESSAGE[m["role"]](content=m["content"]) for m in messages]
    conversation += [AssistantMessage(content=reply)] if reply is not None else []
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=conversation)).tokens


@pytest.mark.parametrize("name", TEKKEN_FILES)
def test_tekken_text_equals_mistral_common(tekken, name):
    ours, theirs = tekken[name]
    assert (ours.vocab_size, ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.n_words, 1, 2, 11)
    assert [ours.special_id(p) for p in ("[INST]", "[/INST]", "[SYSTEM_PROMPT]")] == [3, 4, 17]
    for text in TEXTS + random_texts(400, seed=len(name)):
        ids = ours.encode(text)
        assert ids == theirs.encode(text, bos=False, eos=False), text
        assert ours.decode(ids) == theirs.decode(ids) == text or "\ufffd" in ours.decode(ids)
        assert all(i >= 1000 for i in ids)  # a literal "[INST]" or "</s>" is text, never a special id
    assert ours.decode([1, 3] + ours.encode("x") + [4, 2]) == "x"  # special ids are dropped


@pytest.mark.parametrize("name", TEKKEN_FILES)
@pytest.mark.parametrize("index", range(len(CHATS)))
def test_tekken_v3_chats_equal_mistral_common(tekken, name, index):
    ours, theirs = tekken[name]
    messages, reply = CHATS[index]
    assert ours.chat_format == "mistral-v3"
    assert ours.format_origin == "no chat_template; config.version v3 of tekken.json"
    prompt_ids, response_ids = ours.encode_prompt(messages), ours.encode_response(reply)
    assert prompt_ids == mistral_common_ids(theirs, "v3", messages)
    assert prompt_ids + response_ids == mistral_common_ids(theirs, "v3", messages, reply)


@pytest.fixture(scope="module")
def newer_tekken(tmp_path_factory, tekken):
    """version -> (ours, mistral-common's) on a tekken file of that version cut from tekken_240718.json: 3000 listed
    ranks, default_vocab_size 1000 + 2500 (so the vocabulary is cut below the list), the special tokens listed
    in the file as newer files do (mistral-common's SpecialTokens, in order)."""
    document = json.loads((DATA / TEKKEN_FILES[0]).read_text(encoding="utf-8"))
    document["vocab"] = document["vocab"][:3000]
    document["config"] |= {"num_vocab_tokens": 3000, "default_vocab_size": 3500}
    document["special_tokens"] = [{"rank": i, "token_str": t.value, "is_control": True}
                                  for i, t in enumerate(SpecialTokens)]
    found = {}
    for version in ("v7", "v11", "v13"):
        document["config"]["version"] = version
        path = tmp_path_factory.mktemp(version) / "tekken.json"
        path.write_text(json.dumps(document), encoding="utf-8")
        found[version] = BPETokenizer(path), mistral_common_tekkenizer(path)
    return found


@pytest.mark.parametrize("version", ["v7", "v11", "v13"])
def test_newer_tekken_versions_are_v7_chats_as_mistral_common_encodes_them(newer_tekken, version):
    ours, theirs = newer_tekken[version]
    assert ours.vocab_size == theirs.n_words == 3500
    assert (ours.chat_format, ours.format_origin) == ("mistral-v7", f"no chat_template; config.version {version} "
                                                                    f"of tekken.json")
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text, bos=False, eos=False)
    for messages, reply in CHATS:
        prompt_ids = ours.encode_prompt(messages)
        assert prompt_ids == mistral_common_ids(theirs, version, messages)
        assert prompt_ids + ours.encode_response(reply) == mistral_common_ids(theirs, version, messages, reply)


def test_v7_format_over_a_v3_file_is_mistral_commons_v7(tekken):
    """--chat-format mistral-v7 on a v3 file: mistral-common's V7 instruct tokenizer over the same Tekkenizer."""
    tokenizer, theirs = tekken[TEKKEN_FILES[0]]
    v7 = FORMATS["mistral-v7"](tokenizer)  # what BPETokenizer(path, "mistral-v7") builds
    for messages, reply in CHATS:
        whole = v7.encode_prompt(messages) + v7.encode_response(reply)
        assert whole == mistral_common_ids(theirs, "v7", messages, reply)


def test_tekken_data_path_equals_mistral_common(tmp_path, tekken):
    """standard, conversational (TRL), UltraFeedback-binarized and HH-RLHF records -> examples whose prompt and
    prompt + chosen / rejected are mistral-common's encodings of the conversation each record means."""
    from data.tokenization import load_preference_data

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record, *_ in DATA_RECORDS), encoding="utf-8")
    ours, theirs = tekken[TEKKEN_FILES[1]]
    examples, summary = load_preference_data(path, ours, 4096, 2048, vocab_size=ours.vocab_size)
    assert summary.num_kept == len(DATA_RECORDS)
    for example, (_, messages, chosen, rejected) in zip(examples, DATA_RECORDS):
        assert example.prompt_ids == mistral_common_ids(theirs, "v3", messages)
        assert example.prompt_ids + example.chosen_ids == mistral_common_ids(theirs, "v3", messages, chosen)
        assert example.prompt_ids + example.rejected_ids == mistral_common_ids(theirs, "v3", messages, rejected)


def test_tekken_refusals(tmp_path):
    document = {"config": {"pattern": r"\w+|\s+", "default_vocab_size": 300, "default_num_special_tokens": 20,
                           "version": "v15"},
                "vocab": [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode(), "token_str": None}
                          for i in range(256)]}
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"tekken.json: config.version 'v15': chat formats are implemented"):
        BPETokenizer(path)
    document["config"]["version"] = "v3"
    path.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"default_vocab_size 300 does not fit 20 special tokens and 256 ranks"):
        BPETokenizer(path)
    document["config"]["default_vocab_size"] = 276
    for change, problem in [
            (lambda vocab: vocab[7].update(token_bytes="not base64!"), r"vocab\[7\].token_bytes is not base64"),
            (lambda vocab: vocab[9].pop("token_bytes"), r"vocab\[9\].token_bytes is not base64"),
            (lambda vocab: vocab[5].update(rank=6), r"vocab\[5\] has rank 6 and bytes b'\\x05' \(expected rank 5,"),
            (lambda vocab: vocab[3].update(token_bytes=base64.b64encode(b"\x04").decode()),
             r"vocab\[3\] has rank 3 and bytes b'\\x04' \(expected rank 3, the first 256 single bytes\)")]:
        changed = json.loads(json.dumps(document))
        change(changed["vocab"])
        path.write_text(json.dumps(changed), encoding="utf-8")
        with pytest.raises(CheckpointError, match=problem):
            BPETokenizer(path)


# ---- tokenizer.json against HF tokenizers and transformers ----------------------------------------------------

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]


def train_tokenizer_json(kind: str):
    """A BPE over the byte-level alphabet trained on a little English, as `kind` ("gpt2", "smollm2", "llama3")
    pre-tokenizes, with SPECIALS and one non-special added token "<tool>"."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    tokenizer.pre_tokenizer = {
        "gpt2": byte_level, "smollm2": byte_level,  # SmolLM2's Digits step is set after training (below)
        "llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])}[kind]
    tokenizer.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    words = ("the cat sat on a mat and looked at the dog which pet is best cats are calm dogs loyal fish quiet "
             "sun warm sky blue today I'm can't they'll 12345 3.14 héllo wörld 日本語 🎉 Paris France capital m² ½ "
             "x²² ٣٤ Ⅻ wow!! hmm?? ...").split()  # numbers that are not 0-9 (HF's Digits splits them too)
    corpus = [" ".join(rng.choice(words) for _ in range(20)) + rng.choice(["\n", "\n\n", ".", "!\n", "  ", "?"])
              for _ in range(300)]
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.add_tokens(["<tool>"])
    if kind == "smollm2":  # trained without it, the vocabulary has tokens across digits (" 12", "m²") to split
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if kind == "llama3":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 3)])
    return tokenizer


def write_tokenizer_dir(directory: Path, kind: str, template: str | None, eos: str, bos: str | None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    train_tokenizer_json(kind).save(str(directory / "tokenizer.json"))
    config = {"eos_token": eos, "bos_token": bos, "pad_token": eos}
    if template:
        config["chat_template"] = (TEMPLATES / template).read_text(encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory


@pytest.mark.parametrize("kind", ["gpt2", "smollm2", "llama3"])
def test_tokenizer_json_text_equals_hf_tokenizers(tmp_path, kind):
    bos = "<|begin_of_text|>" if kind == "llama3" else "<|im_start|>"  # the BOS its post-processor adds
    directory = write_tokenizer_dir(tmp_path, kind, "chatml.jinja", "<|im_end|>", bos)
    theirs = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    ours = BPETokenizer(directory / "tokenizer.json")
    assert ours.vocab_size == theirs.get_vocab_size()
    assert ours.adds_bos == (kind == "llama3")  # the TemplateProcessing post-processor
    for text in TEXTS + random_texts(300, seed=1) + ["a <tool> b<tool>c"]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    literal = ours.encode("end <|im_end|> here")  # HF would give the special id; here it stays text
    assert ours.special_id("<|im_end|>") not in literal and ours.decode(literal) == "end <|im_end|> here"


@functools.lru_cache(maxsize=None)
def hf_pair(root: Path, kind: str, template: str, eos: str, bos: str | None):
    """(ours, transformers' tokenizer) on one tokenizer directory, as transformers 5 saves it."""
    import transformers

    directory = write_tokenizer_dir(root / f"{kind}-{template}", kind, template, eos, bos)
    return BPETokenizer(directory / "tokenizer.json"), transformers.AutoTokenizer.from_pretrained(directory)


# name -> (tokenizer kind, template, eos, bos, format, what the template writes after a turn, whether the
# tokenizer's own special tokens are added: yes for the formats whose BOS is the tokenizer's, as in the
# sentencepiece tests; no for llama-3, whose template writes bos_token itself)
TEMPLATE_CASES = {
    "chatml-gpt2": ("gpt2", "chatml.jinja", "<|im_end|>", "<|im_start|>", "chatml", "\n", True),
    "chatml-llama3": ("llama3", "chatml.jinja", "<|im_end|>", "<|begin_of_text|>", "chatml", "\n", True),
    "smollm2": ("smollm2", "smollm2.jinja", "<|im_end|>", "<|im_start|>", "chatml", "\n", True),
    "zephyr": ("gpt2", "zephyr.jinja", "<|endoftext|>", None, "zephyr", "\n", True),
    "llama-3": ("llama3", "llama-3.jinja", "<|eot_id|>", "<|begin_of_text|>", "llama-3", "", False),
}
REFUSED = {("chatml-llama3", 4)}  # a reply starting with "\n" after "assistant\n": Llama 3's regex joins them


@pytest.mark.parametrize("case", list(TEMPLATE_CASES))
@pytest.mark.parametrize("index", range(len(CHATS)))
def test_template_formats_equal_apply_chat_template(tmp_path_factory, case, index):
    """prompt ids = transformers' ids of the rendered prompt (add_generation_prompt); prompt + response = its ids
    of the whole conversation, up to what the template writes after the end of turn. A reply the format refuses
    is one whose ids in the whole conversation do not start with the prompt's (no prompt/response split is exact)."""
    kind, template, eos, bos, name, after_turn, add_special_tokens = TEMPLATE_CASES[case]
    ours, hf = hf_pair(tmp_path_factory.getbasetemp(), kind, template, eos, bos)
    assert (ours.chat_format, ours.format_origin) == (name, "chat_template in tokenizer_config.json")
    messages, reply = CHATS[index]
    prompt_text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    whole_text = hf.apply_chat_template(messages + msgs(("assistant", reply)), tokenize=False)
    assert whole_text.endswith(after_turn)
    prompt = hf.encode(prompt_text, add_special_tokens=add_special_tokens)
    whole = hf.encode(whole_text, add_special_tokens=add_special_tokens)
    assert ours.encode_prompt(messages) == prompt
    if (case, index) in REFUSED:
        with pytest.raises(ChatFormatError, match=r"a token of this tokenizer spans the boundary"):
            ours.encode_response(reply)
        assert whole[:len(prompt)] != prompt
        return
    response_ids = ours.encode_response(reply)
    assert prompt + response_ids + (hf.encode(after_turn, add_special_tokens=False) if after_turn else []) == whole


def test_smollm2_template_writes_its_default_system_message(tmp_path_factory):
    ours, _ = hf_pair(tmp_path_factory.getbasetemp(), *TEMPLATE_CASES["smollm2"][:4])
    default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert ours.format.default_system == default
    assert ours.encode_prompt(msgs(("user", "Hi"))) == ours.encode_prompt(msgs(("system", default), ("user", "Hi")))
    assert ours.encode_prompt(msgs(("system", "Be brief."), ("user", "Hi"))) != ours.encode_prompt(msgs(("user", "Hi")))
    with pytest.raises(ChatFormatError, match=r"an empty system message: the chat template would write an empty"):
        ours.encode_prompt(msgs(("system", ""), ("user", "Hi")))  # normalised away here, an empty block there


def unmade_merge(vocab: dict) -> str:
    """A merge "a b" of two one-character tokens of `vocab` whose concatenation is not in it."""
    return next(f"{a} {b}" for a in vocab for b in vocab if len(a) == len(b) == 1 and a + b not in vocab)


def test_tokenizer_json_detection_and_refusals(tmp_path):
    directory = write_tokenizer_dir(tmp_path / "plain", "gpt2", None, "<|im_end|>", None)
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: no chat_template .* pass --chat-format NAME"):
        BPETokenizer(directory / "tokenizer.json")
    assert BPETokenizer(directory / "tokenizer.json", "chatml").format_origin == "--chat-format"
    with pytest.raises(CheckpointError, match=r"tokenizer.json: chat format mistral-v1 is a sentencepiece format"):
        BPETokenizer(directory / "tokenizer.json", "mistral-v1")
    with pytest.raises(CheckpointError, match=r"chat format mistral-v3 needs \[INST\] as a special token"):
        BPETokenizer(directory / "tokenizer.json", "mistral-v3")
    document = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    for change, problem in [
            (lambda d: d["model"].update(type="WordPiece"), r"model.type 'WordPiece' is not supported"),
            (lambda d: d.update(normalizer={"type": "Lowercase"}), r"normalizer \['Lowercase'\] is not supported"),
            (lambda d: d.update(pre_tokenizer={"type": "Metaspace"}), r"pre_tokenizer.type 'Metaspace': not supported"),
            (lambda d: d["added_tokens"][0].update(lstrip=True), r"added_tokens\[0\].lstrip True is not supported"),
            (lambda d: d["model"]["merges"].append("oops"), r"model.merges\[\d+\] 'oops' is not a pair of tokens"),
            # a space is no character of GPT-2's alphabet (it writes "Ġ"), nor is anything above chr(323)
            (lambda d: d["model"]["vocab"].update({"a b": 1000}), r"model.vocab token 'a b' is not in the byte-level"),
            (lambda d: d["model"]["merges"].append("中 a"), r"model.merges '中' is not in the byte-level alphabet"),
            (lambda d: d["model"]["merges"].append(unmade_merge(d["model"]["vocab"])),
             r"model.merges\[\d+\] '. .' makes no token of the vocab"),
            (lambda d: d["added_tokens"].append(7), r"added_tokens\[\d+\] needs an int id and a str content")]:
        changed = json.loads(json.dumps(document))
        change(changed)
        (directory / "tokenizer.json").write_text(json.dumps(changed), encoding="utf-8")
        with pytest.raises(CheckpointError, match=problem):
            BPETokenizer(directory / "tokenizer.json", "chatml")
    changed = json.loads(json.dumps(document))
    first = changed["model"]["merges"][0]
    changed["model"]["merges"].append(first)  # listed twice: the pair keeps its first rank
    (directory / "tokenizer.json").write_text(json.dumps(changed), encoding="utf-8")
    to_byte = {character: b for b, character in bytes_to_unicode().items()}
    left, right = (bytes(to_byte[c] for c in token) for token in (first.split(" ") if isinstance(first, str) else first))
    assert BPETokenizer(directory / "tokenizer.json", "chatml")._rank(left, right) == 0


@pytest.mark.parametrize("unk_token, fuse_unk", [(None, False), ("<|endoftext|>", False), ("<|endoftext|>", True)])
def test_bytes_without_a_token_as_hf_treats_them(tmp_path, unk_token, fuse_unk):
    """SmolLM2's vocabulary lacks 21 byte tokens; HF drops such a byte before merging, or gives it unk_token."""
    directory = write_tokenizer_dir(tmp_path, "gpt2", "chatml.jinja", "<|im_end|>", "<|im_start|>")
    document = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    for byte in ("\x04", "\x06"):  # control bytes no merge uses
        document["model"]["vocab"].pop(bytes_to_unicode()[ord(byte)])
    document["model"] |= {"unk_token": unk_token, "fuse_unk": fuse_unk}
    (directory / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")
    ours = BPETokenizer(directory / "tokenizer.json")
    theirs = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    for text in ["a\x04\x06b wow!\x04!", "\x04", "\x06\x06 sat", "hmm?\x06\x06? .\x04.\x04."]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False).ids


def test_ignore_merges_takes_a_word_that_is_a_token_whole(tmp_path):
    """A token no merge path builds ("qqq", added to the vocabulary by hand): with ignore_merges (Llama 3) the word
    "qqq" is that token; without, it is merged from its bytes. Both as HF tokenizers does."""
    directory = write_tokenizer_dir(tmp_path, "llama3", "chatml.jinja", "<|im_end|>", "<|begin_of_text|>")
    document = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    document["model"]["vocab"]["qqq"] = qqq = 1 + max(t["id"] for t in document["added_tokens"])
    found = {}
    for ignore_merges in (True, False):
        document["model"]["ignore_merges"] = ignore_merges
        (directory / "tokenizer.json").write_text(json.dumps(document), encoding="utf-8")
        ours = BPETokenizer(directory / "tokenizer.json")
        theirs = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
        found[ignore_merges] = ours.encode("qqq qqq")
        assert found[ignore_merges] == theirs.encode("qqq qqq", add_special_tokens=False).ids
    assert found[True][0] == qqq and qqq not in found[False]


def test_without_the_regex_package_one_line_says_what_to_install(tmp_path, monkeypatch):
    directory = write_tokenizer_dir(tmp_path, "gpt2", "chatml.jinja", "<|im_end|>", "<|im_start|>")
    monkeypatch.setitem(sys.modules, "regex", None)  # import regex now raises ImportError
    with pytest.raises(CheckpointError, match=r"^byte-level BPE tokenizers need the regex package: pip install regex$"):
        BPETokenizer(directory / "tokenizer.json")


def test_llama_31_dated_system_block_is_refused(tmp_path):
    directory = write_tokenizer_dir(tmp_path, "llama3", None, "<|eot_id|>", "<|begin_of_text|>")
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = (TEMPLATES / "llama-3.jinja").read_text() + "{# Cutting Knowledge Date: #}"
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"writes a dated system block"):
        BPETokenizer(directory / "tokenizer.json")


# ---- loading from a checkpoint directory ---------------------------------------------------------------------

def test_load_tokenizer_order_and_missing_files(tmp_path):
    directory = write_tokenizer_dir(tmp_path / "m", "gpt2", "chatml.jinja", "<|im_end|>", "<|im_start|>")
    tokenizer, path = load_tokenizer(directory)
    assert path == directory / "tokenizer.json" and tokenizer.kind == "tokenizer.json (byte-level BPE)"
    (directory / "tekken.json").symlink_to(DATA / TEKKEN_FILES[0])  # tekken.json before tokenizer.json
    tekken, path = load_tokenizer(directory, "mistral-v3")
    assert path == directory / "tekken.json" and tekken.kind == "tekken"
    shutil.copy(DATA / "tokenizer.model.v1", directory / "tokenizer.model")  # tokenizer.model first
    tokenizer, path = load_tokenizer(directory, "mistral-v1")
    assert path == directory / "tokenizer.model" and tokenizer.kind == "sentencepiece"
    with pytest.raises(CheckpointError, match=r"empty/tokenizer.model: missing, and no tekken.json or tokenizer.json "
                                              r"beside it \(a checkpoint's tokenizer is one of tokenizer.model, "
                                              r"tekken.json, tokenizer.json\)"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(CheckpointError, match=r"tekken.json: 131072 tokens, more than the vocab_size 32768"):
        check_vocabulary(tekken, 32768, directory)


def test_default_system_template_data_path_equals_apply_chat_template(tmp_path, tmp_path_factory):
    """Issue 26: on a checkpoint whose template adds a default system prompt (SmolLM2's ChatML), the training ids
    of records in every layout (standard, conversational, UltraFeedback-binarized, HH-RLHF) equal transformers'
    apply_chat_template of the conversation each record means: the prompt with the generation prompt, and the
    whole conversation up to what the template writes after the reply's end of turn."""
    from data.tokenization import load_preference_data

    kind, template, eos, bos, _, after_turn, add_special_tokens = TEMPLATE_CASES["smollm2"]
    ours, hf = hf_pair(tmp_path_factory.getbasetemp(), kind, template, eos, bos)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record, *_ in DATA_RECORDS), encoding="utf-8")
    examples, summary = load_preference_data(path, ours, 4096, 2048, vocab_size=ours.vocab_size)
    assert summary.num_kept == len(DATA_RECORDS)
    tail = hf.encode(after_turn, add_special_tokens=False)

    def ids(messages, **kwargs):
        text = hf.apply_chat_template(messages, tokenize=False, **kwargs)
        return hf.encode(text, add_special_tokens=add_special_tokens)
    without_system = [messages for _, messages, *_ in DATA_RECORDS if messages[0]["role"] != "system"]
    assert without_system and all("You are a helpful AI assistant named SmolLM" in hf.apply_chat_template(
        messages, tokenize=False) for messages in without_system)  # the default system prompt is exercised
    for example, (_, messages, chosen, rejected) in zip(examples, DATA_RECORDS):
        assert example.prompt_ids == ids(messages, add_generation_prompt=True)
        for reply, reply_ids in ((chosen, example.chosen_ids), (rejected, example.rejected_ids)):
            assert example.prompt_ids + reply_ids + tail == ids(messages + [{"role": "assistant", "content": reply}])
