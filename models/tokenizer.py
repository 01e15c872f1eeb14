"""The tokenizer: sentencepiece, the checkpoint's added tokens, and the chat format chosen from the checkpoint.

`load_tokenizer(directory)` finds a checkpoint's tokenizer in this order: `tokenizer.model` (sentencepiece, this
file), `tekken.json` (Mistral's byte-level BPE since July 2024), `tokenizer.json` (HF's byte-level BPE: SmolLM2,
Llama 3, Qwen, every checkpoint transformers 5 saves); the two BPE files are read by models/bpe.py behind the
same interface (TokenizerBase below: the chat methods, which only need encode, special_id and the ids).

`Tokenizer(path/to/tokenizer.model)` reads the sentencepiece model and, when they sit beside it, the HF files
that say how the model was trained to chat:

  1. `chat_template` in `tokenizer_config.json` (or a `chat_template.jinja` file) is recognised by the markers
     it emits (models/chat_format.recognise_template); a template of no known format stops here, naming the file;
  2. otherwise the sentencepiece model's control pieces decide: [SYSTEM_PROMPT] is Mistral's tokenizer v7, [INST]
     is v2/v3 (Mistral-7B-Instruct-v0.3), neither is v1 (Mistral-7B v0.1/v0.2, where [INST] is text);
  3. `chat_format=NAME` (train.py / sample.py `--chat-format`) overrides both.

`tokenizer.chat_format` is the chosen format's name (part of the reference-cache key), `tokenizer.format_origin`
says how it was chosen (train.py prints both), and encode_prompt / encode_response / encode_chat delegate to it
(the formats and the segment-by-segment rule that keeps prompt ids a prefix are in models/chat_format.py).

Added tokens: `tokenizer_config.json`'s `added_tokens_decoder` may give ids at and above the sentencepiece
model's size (ChatML's `<|im_start|>`, `<|im_end|>` are 32001 and 32000 in OpenHermes-2.5-Mistral). They are
part of `vocab_size` and `special_id`, never produced by `encode` (a literal "<|im_end|>" in text stays text).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import sentencepiece

from models.chat_format import (FORMATS, ROLES, ChatFormatError, mistral_version, normalize_messages,
                                recognise_template)

__all__ = ["Tokenizer", "ROLES", "validate_messages", "check_vocabulary", "describe_format", "load_tokenizer",
           "TOKENIZER_FILES"]

# The files a checkpoint's tokenizer may come in, in the order they are looked for: a Mistral HF repository ships
# tekken.json beside a converted tokenizer.json (tekken.json is mistral-common's own, so it wins), and a v0.3 one
# tokenizer.model beside tokenizer.json.
TOKENIZER_FILES = ("tokenizer.model", "tekken.json", "tokenizer.json")


def load_tokenizer(directory, chat_format: str | None = None):
    """(tokenizer, path of the file it was read from) for a checkpoint directory: the first of TOKENIZER_FILES
    present, its chat format chosen from the files beside it (or `chat_format`). The path is the file whose
    content names the tokenizer (the reference-cache key hashes it) and the one save_pretrained copies."""
    from models.bpe import BPETokenizer  # here: models/bpe.py imports this module

    directory = Path(directory)
    for name in TOKENIZER_FILES:
        path = directory / name
        if path.is_file():
            return (Tokenizer if name == "tokenizer.model" else BPETokenizer)(path, chat_format), path
    raise _checkpoint_error(f"{directory / TOKENIZER_FILES[0]}: missing, and no {' or '.join(TOKENIZER_FILES[1:])} "
                            f"beside it (a checkpoint's tokenizer is one of {', '.join(TOKENIZER_FILES)})")


class TokenizerBase:
    """The chat-format methods every tokenizer shares; a subclass sets `format`, `chat_format`, `format_origin`,
    `path` and `kind`, and provides encode / decode / bos_id / eos_id / pad_id / vocab_size / special_id."""

    dummy_prefix = True  # sentencepiece puts a "▁" before every string it encodes; byte-level BPE does not
    adds_bos = True  # whether the tokenizer itself starts a sequence with BOS (HF: add_special_tokens=True)

    @property
    def end_of_turn_id(self) -> int:
        """The id that closes an assistant turn: EOS, or ChatML's <|im_end|>. Generation stops there."""
        return self.format.end_of_turn

    def _choose_chat_format(self, chat_format, config: dict, config_path: str, control: set[str],
                            detected: tuple[str, str] | None) -> None:
        """Set chat_format, format_origin, chat_template and format (models/chat_format.py) from the checkpoint."""
        name, self.format_origin, self.chat_template = choose_format(chat_format, config, config_path, control,
                                                                     detected)
        try:
            self.format = FORMATS[name](self)
        except ChatFormatError as error:
            raise _checkpoint_error(f"{self.path}: {error}") from None
        self.chat_format = name
        if self.chat_template is not None and self.format_origin.startswith("chat_template"):
            from models.template import check_template  # here: models/template.py imports chat_format only

            where = os.path.join(os.path.dirname(os.path.abspath(self.path)), self.format_origin.split(" in ")[-1])
            try:  # markers chose the format: the template's own rendering must agree with it, token for token
                check_template(self, self.chat_template, where)
            except ChatFormatError as error:
                raise _checkpoint_error(str(error)) from None

    # ---- the chat format (models/chat_format.py) -------------------------------------------------------------

    def encode_response(self, text: str) -> list[int]:
        """An assistant turn: its ids + the end-of-turn id (EOS, or <|im_end|> for ChatML)."""
        return self.format.encode_response(text)

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """BOS + the conversation up to the assistant's reply to the last user turn (the generation prompt).

        `messages` is [system*] then user and assistant turns ending with a user turn, normalised as
        mistral-common does (models/chat_format.normalize_messages).
        """
        return self.format.encode_prompt(messages)

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """A conversation ending with an assistant turn -> (prompt_ids, response_ids).

        prompt_ids + response_ids is the whole conversation, and prompt_ids is exactly
        encode_prompt(messages[:-1]): the boundary is where the segments meet, found without any re-encoding.
        """
        validate_messages(messages)
        if messages[-1]["role"] != "assistant":
            raise ValueError("encode_chat: messages must end with an assistant turn")
        return self.encode_prompt(messages[:-1]), self.encode_response(messages[-1]["content"])


