"""Chat formats: how a conversation becomes token ids, for the checkpoints people fine-tune.

Every format builds the ids segment by segment (each segment a special id or a piece of text encoded on its
own), so that

    encode_prompt(messages[:-1]) + encode_response(messages[-1])  is the whole conversation, and
    encode_prompt(...)                                             is an exact token prefix of it,

by construction: nothing is ever found by slicing a rendered string and re-encoding it.

Two ways of encoding a text segment (`Pieces`, below). sentencepiece puts a dummy-prefix "▁" (a space) at the
start of every string it encodes: `enc(text)`. mistral-common encodes every message on its own, so Mistral's
formats use `enc` throughout. The formats defined by HF chat templates (Zephyr, Llama-2, ChatML) were trained
on the rendered string tokenized in one go by HF's (legacy) Llama tokenizer, which splits it at special tokens
(`<s>`, `</s>`, `<|im_start|>`, ...) and gives each chunk between them a dummy prefix; a reply inside a chunk
therefore has no "▁" of its own: `cont(text)`, the ids of `text` continuing a chunk. Where the prompt/response
boundary falls inside a chunk ("...<|assistant|>\\n" then the reply), the chunk is encoded as enc(before) +
cont(reply), which equals enc(before + reply) whenever no piece spans the boundary; Mistral's and Llama's
vocabularies have no piece holding "\\n" (a byte-fallback piece) or starting mid-word before a space, so the
boundary is clean and the tests check the result against transformers token for token.

    mistral-v1  BOS [INST]-as-text: enc("[INST] {system}\\n\\n{user_1} [/INST]") enc(assistant_1) EOS ...
                enc("[INST] {user_n} [/INST]") | enc(reply) EOS        (Mistral-7B(-Instruct) v0.1, v0.2)
    mistral-v3  BOS [INST] enc(user_1) [/INST] enc(assistant_1.rstrip(" ")) EOS ...
                [INST] enc("{system}\\n\\n{user_n}") [/INST] | enc(reply.rstrip(" ")) EOS
                ([INST], [/INST] control ids 3, 4; the system message on the LAST user turn; v0.3, and v2)
    mistral-v7  BOS [SYSTEM_PROMPT] enc(system) [/SYSTEM_PROMPT] then as mistral-v3 without the system text
    zephyr      BOS "<|system|>\\n{system}" EOS "\\n<|user|>\\n{user}" EOS "\\n<|assistant|>\\n" | cont(reply) EOS
    llama-2     BOS "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user_1} [/INST] {assistant_1} " EOS BOS "[INST] ..."
                "[INST] {user_n} [/INST]" | cont(" {reply} ") EOS      (user and assistant text .strip()ped)
    chatml      BOS <|im_start|> "system\\n{system}" <|im_end|> "\\n" <|im_start|> "user\\n{user}" <|im_end|>
                "\\n" <|im_start|> "assistant\\n" | cont(reply) <|im_end|>
                (a template that writes a default system message when there is none, as SmolLM2's and Qwen2.5's
                do, gets it here too: default_system_prompt)
    llama-3     <|begin_of_text|> <|start_header_id|> "system" <|end_header_id|> "\\n\\n{system}" <|eot_id|> ...
                <|start_header_id|> "assistant" <|end_header_id|> "\\n\\n" | cont(reply) <|eot_id|>
                (every message's content .strip()ped, as the template's `| trim` does)

(`|` marks the prompt/response boundary; quoted text is one chunk.) The response ends with the end-of-turn id
and nothing after it: what follows an end of turn (Zephyr's "\\n") is never trained on.

Over a byte-level BPE (models/bpe.py: tekken.json, tokenizer.json) there is no dummy prefix: `enc(text)` is the
text's ids alone, as mistral-common and HF encode a message or a chunk, so Mistral's v3/v7 formats are the same
code. BOS starts the template formats only where the tokenizer adds one itself (`adds_bos`: SmolLM2's and Qwen's
do not; llama-3 writes its template's bos_token), and `cont(reply)` continues the chunk's real text before the
reply ("assistant\\n"), not a "\\n" stand-in: the BPE's regex decides where words split, and the check stops a
reply it would join to that text (one starting with "\\n" after ChatML's "assistant\\n" under Qwen's regex).
mistral-v1 and llama-2 exist only as sentencepiece formats and are refused over a BPE.

Messages are normalised first, as mistral-common normalises them, for every format (normalize_messages):
an empty system message is dropped, several leading system messages are joined with "\\n\\n", consecutive user
turns and consecutive assistant turns are joined with "\\n\\n"; a system message after the first turn, a
conversation starting with the assistant, and an empty ("") earlier assistant turn are refused.
"""
from __future__ import annotations

import re

