"""Byte-level BPE: Mistral's tekken.json and HF's tokenizer.json, token for token, behind models.Tokenizer's interface.

One algorithm serves both files. Text is cut into words by the checkpoint's regex (pre-tokenization), each word's
UTF-8 bytes start as single-byte tokens, and the adjacent pair with the lowest merge rank is merged, leftmost first,
until no pair has a rank:

    word = [b0, b1, ..., bn]                        one token per byte
    while some (w[i], w[i+1]) has a rank:           tekken: the rank of the merged bytes w[i] + w[i+1] (tiktoken)
        i = argmin_i rank(w[i], w[i+1])                      tokenizer.json: the index of "w[i] w[i+1]" in merges
        w[i:i+2] = [w[i] + w[i+1]]
    ids = [id(piece) for piece in word]

A word that is itself a token is that token at once, without merging (tiktoken always does this; tokenizer.json
when `ignore_merges` is set, as Llama 3's is). Words repeat, so each word's ids are cached: the merge loop runs
once per distinct word, and tokenising a corpus costs about a regex pass and a dict lookup per word
(eval/bench/tokenizer.py measures it against sentencepiece).

tokenizer.json spells bytes in GPT-2's byte-to-unicode alphabet ("Ġ" is the space byte, bytes_to_unicode below);
tokens and merges are mapped back to raw bytes when read, so the loop above works on bytes for both files.

Special tokens (tekken's first `default_num_special_tokens` ids: <unk> <s> </s> [INST] [/INST] ...; tokenizer.json's
added tokens marked `special`) are never produced by `encode`: a literal "[INST]" or "</s>" in text is text, as
mistral-common encodes it and as the chat formats need (HF would turn a literal special string in a message into
the special id). tokenizer.json's added tokens that are not special are matched in text as HF matches them.
The chat format is chosen as for sentencepiece (models/tokenizer.py): a tekken file names its instruct version
(v3: system on the last user turn; v7: a [SYSTEM_PROMPT] block), a tokenizer.json needs its chat template.
"""
from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import gc
import json
import os
import unicodedata
from itertools import repeat

from models.chat_format import mistral_version
from models.tokenizer import TokenizerBase, _checkpoint_error, read_config

__all__ = ["BPETokenizer", "bytes_to_unicode", "GPT2_PATTERN"]

# The regex HF's ByteLevel pre-tokenizer applies when use_regex is true (GPT-2's).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# tekken config.version -> chat format: mistral-common's InstructTokenizerV3 puts the system message on the last
# user turn, V7 in a [SYSTEM_PROMPT] block; V11 and V13 change only tool calls and [THINK], so plain chats are V7's
# (tests/test_models_bpe.py checks all four against mistral-common). V15 adds model settings: not implemented.
TEKKEN_VERSIONS = {"v3": "mistral-v3", "v7": "mistral-v7", "v11": "mistral-v7", "v13": "mistral-v7"}
NORMALIZERS = ("NFC", "NFD", "NFKC", "NFKD")
CACHE_WORDS = 1 << 18  # distinct words remembered before the cache starts afresh


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 bytes to printable characters: printable Latin-1 bytes stand for themselves, the
    others (control bytes, space, ...) for chr(256 + n) in byte order: b" " -> "Ġ", b"\\n" -> "Ċ"."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in characters:
            characters[b], extra = chr(256 + extra), extra + 1
    return characters


# GPT-2's alphabet back to bytes, as a str.translate table: each alphabet character -> the Latin-1 character of its
# byte (encode("latin-1") then gives the byte), every other code point up to the alphabet's last (chr(323)) -> None.
_TO_LATIN1 = {code: None for code in range(256 + 68)}
_TO_LATIN1.update({ord(character): chr(b) for b, character in bytes_to_unicode().items()})


