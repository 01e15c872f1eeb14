"""models.Tokenizer: sentencepiece ids and the Mistral v0.1/v0.2 chat format.

Oracles: the raw `sentencepiece.SentencePieceProcessor` (the chat format must equal the segment-by-segment
composition BOS + enc("[INST] ... [/INST]") + enc(reply) + EOS + ..., computed here independently), Mistral's
documented rendering `<s> [INST] user [/INST] assistant</s> [INST] ...` (read back through decode), and the
invariant decode(encode(x)) == x, which byte fallback must keep for characters the model never saw.

The sentencepiece model is trained here, in pytest's tmp dir, with Mistral's settings: BPE, byte fallback,
unk=0 "<unk>", bos=1 "<s>", eos=2 "</s>", no pad, identity normalisation, extra whitespace kept, a dummy prefix.
"""
import pytest
import sentencepiece

from models.tokenizer import Tokenizer

TRAINING_TEXT = """\
[INST] What is the capital of France? [/INST] Paris is the capital of France.
[INST] Write a short poem about the sea. [/INST] The sea is wide, the sea is deep, it rocks the boats to sleep.
Preference learning aligns language models with what people prefer, one comparison at a time.
Soft preference learning separates the entropy and the cross-entropy terms of the KL penalty.
The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all.
Human: Can you help me with my homework? Assistant: Of course, what is the question?
Numbers like 12, 345 and 6789 are split into single digits by the tokenizer.
"""


def train_tokenizer_model(directory) -> str:
    """Train a tiny Mistral-like sentencepiece model in `directory`; return the tokenizer.model path."""
    prefix = str(directory / "tokenizer")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines() * 4), model_prefix=prefix, model_type="bpe",
        vocab_size=420, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        split_digits=True, allow_whitespace_only_pieces=True, hard_vocab_limit=False, minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train_tokenizer_model(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return Tokenizer(model_path)


@pytest.fixture(scope="module")
def sp(model_path):
    return sentencepiece.SentencePieceProcessor(model_file=model_path)


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And a poem about the sea?"},
    {"role": "assistant", "content": "The sea is wide."},
]


def test_special_ids_and_plain_encoding(tokenizer, sp):
    """Mistral's ids; pad falls back to EOS (no pad piece); encode is sentencepiece with no BOS/EOS added."""
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)
    assert sp.id_to_piece(1) == "<s>" and sp.id_to_piece(2) == "</s>" and sp.id_to_piece(0) == "<unk>"
    assert tokenizer.vocab_size == sp.vocab_size()
    for text in ["Paris is the capital.", "  two  spaces\n\nand newlines", "12345", ""]:
        assert tokenizer.encode(text) == sp.encode(text)
        assert tokenizer.bos_id not in tokenizer.encode(text) and tokenizer.eos_id not in tokenizer.encode(text)


def test_chat_encoding_is_the_segment_by_segment_composition(tokenizer, sp):
    """encode_chat: prompt = BOS + enc("[INST] sys\\n\\nu1 [/INST]") + enc(a1) + EOS + enc("[INST] u2 [/INST]"),
    response = enc(a2) + EOS, every segment encoded on its own with raw sentencepiece."""
    expected_prompt = ([1] + sp.encode("[INST] You are terse.\n\nWhat is the capital of France? [/INST]")
                       + sp.encode("Paris.") + [2] + sp.encode("[INST] And a poem about the sea? [/INST]"))
    expected_response = sp.encode("The sea is wide.") + [2]
    prompt_ids, response_ids = tokenizer.encode_chat(CONVERSATION)
    assert prompt_ids == expected_prompt
    assert response_ids == expected_response
    assert tokenizer.encode_prompt(CONVERSATION[:-1]) == prompt_ids  # the prompt is an exact token prefix
    assert tokenizer.encode_response("The sea is wide.") == response_ids


def test_chat_without_system_and_single_turn(tokenizer, sp):
    """One user turn: BOS + enc("[INST] u [/INST]"); no system text means no blank line is added."""
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]
    prompt_ids, response_ids = tokenizer.encode_chat(messages)
    assert prompt_ids == [1] + sp.encode("[INST] Hi there [/INST]")
    assert response_ids == sp.encode("Hello") + [2]


def test_decoded_chat_reads_as_mistral_documents_it(tokenizer):
    """Mistral's docs render V1 as `<s> [INST] sys\\n\\nu1 [/INST] a1</s> [INST] u2 [/INST] a2</s>`.

    decode drops <s> and </s>; each segment's dummy-prefix "▁" becomes the space before `[INST]` and before
    each reply, and the very first one is dropped by sentencepiece, so the text must read as written here.
    """
    prompt_ids, response_ids = tokenizer.encode_chat(CONVERSATION)
    ids = prompt_ids + response_ids
    assert tokenizer.decode(ids) == ("[INST] You are terse.\n\nWhat is the capital of France? [/INST] Paris. "
                                     "[INST] And a poem about the sea? [/INST] The sea is wide.")
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
    assert ids[-1] == tokenizer.eos_id and ids.count(tokenizer.eos_id) == 2  # one per assistant turn


@pytest.mark.parametrize("text", [
    "Paris is the capital of France.",
    "emoji 😀🚀 and CJK 日本語 and accents éàü",
    "tabs\tand\nnewlines\n\n  and  double  spaces ",
    "digits 1234567890",
])
def test_decode_inverts_encode_with_byte_fallback(tokenizer, sp, text):
    """decode(encode(x)) == x; characters unseen in training become byte pieces, never <unk>."""
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert 0 not in ids
    assert tokenizer.decode([tokenizer.bos_id] + ids + [tokenizer.eos_id]) == text  # control ids dropped
    if "😀" in text:
        assert any(sp.is_byte(i) for i in ids)


def test_literal_eos_text_is_not_the_eos_id(tokenizer):
    """A reply that contains the string "</s>" still ends with exactly one EOS id (no doubling, no injection)."""
    response_ids = tokenizer.encode_response("done </s>")
    assert response_ids.count(tokenizer.eos_id) == 1 and response_ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(response_ids) == "done </s>"


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer):
    with pytest.raises(ValueError, match=r"outside the vocabulary"):
        tokenizer.decode([5, tokenizer.vocab_size])


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"),
    ([{"role": "bot", "content": "x"}], "unknown role 'bot'"),
    ([{"role": "user"}], "'role' and 'content'"),
    ([{"role": "user", "content": 3}], "content must be a str"),
    ([{"role": "assistant", "content": "a"}], "message 0: the conversation starts with an assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
     "message 1: a system message after the first turn is not supported"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}, {"role": "user", "content": "b"}],
     "message 1: empty assistant turn"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "must end with a user turn"),
])
def test_encode_prompt_rejects_bad_messages(tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        tokenizer.encode_prompt(messages)


def test_encode_chat_needs_a_final_assistant_turn(tokenizer):
    with pytest.raises(ValueError, match="must end with an assistant turn"):
        tokenizer.encode_chat([{"role": "user", "content": "a"}])


def test_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "absent.model")
