"""data.tokenization: token-exact prompt/response boundaries, truncation in token space, load_preference_data.

Oracles: the raw `sentencepiece.SentencePieceProcessor`, with which this file builds every conversation
segment by segment on its own (BOS + enc("[INST] ... [/INST]") + enc(reply) + EOS + ...); truncation results
worked out by hand from the rule in data/tokenization.py's docstring; counts derived from the fixture.
"""
import json

import pytest
import sentencepiece

from data.tokenization import PreferenceExample, check_lengths, load_preference_data, truncate_pair
from models.tokenizer import Tokenizer

BOS, EOS = 1, 2
TRAINING_TEXT = """\
[INST] What is the capital of France? [/INST] Paris is the capital of France.
Preference learning aligns language models with what people prefer, one comparison at a time.
The quick brown fox jumps over the lazy dog. Human: Can you help me? Assistant: Of course.
"""


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A tiny sentencepiece model with Mistral's settings (see tests/test_models_tokenizer.py), trained in a tmp dir."""
    prefix = str(tmp_path_factory.mktemp("spm") / "tokenizer")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_TEXT.splitlines() * 4), model_prefix=prefix, model_type="bpe",
        vocab_size=360, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, hard_vocab_limit=False, minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return Tokenizer(model_path)


@pytest.fixture(scope="module")
def sp(model_path):
    return sentencepiece.SentencePieceProcessor(model_file=model_path)


def conversation_ids(sp, messages):
    """The oracle: a whole conversation, each segment encoded on its own with raw sentencepiece."""
    ids, system = [BOS], None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    for position, message in enumerate(messages):
        if message["role"] == "user":
            content = system + "\n\n" + message["content"] if position == 0 and system else message["content"]
            ids += sp.encode("[INST] " + content + " [/INST]")
        else:
            ids += sp.encode(message["content"]) + [EOS]
    return ids


SHARED_HH = "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Capital of France?\n\nAssistant:"
PAIRS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon, I think."},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "A fox?"}],
     "chosen": [{"role": "assistant", "content": "Quick and brown 🦊."}],
     "rejected": [{"role": "assistant", "content": "A dog."}], "chosen_prob": 0.7},
    {"chosen": SHARED_HH + " Paris is the capital of France.", "rejected": SHARED_HH + " Paris, or Lyon."},
    {"prompt": "Say done.", "chosen": "done </s>", "rejected": "  no"},
]
PROMPT_MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    PAIRS[1]["prompt"],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Capital of France?"}],
    [{"role": "user", "content": "Say done."}],
]
REPLIES = [("Paris.", "Lyon, I think."), ("Quick and brown 🦊.", "A dog."),
           ("Paris is the capital of France.", "Paris, or Lyon."), ("done </s>", "  no")]


def write_jsonl(path, objects):
    path.write_text("".join(json.dumps(obj) + "\n" for obj in objects), encoding="utf-8")
    return path


def test_prompt_plus_response_is_the_whole_conversation_built_segment_by_segment(tmp_path, tokenizer, sp):
    """For every layout: prompt_ids + chosen_ids == the conversation with the chosen reply, built here; same
    for rejected; each response ends with exactly one EOS; the prompt holds one EOS per earlier assistant turn."""
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    examples, summary = load_preference_data(path, tokenizer, max_length=512, max_prompt_length=256)
    assert [e.index for e in examples] == [0, 1, 2, 3] and summary.num_kept == 4 and summary.truncated == {}
    for example, messages, (chosen, rejected) in zip(examples, PROMPT_MESSAGES, REPLIES):
        assert example.prompt_ids + example.chosen_ids == conversation_ids(sp, messages + [
            {"role": "assistant", "content": chosen}])
        assert example.prompt_ids + example.rejected_ids == conversation_ids(sp, messages + [
            {"role": "assistant", "content": rejected}])
        for response_ids in (example.chosen_ids, example.rejected_ids):
            assert response_ids[-1] == EOS and response_ids.count(EOS) == 1
        assert example.prompt_ids.count(EOS) == sum(m["role"] == "assistant" for m in messages)
        assert example.prompt_ids[0] == BOS and example.prompt_ids.count(BOS) == 1
    assert [e.chosen_prob for e in examples] == [1.0, 0.7, 1.0, 1.0]


def test_truncate_pair_by_hand():
    """max_length 6, max_prompt_length 3: the prompt [1,10..14] keeps BOS + its last 2 tokens -> [1,13,14];
    the response budget is 6 - 3 = 3, so [20,21,22,EOS] -> [20,21,22] (start kept, EOS lost) and [30,EOS] fits."""
    prompt, chosen, rejected = truncate_pair([1, 10, 11, 12, 13, 14], [20, 21, 22, 2], [30, 2], 6, 3)
    assert (prompt, chosen, rejected) == ([1, 13, 14], [20, 21, 22], [30, 2])
    assert truncate_pair([1, 10], [20, 2], [30, 2], 6, 3) == ([1, 10], [20, 2], [30, 2])  # fits: unchanged