ROLES = ("system", "user", "assistant")
JOIN = "\n\n"  # mistral-common's separator for merged messages (protocol/instruct/normalize.py)


class ChatFormatError(ValueError):
    """A conversation this format cannot encode, or a tokenizer that lacks the format's special tokens."""


def normalize_messages(messages) -> tuple[str | None, list[dict]]:
    """[system*] (user+ assistant+)* ... -> (system text or None, turns alternating user, assistant, ...).

    The rules are mistral-common's (normalize.py, validator.py), except that a system message after the first
    turn is refused here (mistral-common moves it into the global system prompt).
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError("messages must be a non-empty list of {'role', 'content'} dicts")
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not {"role", "content"} <= set(message):
            raise ChatFormatError(f"message {position}: expected a dict with 'role' and 'content', "
                                  f"got {message!r:.80}")
        if message["role"] not in ROLES:
            raise ChatFormatError(f"message {position}: unknown role {message['role']!r} (expected one of {ROLES})")
        if not isinstance(message["content"], str):
            raise ChatFormatError(f"message {position}: content must be a str, "
                                  f"got {type(message['content']).__name__}")
    leading = 0
    while leading < len(messages) and messages[leading]["role"] == "system":
        leading += 1
    systems = [m["content"] for m in messages[:leading] if m["content"]]  # an empty system message is dropped
    turns: list[dict] = []
    for position, message in enumerate(messages[leading:], start=leading):
        role, content = message["role"], message["content"]
        if role == "system":
            raise ChatFormatError(f"message {position}: a system message after the first turn is not supported "
                                  f"(put it first)")
        if not turns and role == "assistant":
            raise ChatFormatError(f"message {position}: the conversation starts with an assistant turn "
                                  f"(expected a user turn first)")
        if role == "assistant" and not content:
            raise ChatFormatError(f"message {position}: empty assistant turn (mistral-common refuses it too)")
        if turns and turns[-1]["role"] == role:  # consecutive turns of one role: joined, as mistral-common does
            turns[-1] = {"role": role, "content": turns[-1]["content"] + JOIN + content}
        else:
            turns.append({"role": role, "content": content})
    return (JOIN.join(systems) if systems else None), turns


class Pieces:
    """What a format needs from a tokenizer: enc / cont of text, and special ids by their piece."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos, self.eos = tokenizer.bos_id, tokenizer.eos_id
        self.start = [self.bos] if tokenizer.adds_bos else []  # what the tokenizer itself puts first
        self.dummy_prefix = tokenizer.dummy_prefix

    def enc(self, text: str) -> list[int]:
        """The ids of `text` encoded on its own (sentencepiece: a dummy-prefix "▁" first)."""
        return self.tokenizer.encode(text)

    def cont(self, text: str, before: str) -> list[int]:
        """The ids of `text` continuing a chunk whose text so far is `before`: enc(context + text) less
        enc(context)'s ids, checked to be a prefix (else no segment boundary falls there, and it is refused).

        sentencepiece (no context needed but a dummy prefix to drop): context "\\n", a byte-fallback piece in
        Mistral's and Llama's vocabularies, so no piece spans it and the rest are the pieces `text` gets inside a
        longer string (HF's non-legacy Llama trick, with "\\n" for "<unk>"). Byte-level BPE: context `before`
        itself, so the result is exactly HF's ids of the chunk `before + text` after enc(before)'s.
        """
        context = "\n" if self.dummy_prefix else before
        head, ids = self.tokenizer.encode(context), self.tokenizer.encode(context + text)
        if ids[:len(head)] != head:
            raise ChatFormatError(f"cannot encode {text[:20]!r} as a continuation of {context!r}: a token of this "
                                  f"tokenizer spans the boundary")
        return ids[len(head):]

    def special(self, piece: str, format_name: str) -> int:
        token = self.tokenizer.special_id(piece)
        if token is None:
            raise ChatFormatError(f"chat format {format_name} needs {piece} as a special token, and this "
                                  f"tokenizer has none")
        return token


