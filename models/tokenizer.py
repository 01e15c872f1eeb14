"""The Mistral tokenizer: sentencepiece plus the v0.1/v0.2 instruct chat format.

Chat format (mistral-common's tokenizer V1, used by Mistral-7B-Instruct v0.1 and v0.2), one conversation:

    BOS + enc("[INST] {system}\\n\\n{user_1} [/INST]") + enc("{assistant_1}") + EOS
        + enc("[INST] {user_2} [/INST]") + enc("{assistant_2}") + EOS + ...

where enc() is sentencepiece without BOS/EOS and each segment is encoded on its own. Decoded, this reads
`<s> [INST] user [/INST] assistant</s> [INST] user2 [/INST] ...`; an optional system message is joined to
the FIRST user turn with a blank line, as mistral-common does for V1.

Why segment by segment: sentencepiece adds a dummy-prefix "▁" (a space) at the start of every string it
encodes. Encoding the prompt and the response separately therefore gives the response its own leading "▁",
and the prompt ids are, by construction, an exact token prefix of the whole conversation. Re-encoding the
concatenated string instead may merge or split pieces across the boundary (`enc("a") + enc("b") != enc("ab")`),
so the prompt/response boundary can never be recovered by string slicing and re-encoding.
"""
from __future__ import annotations

import os

import sentencepiece

ROLES = ("system", "user", "assistant")
CHAT_FORMAT = "mistral-v1-inst"  # names the format above; part of the reference-cache key (data/reference_cache.py)


class Tokenizer:
    """sentencepiece `tokenizer.model` with Mistral's special ids (unk 0 "<unk>", bos 1 "<s>", eos 2 "</s>")."""

    chat_format = CHAT_FORMAT

    def __init__(self, path_to_tokenizer_model: str | os.PathLike):
        path = os.fspath(path_to_tokenizer_model)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tokenizer model not found (expected sentencepiece tokenizer.model)")
        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor(model_file=path)
        if self.sp.bos_id() < 0 or self.sp.eos_id() < 0:
            raise ValueError(f"{path}: sentencepiece model has no BOS or EOS id (bos={self.sp.bos_id()}, "
                             f"eos={self.sp.eos_id()}); the chat format needs both")

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
        return self.sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        """Plain sentencepiece ids of `text`: no BOS, no EOS, a dummy-prefix "▁" at the start."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}")
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        """Text of `ids` with control ids (BOS, EOS, pad) dropped; unknown ids are an error, not silence."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"Tokenizer.decode: ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return self.sp.decode([i for i in ids if not self.sp.IsControl(i)])

    # ---- the chat format -------------------------------------------------------------------------------------

    def encode_response(self, text: str) -> list[int]:
        """An assistant turn: enc(text) + exactly one EOS."""
        return self.encode(text) + [self.eos_id]

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """BOS + the conversation up to and including the last user turn's `[/INST]`.

        `messages` is [system?] user (assistant user)*: roles alternate, the first non-system turn is the
        user's and the last turn is the user's. Earlier assistant turns are closed with EOS.
        """
        system, turns = validate_messages(messages)
        if not turns or turns[-1]["role"] != "user":
            raise ValueError("encode_prompt: messages must end with a user turn")
        ids = [self.bos_id]
        for position, message in enumerate(turns):
            if message["role"] == "user":
                content = message["content"]
                if position == 0 and system is not None:
                    content = system + "\n\n" + content  # system text joins the FIRST user turn (V1)
                ids += self.encode(f"[INST] {content} [/INST]")  # own segment: its own dummy prefix
            else:
                ids += self.encode_response(message["content"])  # enc(assistant) + EOS
        return ids

    def encode_chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """A conversation ending with an assistant turn -> (prompt_ids, response_ids).

        prompt_ids + response_ids is the whole conversation, and prompt_ids is exactly
        encode_prompt(messages[:-1]): the boundary is where the segments meet, found without any re-encoding.
        """
        validate_messages(messages)
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("encode_chat: messages must end with an assistant turn")
        return self.encode_prompt(messages[:-1]), self.encode_response(messages[-1]["content"])


def validate_messages(messages) -> tuple[str | None, list[dict]]:
    """Check roles, types and alternation of a message list -> (system text or None, the other turns)."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ValueError(f"message {position}: expected a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ROLES:
            raise ValueError(f"message {position}: unknown role {message['role']!r} (expected one of {ROLES})")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {position}: content must be a str, got {type(message['content']).__name__}")
    system = None
    turns = list(messages)
    if turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    for position, message in enumerate(turns):
        expected = "user" if position % 2 == 0 else "assistant"
        if message["role"] != expected:
            offset = position + (system is not None)
            raise ValueError(f"message {offset}: expected role {expected!r}, got {message['role']!r} "
                             f"(after an optional system message, turns alternate user, assistant, user, ...)")
    return system, turns