def test_truncation_keeps_prompt_end_and_response_start_and_counts(tmp_path, tokenizer, sp):
    """Long multi-turn prompt and long replies: the prompt keeps BOS and its end (the last turn), the replies
    keep their start; pairs that become identical or leave no room are skipped, with reasons and lines."""
    long_turn = "The quick brown fox jumps over the lazy dog. " * 6
    prompt = [{"role": "user", "content": long_turn}, {"role": "assistant", "content": long_turn},
              {"role": "user", "content": "Capital of France?"}]
    chosen, rejected = "Paris is the capital of France. " * 4, "Preference learning aligns models. " * 4
    path = write_jsonl(tmp_path / "long.jsonl", [
        {"prompt": prompt, "chosen": chosen, "rejected": rejected},
        {"prompt": "Hi", "chosen": "Paris is the capital of France.", "rejected": "Paris is the capital of Spain."},
        {"prompt": "Hi", "chosen": "short", "rejected": "reply"},
    ])
    max_length, max_prompt_length = 40, 24
    examples, summary = load_preference_data(path, tokenizer, max_length, max_prompt_length)

    full_prompt = conversation_ids(sp, prompt)
    full_chosen = sp.encode(chosen) + [EOS]
    assert len(full_prompt) > max_prompt_length and len(full_chosen) > max_length - max_prompt_length
    first = examples[0]
    assert first.prompt_ids == [BOS] + full_prompt[-(max_prompt_length - 1):]
    tail = sp.encode("[INST] Capital of France? [/INST]")
    assert first.prompt_ids[-len(tail):] == tail  # the latest turn survives whole
    assert first.chosen_ids == full_chosen[:max_length - max_prompt_length]  # its start; no EOS
    assert first.rejected_ids == (sp.encode(rejected) + [EOS])[:max_length - max_prompt_length]
    assert EOS not in first.chosen_ids and len(first.prompt_ids) + len(first.chosen_ids) == max_length

    assert (summary.num_read, summary.num_kept, summary.num_skipped) == (3, 3, 0)
    assert summary.truncated == {f"prompts cut to max_prompt_length={max_prompt_length} (kept their end)": 1,
                                 f"responses cut to fit max_length={max_length} (kept their start)": 2}
    assert "  truncated 1: prompts cut to max_prompt_length=24 (kept their end)" in summary.format().splitlines()

    _, full = load_preference_data(path, tokenizer, max_length=24, max_prompt_length=24)  # prompt may fill all
    assert full.skipped == {"prompt fills max_length=24, no room for a response": [1]}


def test_pairs_identical_once_cut_are_skipped(tmp_path, tokenizer, sp):
    """Two replies that share their first k tokens, with a budget of exactly k tokens, become one reply."""
    chosen, rejected = "Paris is the capital of France.", "Paris is the capital of Spain."
    shared = sp.encode("Paris is the capital of")
    assert sp.encode(chosen)[:len(shared)] == shared == sp.encode(rejected)[:len(shared)]  # premise
    prompt_length = len(conversation_ids(sp, [{"role": "user", "content": "Hi"}]))
    path = write_jsonl(tmp_path / "tight.jsonl", [{"prompt": "Hi", "chosen": "yes", "rejected": "no"},
                                                  {"prompt": "Hi", "chosen": chosen, "rejected": rejected}])
    max_length = prompt_length + len(shared)
    examples, summary = load_preference_data(path, tokenizer, max_length, max_prompt_length=prompt_length)
    assert len(examples) == 1 and summary.num_kept == 1
    assert summary.skipped == {f"chosen and rejected are identical once cut to max_length={max_length}": [2]}
    _, roomier = load_preference_data(path, tokenizer, max_length + 1, max_prompt_length=prompt_length)
    assert roomier.num_kept == 2 and roomier.skipped == {}


def test_summary_counts_reader_and_tokenizer_skips_together(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"prompt": "a", "chosen": "x", "rejected": "x"},
        {"prompt": "b", "chosen": "yes", "rejected": "no"},
    ])
    examples, summary = load_preference_data(path, tokenizer, max_length=64, max_prompt_length=32)
    assert len(examples) == 1 and examples[0].index == 0
    assert summary.format().splitlines() == [f"{path}: read 2 pairs, kept 1, skipped 1",
                                             "  skipped 1: chosen and rejected responses are identical (line 1)"]


@pytest.mark.parametrize("max_length, max_prompt_length", [(10, 11), (10, 1), (10.0, 4)])
def test_bad_lengths(max_length, max_prompt_length):
    with pytest.raises(ValueError, match="need 2 <= max_prompt_length <= max_length"):
        check_lengths(max_length, max_prompt_length)


def test_preference_example_requires_its_index():
    with pytest.raises(TypeError):
        PreferenceExample([1], [2], [3], 1.0)
    with pytest.raises(ValueError, match="chosen_prob must be in"):
        PreferenceExample([1], [2], [3], 1.5, index=0)