class ChatFormat:
    """prompt(system, turns) and response(text) -> ids; `end_of_turn` is the id that closes a reply."""

    name = ""
    description = ""
    sentencepiece_only = False  # written in sentencepiece's dummy-prefix spaces: no byte-level BPE uses it

    def __init__(self, tokenizer):
        if self.sentencepiece_only and not tokenizer.dummy_prefix:
            raise ChatFormatError(f"chat format {self.name} is a sentencepiece format (it relies on the dummy-prefix "
                                  f"space); this tokenizer is a byte-level BPE")
        self.pieces = Pieces(tokenizer)
        self.end_of_turn = self.pieces.eos
        self.default_system = default_system_prompt(getattr(tokenizer, "chat_template", None))

    def encode_prompt(self, messages) -> list[int]:
        """BOS + the conversation up to the assistant's reply to its last (user) turn, generation prompt included."""
        system, turns = normalize_messages(messages)
        if turns[-1]["role"] != "user":
            raise ChatFormatError("encode_prompt: messages must end with a user turn")
        if system is None and self.default_system is not None and messages[0]["role"] == "system":
            raise ChatFormatError("an empty system message: the chat template would write an empty system block "
                                  "where it writes its default one otherwise; drop it or give it text")
        return self.prompt(system, turns)

    def encode_response(self, text: str) -> list[int]:
        """The assistant's reply: its ids and the end-of-turn id."""
        if not isinstance(text, str):
            raise ChatFormatError(f"a reply must be a str, got {type(text).__name__}")
        return self.response(text) + [self.end_of_turn]

    def prompt(self, system: str | None, turns: list[dict]) -> list[int]:
        raise NotImplementedError

    def response(self, text: str) -> list[int]:
        raise NotImplementedError


class MistralV1(ChatFormat):
    name = "mistral-v1"
    description = "Mistral-7B(-Instruct) v0.1/v0.2: [INST] as text, system on the first user turn"
    sentencepiece_only = True

    def prompt(self, system, turns):
        p, ids = self.pieces, [self.pieces.bos]
        for position, turn in enumerate(turns):
            if turn["role"] == "user":
                content = system + JOIN + turn["content"] if position == 0 and system else turn["content"]
                ids += p.enc(f"[INST] {content} [/INST]")
            else:
                ids += self.response(turn["content"]) + [p.eos]
        return ids

    def response(self, text):
        return self.pieces.enc(text)


class MistralV3(ChatFormat):
    name = "mistral-v3"
    description = "Mistral-7B-Instruct-v0.3 (tokenizer v2/v3): [INST] control ids, system on the last user turn"

    system_on_last_user = True  # v2, v3: the system message joins the LAST user turn

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.inst = self.pieces.special("[INST]", self.name)
        self.end_inst = self.pieces.special("[/INST]", self.name)

    def prompt(self, system, turns):
        p, ids = self.pieces, [self.pieces.bos] + self.system_ids(system)
        for position, turn in enumerate(turns):
            if turn["role"] == "user":
                content = turn["content"]
                if position == len(turns) - 1 and system and self.system_on_last_user:
                    content = system + JOIN + content
                ids += [self.inst] + p.enc(content) + [self.end_inst]
            else:
                ids += self.response(turn["content"]) + [p.eos]
        return ids

    def system_ids(self, system) -> list[int]:
        return []

    def response(self, text):
        return self.pieces.enc(text.rstrip(" "))  # v2+ strips trailing spaces from assistant turns


class MistralV7(MistralV3):
    name = "mistral-v7"
    description = "Mistral tokenizer v7 (e.g. Mistral-Large-2411): v3 with a [SYSTEM_PROMPT] block first"

    system_on_last_user = False

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.begin_system = self.pieces.special("[SYSTEM_PROMPT]", self.name)
        self.end_system = self.pieces.special("[/SYSTEM_PROMPT]", self.name)

    def system_ids(self, system):
        return [self.begin_system] + self.pieces.enc(system) + [self.end_system] if system else []


class Zephyr(ChatFormat):
    name = "zephyr"
    description = "Zephyr / HuggingFaceH4 SFT models: <|user|>\\n{content}</s>\\n<|assistant|>\\n"

    def prompt(self, system, turns):
        p, ids, head = self.pieces, list(self.pieces.start), ""
        for message in ([{"role": "system", "content": system}] if system else []) + turns:
            ids += p.enc(f"{head}<|{message['role']}|>\n{message['content']}") + [p.eos]
            head = "\n"  # the template's "\n" after each </s> opens the next chunk
        return ids + p.enc(self.reply_after)

    reply_after = "\n<|assistant|>\n"  # the chunk's text before a reply

    def response(self, text):
        return self.pieces.cont(text, self.reply_after)


class Llama2(ChatFormat):
    name = "llama-2"
    description = "Llama-2-chat: <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s>"
    sentencepiece_only = True

    def prompt(self, system, turns):
        p, ids = self.pieces, []
        for position in range(0, len(turns), 2):  # turns alternate user, assistant and end with the user's
            content = turns[position]["content"]
            if position == 0 and system:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
            chunk = f"[INST] {content.strip()} [/INST]"
            if position + 1 < len(turns):  # an earlier reply shares its user turn's chunk, then </s>
                ids += [p.bos] + p.enc(f"{chunk} {turns[position + 1]['content'].strip()} ") + [p.eos]
            else:
                ids += [p.bos] + p.enc(chunk)
        return ids

    def response(self, text):
        return self.pieces.cont(f" {text.strip()} ", "[/INST]")