class Tokenizer(TokenizerBase):
    """sentencepiece `tokenizer.model` with Mistral's special ids (unk 0 "<unk>", bos 1 "<s>", eos 2 "</s>")."""

    def __init__(self, path_to_tokenizer_model: str | os.PathLike, chat_format: str | None = None):
        path = os.fspath(path_to_tokenizer_model)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tokenizer model not found (expected sentencepiece tokenizer.model)")
        self.path, self.kind = path, "sentencepiece"
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as error:  # not a sentencepiece model: a truncated or mixed-up file
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise _checkpoint_error(f"{path}: not a sentencepiece model ({reason})") from None
        if self.sp.bos_id() < 0 or self.sp.eos_id() < 0:
            raise _checkpoint_error(f"{path}: sentencepiece model has no BOS or EOS id (bos={self.sp.bos_id()}, "
                                    f"eos={self.sp.eos_id()}); the chat format needs both")
        self.control_pieces = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                               if self.sp.IsControl(i)}
        config_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
        config = read_config(config_path)
        self.added_tokens = _added_tokens(config, config_path, self.sp.get_piece_size())  # content -> id
        control = set(self.control_pieces)
        version = mistral_version(control)
        pieces = {"mistral-v7": "[SYSTEM_PROMPT]", "mistral-v3": "[INST]"}
        why = f"{pieces[version]} is a control piece" if version in pieces else "[INST] is not a control piece"
        self._choose_chat_format(chat_format, config, config_path, control,
                                 (version, f"no chat_template; {why} of {os.path.basename(path)}"))

    # ---- ids and raw text ------------------------------------------------------------------------------------

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def pad_id(self) -> int:
        """The model's pad id, or EOS when it has none (Mistral has none). Padding is always masked out."""
        pad = self.sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    @property
    def vocab_size(self) -> int:
        """sentencepiece pieces plus the added tokens above them: every id this tokenizer can emit is below it."""
        return max([self.sp.vocab_size()] + [token + 1 for token in self.added_tokens.values()])

    def special_id(self, piece: str) -> int | None:
        """The id of a control piece of the sentencepiece model ("[INST]") or of an added token ("<|im_end|>")."""
        return self.control_pieces.get(piece, self.added_tokens.get(piece))

    def encode(self, text: str) -> list[int]:
        """Plain sentencepiece ids of `text`: no BOS, no EOS, a dummy-prefix "▁" at the start."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        """Text of `ids` with control ids (BOS, EOS, [INST], added tokens) dropped; ids outside are an error."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"Tokenizer.decode: ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        pieces = self.sp.get_piece_size()
        return self.sp.decode([i for i in ids if i < pieces and not self.sp.IsControl(i)])