@contextlib.contextmanager
def _gc_paused():
    """The cyclic garbage collector off inside the block (as it was outside it)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_strict_base64 = functools.partial(binascii.a2b_base64, strict_mode=True)  # base64.b64decode(s, validate=True)


def _from_alphabet(tokens: list[str]) -> list[bytes] | None:
    """Each token of GPT-2's alphabet as the bytes it stands for, or None if any is not in the alphabet: C-level
    maps over the whole list (str.translate, then encode), no Python frame per token."""
    texts = list(map(str.translate, tokens, repeat(_TO_LATIN1)))
    try:
        if list(map(len, texts)) == list(map(len, tokens)):  # nothing deleted: no code point below chr(324) outside
            return list(map(str.encode, texts, repeat("latin-1")))  # the alphabet; none above it (not Latin-1)
    except UnicodeEncodeError:
        pass
    return None


def _tekken_tokens(entries: list) -> list[bytes] | None:
    """tekken.json's vocab entries' bytes ({"rank": i, "token_bytes": base64}, ranks 0, 1, ... in order, the first
    256 the single bytes), or None if any entry is otherwise: one C-level map for the base64 of all of them."""
    try:
        tokens = list(map(_strict_base64, [entry["token_bytes"] for entry in entries]))
        ranks_in_order = [entry.get("rank") for entry in entries] == list(range(len(entries)))
    except (TypeError, KeyError, ValueError, AttributeError):  # binascii.Error is a ValueError
        return None
    single_bytes = tokens[:256] == [bytes([b]) for b in range(min(256, len(tokens)))]
    return tokens if ranks_in_order and single_bytes else None


def _merge_ranks(merges: list, ids: dict) -> dict | None:
    """{(left bytes, right bytes): rank} of tokenizer.json's merges ("a b" or ["a", "b"]; a pair listed twice keeps
    its first rank), or None if any merge is not a pair of alphabet tokens whose concatenation is in `ids`."""
    pairs = [merge.split(" ") if isinstance(merge, str) else merge for merge in merges]
    if not all(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], str)
               for pair in pairs):
        return None
    halves = _from_alphabet([token for pair in pairs for token in pair])
    if halves is None:
        return None
    keys = list(zip(halves[0::2], halves[1::2]))
    if not all(left + right in ids for left, right in keys):
        return None
    return dict(zip(reversed(keys), range(len(keys) - 1, -1, -1)))  # written last, the first rank wins


def _regex_module():
    try:
        import regex  # \p{L}-style classes, which the standard library's re lacks
    except ImportError:
        raise _checkpoint_error("byte-level BPE tokenizers need the regex package: pip install regex") from None
    return regex


class BPETokenizer(TokenizerBase):
    """tekken.json or tokenizer.json (chosen by the file's name) with the chat format read beside it."""

    dummy_prefix = False

    def __init__(self, path: str | os.PathLike, chat_format: str | None = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise _checkpoint_error(f"{self.path}: tokenizer file not found")
        # A real vocabulary is ~300k small objects in no reference cycle; the cyclic collector's passes over them,
        # triggered by their allocation, were about half of SmolLM2's load time.
        with _gc_paused():
            document = read_config(self.path)  # a JSON object, or a one-line error naming the file
            config_path = os.path.join(os.path.dirname(os.path.abspath(self.path)), "tokenizer_config.json")
            config = read_config(config_path)
            self.token_bytes: list[bytes | None] = []  # id -> bytes (None: a special token)
            self.ids: dict[bytes, int] = {}  # bytes -> id of every ordinary token
            self.special: dict[str, int] = {}  # special token -> id, never matched in text
            self.added: dict[str, int] = {}  # tokenizer.json's non-special added tokens, matched in text
            self.normalizer, self.splits, self._cache = None, [], {}
            if os.path.basename(self.path) == "tekken.json" or "vocab" in document and "config" in document:
                control, detected = self._read_tekken(document)
            else:
                control, detected = self._read_tokenizer_json(document, config, config_path)
        self.vocab_size = len(self.token_bytes)
        self._choose_chat_format(chat_format, config, config_path, control, detected)

    # ---- the two files ---------------------------------------------------------------------------------------

    def _read_tekken(self, document: dict) -> tuple[set[str], tuple[str, str]]:
        """tekken.json: {"config": {pattern, default_vocab_size, default_num_special_tokens, version}, "vocab":
        [{"rank", "token_bytes" (base64), ...}], "special_tokens" (optional)}. As mistral-common reads it: ids
        0..n_special-1 are special (the file's list, else its default 20 then <SPECIAL_i> fillers), ranks are
        cut to default_vocab_size - n_special and sit above them, byte tokens first (rank b is byte b)."""
        self.kind = "tekken"
        config = _field(document, "config", dict, self.path)
        pattern = _field(config, "pattern", str, self.path, "config.")
        size = _field(config, "default_vocab_size", int, self.path, "config.")
        num_special = _field(config, "default_num_special_tokens", int, self.path, "config.")
        version = config.get("version")
        if version not in TEKKEN_VERSIONS:
            raise _checkpoint_error(f"{self.path}: config.version {version!r}: chat formats are implemented for "
                                    f"tekken {', '.join(TEKKEN_VERSIONS)}")
        vocab = _field(document, "vocab", list, self.path)
        if not num_special < size <= len(vocab) + num_special:
            raise _checkpoint_error(f"{self.path}: config.default_vocab_size {size} does not fit "
                                    f"{num_special} special tokens and {len(vocab)} ranks")
        listed = document.get("special_tokens") or [{"rank": r, "token_str": t} for r, t in enumerate(DEFAULT_SPECIAL)]
        if not all(isinstance(t, dict) and isinstance(t.get("rank"), int) and 0 <= t["rank"] < num_special
                   and isinstance(t.get("token_str"), str) for t in listed):
            raise _checkpoint_error(f"{self.path}: special_tokens entries need a rank below "
                                    f"default_num_special_tokens ({num_special}) and a token_str")
        self.special = {t["token_str"]: t["rank"] for t in listed}
        taken = set(self.special.values())  # the ranks no entry names: <SPECIAL_i> fillers, as in mistral-common
        self.special |= {f"<SPECIAL_{i}>": i for i in range(len(listed), num_special) if i not in taken}
        self.token_bytes = [None] * num_special
        entries = vocab[:size - num_special]
        tokens = _tekken_tokens(entries)
        if tokens is None:  # something is wrong: the loop names the first entry that shows it
            tokens = []
            for rank, entry in enumerate(entries):
                try:
                    token = base64.b64decode(entry["token_bytes"], validate=True)
                except (TypeError, KeyError, ValueError):
                    raise _checkpoint_error(f"{self.path}: vocab[{rank}].token_bytes is not base64 bytes") from None
                if entry.get("rank") != rank or (rank < 256 and token != bytes([rank])):
                    raise _checkpoint_error(f"{self.path}: vocab[{rank}] has rank {entry.get('rank')!r} and bytes "
                                            f"{token!r} (expected rank {rank}, the first 256 single bytes)")
                tokens.append(token)
        self.token_bytes += tokens
        self.ids.update(zip(tokens, range(num_special, num_special + len(tokens))))
        self.splits = [_compile(pattern, self.path, "config.pattern")]
        self.ignore_merges = True  # tiktoken: a word that is a token is that token
        self.missing_bytes = set()  # the first 256 ranks are the bytes
        ids = self.ids
        self._rank = lambda left, right: ids.get(left + right)  # tiktoken: the rank of the merged bytes
        self.bos_id, self.eos_id = self.special["<s>"], self.special["</s>"]
        self.pad_id = self.special.get("<pad>", self.eos_id)
        self.adds_bos = True
        # the tokens that say which Mistral format an [INST] template is: by the file's version (a v3 file lists
        # [SYSTEM_PROMPT] among its specials too, but mistral-common's V3 never writes it)
        inst = {"[INST]", "[/INST]"} | ({"[SYSTEM_PROMPT]"} if TEKKEN_VERSIONS[version] == "mistral-v7" else set())
        return inst, (TEKKEN_VERSIONS[version], f"no chat_template; config.version {version} of tekken.json")

    def _read_tokenizer_json(self, document: dict, config: dict,
                             config_path: str) -> tuple[set[str], tuple[str, str] | None]:
        """HF tokenizer.json with a BPE model and a ByteLevel pre-tokenizer; every other choice is refused."""
        self.kind = "tokenizer.json (byte-level BPE)"
        model = _field(document, "model", dict, self.path)
        _refuse_unless(model.get("type") == "BPE", self.path, "model.type", model.get("type"), "only BPE is read")
        for key in ("continuing_subword_prefix", "end_of_word_suffix"):
            _refuse_unless(not model.get(key), self.path, f"model.{key}", model.get(key), "not byte-level BPE")
        _refuse_unless(not model.get("dropout"), self.path, "model.dropout", model.get("dropout"),
                       "BPE dropout is for training a tokenizer")
        self.normalizer = _normalizer(document.get("normalizer"), self.path)
        byte_level = self._pre_tokenizer(document.get("pre_tokenizer"), "pre_tokenizer")
        _refuse_unless(byte_level, self.path, "pre_tokenizer", None, "a ByteLevel pre-tokenizer is needed")
        decoder = (document.get("decoder") or {}).get("type")
        _refuse_unless(decoder in (None, "ByteLevel"), self.path, "decoder.type", decoder, "ByteLevel expected")
        added = document.get("added_tokens") or []
        for position, token in enumerate(added):
            if not (isinstance(token, dict) and isinstance(token.get("id"), int) and isinstance(token.get("content"),
                                                                                                  str)):
                raise _checkpoint_error(f"{self.path}: added_tokens[{position}] needs an int id and a str content")
        self._read_vocabulary(model, added)
        self._read_added_tokens(added, config, config_path)
        self.adds_bos = _adds_bos(document.get("post_processor"), config, self.bos_id)
        if "[INST]" in self.special:  # a Mistral tokenizer converted to tokenizer.json
            marker = "[SYSTEM_PROMPT]" if "[SYSTEM_PROMPT]" in self.special else "[INST]"
            return set(self.special), (mistral_version(set(self.special)),
                                       f"no chat_template; {marker} is a special token of tokenizer.json")
        return set(self.special), None

    def _read_vocabulary(self, model: dict, added: list) -> None:
        """model.vocab and model.merges, their tokens mapped from GPT-2's alphabet back to bytes. All of a list's
        tokens are mapped at once (`_from_alphabet`, no Python frame per token: SmolLM2 has 147k of them); where
        that finds anything wrong, the per-token loop below finds the first culprit and names it."""
        def raw(token: str, where: str) -> bytes:
            mapped = _from_alphabet([token])
            if mapped is None:
                raise _checkpoint_error(f"{self.path}: {where} {token!r} is not in the byte-level alphabet")
            return mapped[0]

        vocab = _field(model, "vocab", dict, self.path, "model.")
        if not all(isinstance(index, int) and index >= 0 for index in vocab.values()):
            raise _checkpoint_error(f"{self.path}: model.vocab must map tokens to ids >= 0")
        size = max([*vocab.values(), *(t["id"] for t in added)], default=-1) + 1
        self.token_bytes = [None] * size
        added_ids = {t.get("id") for t in added}
        kept = [(token, index) for token, index in vocab.items() if index not in added_ids]  # an added token's
        tokens = _from_alphabet([token for token, _ in kept])  # content is not in the byte-level alphabet
        if tokens is None:
            tokens = [raw(token, "model.vocab token") for token, _ in kept]  # raises for the first culprit
        for (_, index), token in zip(kept, tokens):
            self.token_bytes[index] = token
            self.ids[token] = index
        # Real vocabularies may lack byte tokens (SmolLM2's lacks 21: 0xC0, 0xF5-0xFF, some control bytes). HF then
        # gives such a byte model.unk_token (one for a run of them with fuse_unk), or drops it before merging.
        self.missing_bytes = {bytes([b]) for b in range(256)} - self.ids.keys()
        self.unk_id = vocab.get(model.get("unk_token")) if model.get("unk_token") is not None else None
        self.fuse_unk = bool(model.get("fuse_unk"))
        merges = _field(model, "merges", list, self.path, "model.")
        pair_ranks = _merge_ranks(merges, self.ids)
        if pair_ranks is None:  # something is wrong: the loop stops at the first merge that shows it
            pair_ranks = {}
            for rank, merge in enumerate(merges):
                pair = merge.split(" ") if isinstance(merge, str) else merge  # "a b" (older files) or ["a", "b"]
                if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
                    raise _checkpoint_error(f"{self.path}: model.merges[{rank}] {merge!r} is not a pair of tokens")
                pair = raw(pair[0], "model.merges"), raw(pair[1], "model.merges")
                if pair[0] + pair[1] not in self.ids:
                    raise _checkpoint_error(f"{self.path}: model.merges[{rank}] {merge!r} makes no token of the "
                                            f"vocab")
                pair_ranks.setdefault(pair, rank)
        self._rank = lambda left, right: pair_ranks.get((left, right))
        self.ignore_merges = bool(model.get("ignore_merges"))

    def _read_added_tokens(self, added: list, config: dict, config_path: str) -> None:
        """added_tokens (special: never matched in text; not special: matched whole, as HF does) and the
        bos/eos/pad tokens tokenizer_config.json names among them."""
        for position, token in enumerate(added):
            where = f"added_tokens[{position}]"
            for flag in ("lstrip", "rstrip", "single_word"):
                _refuse_unless(not token.get(flag), self.path, f"{where}.{flag}", token.get(flag),
                               f"{token['content']!r}: stripping around added tokens is not implemented")
            if token.get("special"):
                self.special[token["content"]] = token["id"]
            else:  # text like any other: decoded as its content
                self.added[token["content"]], self.token_bytes[token["id"]] = token["id"], token["content"].encode()
        self._added_pattern = (_regex_module().compile("|".join(_regex_module().escape(t) for t in sorted(
            self.added, key=len, reverse=True))) if self.added else None)
        names = {key: _token_name(config.get(key)) for key in ("bos_token", "eos_token", "pad_token")}
        ids = {key: self.special.get(name, self.added.get(name)) for key, name in names.items()}
        if ids["eos_token"] is None:
            raise _checkpoint_error(f"{config_path}: eos_token {names['eos_token']!r} names no added token of "
                                    f"{self.path} (the chat format ends turns with it)")
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else self.eos_id

    def _pre_tokenizer(self, step, where: str) -> bool:
        """Append the regex splits of a pre_tokenizer to self.splits; True if it holds a ByteLevel step."""
        kind = (step or {}).get("type")
        if kind == "Sequence":
            found = [self._pre_tokenizer(s, f"{where}.pretokenizers[{i}]") for i, s in enumerate(step["pretokenizers"])]
            return any(found)
        if kind == "ByteLevel":
            _refuse_unless(not step.get("add_prefix_space"), self.path, f"{where}.add_prefix_space", True,
                           "a prefix space is a sentencepiece habit no byte-level checkpoint here uses")
            if step.get("use_regex", True):
                self.splits.append(_compile(GPT2_PATTERN, self.path, where))
            return True
        if kind == "Split":
            pattern = step.get("pattern") or {}
            _refuse_unless(step.get("behavior") == "Isolated" and not step.get("invert"), self.path,
                           f"{where}.behavior", step.get("behavior"), "Isolated (not inverted) is implemented")
            text = pattern.get("Regex")
            if text is None and isinstance(pattern.get("String"), str):
                text = _regex_module().escape(pattern["String"])
            _refuse_unless(isinstance(text, str), self.path, f"{where}.pattern", pattern, "a Regex or String")
            self.splits.append(_compile(text, self.path, f"{where}.pattern"))
            return False
        if kind == "Digits":  # SmolLM2: every digit a word of its own. A digit is Rust's char::is_numeric,
            # any of the Unicode number categories Nd, Nl, No (\p{N}): "²", "½" and "٣" too, not only 0-9
            self.splits.append(_compile(r"\p{N}" if step.get("individual_digits") else r"\p{N}+", self.path, where,
                                        covers=False))
            return False
        raise _checkpoint_error(f"{self.path}: {where}.type {kind!r}: not supported (ByteLevel, Split, Digits, "
                                f"Sequence are)")

    # ---- ids and text ----------------------------------------------------------------------------------------

    def special_id(self, piece: str) -> int | None:
        """The id of a special token ("[INST]", "<|im_end|>") or of a non-special added token."""
        return self.special.get(piece, self.added.get(piece))

    def words(self, text: str) -> list[str]:
        """Pre-tokenization: each regex in turn cuts every piece into its matches and the text between them
        (HF's Split "Isolated"). The word regexes match every character, so findall (C speed) is the cut unless
        its matches do not add up to the piece; then, and always for Digits, split() with the match captured."""
        pieces = [text]
        for pattern, splitter, covers in self.splits:
            cut = []
            for piece in pieces:
                found = pattern.findall(piece) if covers else []
                if sum(map(len, found)) != len(piece):
                    found = [part for part in splitter.split(piece) if part]
                cut += found
            pieces = cut
        return pieces

    def encode(self, text: str) -> list[int]:
        """The ids of `text`: no BOS, no EOS, no prefix space; special tokens stay text."""
        if not isinstance(text, str):
            raise TypeError(f"BPETokenizer.encode expects a str, got {type(text).__name__}")
        ids, cache = [], self._cache
        for chunk, added in self._added_split(text):
            if added is not None:
                ids.append(added)
                continue
            if self.normalizer:
                chunk = unicodedata.normalize(self.normalizer, chunk)
            for word in self.words(chunk):
                word_ids = cache.get(word)
                if word_ids is None:
                    if len(cache) >= CACHE_WORDS:
                        cache.clear()
                    word_ids = cache[word] = self._merge(word.encode("utf-8"))
                ids += word_ids
        return ids

    def _merge(self, word: bytes) -> list[int]:
        """The BPE merge loop of the module docstring, on one word's bytes."""
        if self.ignore_merges and word in self.ids:
            return [self.ids[word]]
        parts, rank = [word[i:i + 1] for i in range(len(word))], self._rank
        if self.missing_bytes and not self.missing_bytes.isdisjoint(parts):
            parts = self._unknown_bytes(parts)
        while len(parts) > 1:
            best, best_rank = -1, None
            for i in range(len(parts) - 1):
                r = rank(parts[i], parts[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return [self.unk_id if part is None else self.ids[part] for part in parts]

    def _unknown_bytes(self, parts: list[bytes]) -> list:
        """HF's BPE on a byte with no token: dropped (no unk_token), or None, which no pair merges with and which
        becomes unk_token's id (consecutive ones fused into one with fuse_unk)."""
        kept = []
        for part in parts:
            if part not in self.missing_bytes:
                kept.append(part)
            elif self.unk_id is not None and not (self.fuse_unk and kept and kept[-1] is None):
                kept.append(None)
        return kept

    def _added_split(self, text: str):
        """(chunk, None) for text and (content, id) for each non-special added token found in it, in order."""
        if self._added_pattern is None:
            return [(text, None)] if text else []
        out, end = [], 0
        for match in self._added_pattern.finditer(text):
            out += [(text[end:match.start()], None)] * (match.start() > end) + [(match.group(), self.added[
                match.group()])]
            end = match.end()
        return out + [(text[end:], None)] * (end < len(text))

    _added_pattern = None  # tekken has no non-special added tokens

    def decode(self, ids) -> str:
        """Text of `ids` with special ids (BOS, EOS, [INST], <|im_end|>) dropped; bytes that end mid-character
        become U+FFFD, as in tiktoken and HF."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"BPETokenizer.decode: ids {bad[:5]} outside the vocabulary [0, {self.vocab_size})")
        return b"".join(self.token_bytes[i] or b"" for i in ids).decode("utf-8", errors="replace")


# mistral-common's default special tokens of a tekken file that lists none (Tekkenizer.DEPRECATED_SPECIAL_TOKENS)
DEFAULT_SPECIAL = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                   "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
                   "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")


# ---- reading helpers ------------------------------------------------------------------------------------------

def _field(mapping: dict, key: str, kind: type, path: str, prefix: str = ""):
    value = mapping.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _checkpoint_error(f"{path}: {prefix}{key} missing or not a {kind.__name__}")
    return value


def _refuse_unless(ok: bool, path: str, field: str, value, why: str) -> None:
    if not ok:
        raise _checkpoint_error(f"{path}: {field} {value!r} is not supported ({why})")


def _compile(pattern: str, path: str, where: str, covers: bool = True):
    """(pattern, the pattern captured for split(), whether it is meant to match every character)."""
    regex = _regex_module()
    try:
        compiled = regex.compile(pattern)
        if compiled.groups:  # findall and split would return its groups: capture nothing of its own
            raise _checkpoint_error(f"{path}: {where}: a regex with capturing groups is not supported")
        return compiled, regex.compile(f"({pattern})"), covers
    except regex.error as error:
        raise _checkpoint_error(f"{path}: {where}: not a regex the regex package reads ({error})") from None


def _normalizer(step, path: str) -> str | None:
    """None, or the one Unicode normal form tokenizer.json applies (Qwen2's NFC)."""
    kinds = [s.get("type") for s in step.get("normalizers", [])] if (step or {}).get("type") == "Sequence" else [
        (step or {}).get("type")]
    kinds = [k for k in kinds if k is not None]
    _refuse_unless(len(kinds) <= 1 and all(k in NORMALIZERS for k in kinds), path, "normalizer", kinds,
                   f"one of {', '.join(NORMALIZERS)} is implemented; sentencepiece-style BPEs: use tokenizer.model")
    return kinds[0] if kinds else None


def _token_name(value) -> str | None:
    """tokenizer_config.json writes a token as "<s>" or as {"content": "<s>", ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _adds_bos(post_processor, config: dict, bos_id: int | None) -> bool:
    """Whether HF's tokenizer starts a sequence with BOS (add_special_tokens=True): a TemplateProcessing whose
    single-sequence template begins with a special token, or tokenizer_config.json's add_bos_token."""
    steps = (post_processor or {}).get("processors", [post_processor]) if post_processor else []
    for step in steps:
        single = (step or {}).get("single") if (step or {}).get("type") == "TemplateProcessing" else None
        if single and "SpecialToken" in single[0]:
            return True
    return bool(config.get("add_bos_token")) and bos_id is not None
