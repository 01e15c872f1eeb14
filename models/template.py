"""A checkpoint's chat template rendered as transformers renders it, to prove the built-in chat format equal to it.

The data path and sample.py build prompts with a built-in format (models/chat_format.py), segment by segment, so
that the prompt is an exact token prefix of prompt + response. A format is chosen from the template's markers;
markers are not content (a template can add a default system prompt, a date, different spacing). So when the
format was chosen from a byte-level BPE checkpoint's template, the template itself is rendered on probe
conversations (jinja2's sandbox, with transformers' settings: trim_blocks, lstrip_blocks, loopcontrols,
raise_exception, tojson), the text is tokenised as transformers tokenises a rendered template (special and
added tokens by name, the text between them by the tokenizer, no BOS of its own), and the ids must equal the
format's, token for token (but for the BOS that a tokenizer whose post-processor adds one puts before the
template's text, as `tokenizer(text)` does). The first difference stops the run in one line that names the probe,
the token position and the text on each side.

Over sentencepiece the comparison is of the text, whitespace aside: transformers' sentencepiece tokenizers put a
word-boundary space before each text segment in ways that depend on the tokenizer class (legacy or not), so token
equality there is tested per checkpoint family in tests/ against apply_chat_template, while this start-up check
catches what the markers cannot (a default system prompt, a date, words the format does not write). A probe the
template itself refuses (raise_exception: a template without a system role, say) is not compared. An explicit
--chat-format is the user's choice and is not checked.
"""
from __future__ import annotations

from models.chat_format import ChatFormatError

PROBES = {  # name -> conversation ending with a user turn; contents with digits, punctuation and a newline
    "one user turn": [{"role": "user", "content": "Which pet is best, 42 or 7?"}],
    "a system message": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": "Name a colour.\nJust one."}],
    "two exchanges": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                      {"role": "user", "content": "Tell me a fact (a short one)."}],
}


class TemplateRefused(Exception):
    """The template's own raise_exception: it does not take this conversation."""


def _names(tokenizer) -> dict[str, int]:
    """Every token the tokenizer knows by name: BPE special and added tokens, sentencepiece control pieces and
    tokenizer_config.json's added tokens."""
    names = {}
    for field in ("special", "added", "control_pieces", "added_tokens"):
        names.update(getattr(tokenizer, field, None) or {})
    return names


def render(template: str, messages: list[dict], bos_token: str, eos_token: str,
           add_generation_prompt: bool = True) -> str:
    """The template's text for `messages`, rendered as transformers' apply_chat_template renders it."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatFormatError("checking a chat template needs jinja2: pip install jinja2") from None
    import json

    def raise_exception(message):
        raise TemplateRefused(message)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    environment.globals["raise_exception"] = raise_exception
    try:
        return environment.from_string(template).render(messages=messages, bos_token=bos_token,
                                                        eos_token=eos_token, add_generation_prompt=add_generation_prompt)
    except TemplateRefused:
        raise
    except jinja2.exceptions.TemplateError as error:
        raise ChatFormatError(f"the chat_template does not render ({error})") from None


def text_ids(tokenizer, text: str) -> list[int]:
    """`text` as transformers tokenises a rendered template: every special or added token by name, the text
    between them by the tokenizer (tokenizer.encode adds no BOS: byte-level BPE has no dummy prefix either)."""
    names = _names(tokenizer)
    ids, start = [], 0
    while start < len(text):
        found = [(text.find(name, start), -len(name), name) for name in names if text.find(name, start) >= 0]
        if not found:
            return ids + tokenizer.encode(text[start:])
        position, _, name = min(found)  # the earliest, the longest there
        ids += tokenizer.encode(text[start:position]) + [names[name]]
        start = position + len(name)
    return ids


def _shown(tokenizer, ids: list[int]) -> str:
    """ids as text, named tokens by name (runs of the others decoded together, so multi-byte text stays whole)."""
    by_id = {i: name for name, i in _names(tokenizer).items()}
    text, run = [], []
    for i in [*ids, None]:
        if i is None or i in by_id:
            text.append(tokenizer.decode(run) if run else "")
            run = []
            text.append(by_id.get(i, ""))
        else:
            run.append(i)
    return "".join(text)


def _squeezed(text: str) -> str:
    return "".join(text.split())


def check_template(tokenizer, template: str, where: str) -> None:
    """Raise ChatFormatError unless the tokenizer's chat format agrees with the template on every probe it takes:
    token for token over a byte-level BPE, the text whitespace aside over sentencepiece."""
    by_id = {i: name for name, i in _names(tokenizer).items()}
    bos, eos = by_id.get(tokenizer.bos_id, ""), by_id.get(tokenizer.eos_id, "")
    for probe, messages in PROBES.items():
        try:
            text = render(template, messages, bos, eos)
        except TemplateRefused:
            continue
        ours = tokenizer.format.encode_prompt(messages)
        if tokenizer.adds_bos and ours[:1] == [tokenizer.bos_id] and not text.startswith(bos):
            ours = ours[1:]  # the BOS a tokenizer adds itself (its post-processor), not the template's to write
        if tokenizer.dummy_prefix:  # sentencepiece: the texts, whitespace aside
            theirs, mine, width, unit = _squeezed(text), _squeezed(_shown(tokenizer, ours)), 24, "character"
            show = str
        else:  # byte-level BPE: token for token
            theirs, mine, width, unit = text_ids(tokenizer, text), ours, 6, "token"
            show = lambda ids: _shown(tokenizer, ids)  # noqa: E731
        if theirs == mine:
            continue
        n = next((i for i, (a, b) in enumerate(zip(theirs, mine)) if a != b), min(len(theirs), len(mine)))
        raise ChatFormatError(
            f"{where}: the built-in {tokenizer.chat_format} format differs from this chat_template on {probe}, at "
            f"{unit} {n}{' (whitespace aside)' if tokenizer.dummy_prefix else ''}: the template gives "
            f"{show(theirs[n:n + width])!r}, the format {show(mine[n:n + width])!r} (after "
            f"{show(theirs[max(0, n - width):n])!r}); pass --chat-format NAME to use a built-in format anyway")
