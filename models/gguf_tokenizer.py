"""A GGUF file's tokenizer metadata as the HF files that describe the same tokenizer: tokenizer.json,
tokenizer_config.json and chat_template.jinja.

llama.cpp keeps a byte-level BPE (`tokenizer.ggml.model = "gpt2"`) as

    tokenizer.ggml.tokens      [V] strings, already in GPT-2's byte-to-unicode spelling ("Ġthe" is " the")
    tokenizer.ggml.token_type  [V] int32: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.merges      ["Ġ t", ...] in rank order, each pair joined by one space
    tokenizer.ggml.pre         the name of its pre-tokenizer (the regex chain that splits text before BPE)
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, tokenizer.ggml.add_bos_token, tokenizer.chat_template

and tokenizer.json holds the same vocabulary and merges as an HF `BPE` model. What the metadata gives only as a name
is the pre-tokenizer, so each name is spelled out here as the chain the model's own tokenizer.json has:

    smollm  Digits(individual_digits) then ByteLevel with GPT-2's regex (SmolLM/SmolLM2; llama.cpp's `smollm`
            splits \\p{N} one by one before the same regex). Each digit alone: "2024" is 2 0 2 4, and " ½" is
            " " + "½" (½ is numeric), where the GPT-2 regex alone would keep " ½" whole.
    gpt-2   ByteLevel with GPT-2's regex alone.

Any other name is refused: a wrong split tokenizes most text the same and some text differently, silently.
(HF transformers' own GGUF import does not know `smollm` and drops the Digits step.) Tokens marked control (3)
or unknown (2) become special added tokens, user-defined (4) plain added tokens, matched whole in text as
llama.cpp does.
"""
from __future__ import annotations

import json

from models.gguf_reader import GGUFError

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, BYTE_LEVEL]},
    "gpt-2": BYTE_LEVEL,
}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _field(metadata: dict, key: str, kind, source: str, default=None, required: bool = False):
    value = metadata.get(key, default)
    if value is None and not required:
        return None
    if value is None:
        raise GGUFError(f"{source}: missing {key}")
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GGUFError(f"{source}: {key} is {type(value).__name__}, expected {kind.__name__}")
    return value


def tokenizer_files(metadata: dict, source: str, model_max_length: int) -> dict[str, str]:
    """{file name: text} of tokenizer.json, tokenizer_config.json and (when the file has one) chat_template.jinja,
    from a GGUF file's metadata. `source` names the file in errors."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{source}: tokenizer.ggml.model is {kind!r}; only byte-level BPE (\"gpt2\") "
                                     f"is converted")
    pre = metadata.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"{source}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer this converter "
                                     f"knows (known: {', '.join(PRE_TOKENIZERS)})")
    tokens = _field(metadata, "tokenizer.ggml.tokens", list, source, required=True)
    merges = _field(metadata, "tokenizer.ggml.merges", list, source, required=True)
    types = metadata.get("tokenizer.ggml.token_type")
    types = [NORMAL] * len(tokens) if types is None else [int(t) for t in types]
    if len(types) != len(tokens):
        raise GGUFError(f"{source}: tokenizer.ggml.token_type has {len(types)} entries for "
                                     f"{len(tokens)} tokens")
    vocab = {}
    for index, token in enumerate(tokens):
        if vocab.setdefault(token, index) != index:
            raise GGUFError(f"{source}: tokenizer.ggml.tokens[{index}] {token!r} repeats token "
                                         f"{vocab[token]}")
    for index, merge in enumerate(merges):
        pair = merge.split(" ")
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab or "".join(pair) not in vocab:
            raise GGUFError(f"{source}: tokenizer.ggml.merges[{index}] {merge!r} is not two tokens "
                                         f"of the vocabulary whose join is one")
    special = {}
    for role in ("bos", "eos", "unknown", "padding"):
        token_id = _field(metadata, f"tokenizer.ggml.{role}_token_id", int, source)
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise GGUFError(f"{source}: tokenizer.ggml.{role}_token_id {token_id} is outside the "
                                         f"{len(tokens)} tokens")
        special[role] = tokens[token_id] if token_id is not None else None

    added = [{"id": index, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[index] != USER_DEFINED}
             for index, token in enumerate(tokens) if types[index] in (UNKNOWN, CONTROL, USER_DEFINED)]
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and special["bos"] is None:
        raise GGUFError(f"{source}: tokenizer.ggml.add_bos_token is true but there is no bos_token_id")
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": PRE_TOKENIZERS[pre],
        "post_processor": _post_processor(special["bos"], vocab) if add_bos else
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": special["unknown"] if UNKNOWN in types else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                  "byte_fallback": False, "ignore_merges": False, "vocab": vocab, "merges": merges},
    }
    template = _field(metadata, "tokenizer.chat_template", str, source)
    config = {
        "add_bos_token": add_bos, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length, "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special["bos"], "eos_token": special["eos"], "unk_token": special["unknown"],
        "pad_token": special["padding"],
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
    }
    config = {key: value for key, value in config.items() if value is not None}
    files = {"tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False, indent=2) + "\n"}
    if template is not None:
        config["chat_template"] = template
        files["chat_template.jinja"] = template
    files["tokenizer_config.json"] = json.dumps(config, ensure_ascii=False, indent=2) + "\n"
    return files


def _post_processor(bos: str, vocab: dict) -> dict:
    """BOS before every sequence (tokenizer.ggml.add_bos_token: Llama 3's convention), HF's TemplateProcessing."""
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}}}


__all__ = ["tokenizer_files", "PRE_TOKENIZERS"]