class ChatML(ChatFormat):
    name = "chatml"
    description = "ChatML (OpenHermes, Dolphin): <|im_start|>{role}\\n{content}<|im_end|>, <|im_end|> ends a turn"

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.im_start = self.pieces.special("<|im_start|>", self.name)
        self.end_of_turn = self.im_end = self.pieces.special("<|im_end|>", self.name)

    def prompt(self, system, turns):
        p, ids = self.pieces, list(self.pieces.start)
        system = system or self.default_system
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        for message in messages:
            ids += [self.im_start] + p.enc(f"{message['role']}\n{message['content']}") + [self.im_end] + p.enc("\n")
        return ids + [self.im_start] + p.enc("assistant\n")

    def response(self, text):
        return self.pieces.cont(text, "assistant\n")


class Llama3(ChatFormat):
    name = "llama-3"
    description = ("Llama 3 (Instruct): <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>, "
                   "<|eot_id|> ends a turn")

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        if self.pieces.bos is None:
            raise ChatFormatError(f"chat format {self.name} starts with the bos_token, and this tokenizer has none")
        self.start_header = self.pieces.special("<|start_header_id|>", self.name)
        self.end_header = self.pieces.special("<|end_header_id|>", self.name)
        self.end_of_turn = self.eot = self.pieces.special("<|eot_id|>", self.name)

    def header(self, role: str) -> list[int]:
        return [self.start_header] + self.pieces.enc(role) + [self.end_header]

    def prompt(self, system, turns):
        p, ids = self.pieces, [self.pieces.bos]  # the template's own bos_token, whatever the tokenizer adds
        for message in ([{"role": "system", "content": system}] if system else []) + turns:
            ids += self.header(message["role"]) + p.enc("\n\n" + message["content"].strip()) + [self.eot]
        return ids + self.header("assistant") + p.enc("\n\n")

    def response(self, text):
        return self.pieces.cont(text.strip(), "\n\n")


FORMATS = {cls.name: cls for cls in (MistralV1, MistralV3, MistralV7, Zephyr, Llama2, ChatML, Llama3)}


def chat_format(name: str, tokenizer) -> ChatFormat:
    """The format called `name` on `tokenizer`; ChatFormatError naming the known ones for any other name."""
    if name not in FORMATS:
        raise ChatFormatError(f"unknown chat format {name!r} (known: {', '.join(FORMATS)})")
    return FORMATS[name](tokenizer)


def recognise_template(template: str, control_pieces: set[str]) -> str | None:
    """The format a Jinja chat_template writes, from the markers it emits; None if no known format's.

    An [INST] template does not say reliably which Mistral version it is (the v0.1 and v0.3 templates differ
    by one space), so the tokenizer's control pieces decide it, as for a tokenizer.model alone.
    """
    if "<|start_header_id|>" in template and "<|eot_id|>" in template:
        return "llama-3"
    if "<|im_start|>" in template and "<|im_end|>" in template:
        return "chatml"
    if "<|user|>" in template and "<|assistant|>" in template and "<|end|>" not in template:
        return "zephyr"  # Phi-3 writes the same role tags but ends turns with <|end|>: not Zephyr, not known
    if "<<SYS>>" in template and "[INST]" in template:
        return "llama-2"
    if "[INST]" in template:
        return mistral_version(control_pieces)
    return None


def mistral_version(control_pieces: set[str]) -> str:
    """v7 has [SYSTEM_PROMPT] as a control piece, v2/v3 have [INST], v1 has neither ([INST] is text)."""
    if "[SYSTEM_PROMPT]" in control_pieces:
        return "mistral-v7"
    if "[INST]" in control_pieces:
        return "mistral-v3"
    return "mistral-v1"


# A ChatML template that writes a system message of its own when the conversation has none, e.g. SmolLM2's
# {{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}
# (the "\n" a real newline or a Jinja escape, the quotes single or double).
DEFAULT_SYSTEM = re.compile(r"""(['"])<\|im_start\|>system(?:\n|\\n)((?:(?!\1)[^{}])*?)<\|im_end\|>""")


def default_system_prompt(template: str | None) -> str | None:
    """The system message a chat template writes itself when the conversation brings none, or None.

    The one place that compares a template with what the built-in formats render beyond its markers (issue 26
    renders templates in full): a ChatML default system block is rendered (ChatML.prompt); a template this
    function knows the built-in formats would render differently is refused, naming the difference.
    """
    if template is None:
        return None
    if "Cutting Knowledge Date" in template:  # Llama 3.1+: a dated system block on every conversation
        raise ChatFormatError("the chat_template writes a dated system block (\"Cutting Knowledge Date\", Llama 3.1 "
                              "and later) that the built-in llama-3 format does not render")
    found = DEFAULT_SYSTEM.search(template)
    if found is None:
        return None
    return found.group(2).replace("\\n", "\n")