def validate_messages(messages) -> tuple[str | None, list[dict]]:
    """Check roles and types, normalise as mistral-common does -> (system text or None, alternating turns)."""
    return normalize_messages(messages)


def check_vocabulary(tokenizer: Tokenizer, vocab_size: int, model_dir) -> None:
    """Refuse a tokenizer that can emit ids the model's embedding does not have (before anything is written).

    A v3 tokenizer.model (32768 pieces) beside a v0.1 model (32000) would otherwise index past the embedding,
    or, if every id of the data happens to fit, train on ids shifted by 768 without a word.
    """
    if tokenizer.vocab_size > vocab_size:
        raise _checkpoint_error(f"{tokenizer.path}: {tokenizer.vocab_size} tokens, more than the vocab_size "
                                f"{vocab_size} of the model in {os.fspath(model_dir)} (a tokenizer of another "
                                f"model?)")


def describe_format(tokenizer: Tokenizer) -> str:
    """One line for start-up: which tokenizer file and kind, which chat format, and why."""
    return (f"tokenizer: {os.path.basename(tokenizer.path)} ({tokenizer.kind}, {tokenizer.vocab_size} ids); "
            f"chat format: {tokenizer.chat_format} ({tokenizer.format_origin})")


# ---- helpers ---------------------------------------------------------------------------------------------------

def _checkpoint_error(message: str):
    from models.checkpoint import CheckpointError  # here, not at the top: keeps this module free of torch

    return CheckpointError(message)


def read_config(config_path: str) -> dict:
    if not os.path.isfile(config_path):
        return {}
    from models.fields import read_json_object
    return read_json_object(config_path, _checkpoint_error)


def _added_tokens(config: dict, config_path: str, num_pieces: int) -> dict[str, int]:
    """`added_tokens_decoder` {"32000": {"content": "<|im_end|>", ...}} -> {"<|im_end|>": 32000} for ids above
    the sentencepiece model (those below name its own pieces, <unk> <s> </s>)."""
    from models.fields import mapping
    added = {}
    for key, token in mapping(config, "added_tokens_decoder", config_path, _checkpoint_error, default={}).items():
        content = token.get("content") if isinstance(token, dict) else None
        if not (re.fullmatch(r"[0-9]{1,9}", key) and isinstance(content, str)):
            raise _checkpoint_error(f"{config_path}: added_tokens_decoder entry {key!r} is not "
                                    f'"id": {{"content": str, ...}}')
        if int(key) >= num_pieces:
            added[content] = int(key)
    return added


def _template(config: dict, config_path: str) -> tuple[str | None, str]:
    """The checkpoint's chat template and where it was found: tokenizer_config.json or chat_template.jinja."""
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    jinja = os.path.join(os.path.dirname(config_path), "chat_template.jinja")
    if template is None and os.path.isfile(jinja):
        from models.fields import read_text
        return read_text(jinja, _checkpoint_error), jinja
    if template is not None and not isinstance(template, str):
        raise _checkpoint_error(f"{config_path}: chat_template must be a string")
    return template, config_path


def choose_format(override: str | None, config: dict, config_path: str, control: set[str],
                  detected: tuple[str, str] | None) -> tuple[str, str, str | None]:
    """(format name, how it was chosen, the chat template or None). `control`: the special tokens that say which
    Mistral version an [INST] template is; `detected`: (name, why) when there is no template, or None when the
    tokenizer alone cannot say (a tokenizer.json without [INST]: ChatML, Llama 3 and Zephyr look alike)."""
    template, where = _template(config, config_path)
    if override is not None:
        if override not in FORMATS:
            raise _checkpoint_error(f"unknown chat format {override!r} (known: {', '.join(FORMATS)})")
        return override, "--chat-format", template
    if template is not None:
        name = recognise_template(template, control)
        if name is None:
            raise _checkpoint_error(f"{where}: chat_template is none of the known formats "
                                    f"({', '.join(FORMATS)}); pass --chat-format NAME")
        return name, f"chat_template in {os.path.basename(where)}", template
    if detected is None:
        raise _checkpoint_error(f"{config_path}: no chat_template (in it or in chat_template.jinja beside it) and "
                                f"no [INST] special token; pass --chat-format NAME")
    return (*detected, None)
