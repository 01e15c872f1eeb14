"""data/sft.py: SFT records -> token-exact sequences, masks, truncation, errors.

Oracles: the tokenizer's own `encode_chat` (prompt + response built segment by segment) for token-exactness;
the mask derived by hand (targets[t] = ids[t + 1], response tokens and EOS only); hand-written bad files with
their exact one-line messages.
"""
import json

import pytest
import torch

from data.preferences import DataError
from data.sft import SequenceBatches, collate_sequences, load_sft_data
from models import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_run):
    return Tokenizer(tiny_run["model"] / "tokenizer.model")


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_layouts_are_token_exact(tokenizer, tmp_path):
    path = write(tmp_path / "sft.jsonl", [
        {"prompt": "which pet is best?", "response": "dogs are loyal"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sky?"},
                      {"role": "assistant", "content": "blue"}]},
        {"prompt": [{"role": "user", "content": "a cat?"}, {"role": "assistant", "content": "calm"},
                    {"role": "user", "content": "a dog?"}], "response": "loyal"},
    ])
    examples, summary = load_sft_data(path, tokenizer, max_length=64, max_prompt_length=48)
    expected = [
        tokenizer.encode_chat([{"role": "user", "content": "which pet is best?"},
                               {"role": "assistant", "content": "dogs are loyal"}]),
        tokenizer.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sky?"},
                               {"role": "assistant", "content": "blue"}]),
        tokenizer.encode_chat([{"role": "user", "content": "a cat?"}, {"role": "assistant", "content": "calm"},
                               {"role": "user", "content": "a dog?"}, {"role": "assistant", "content": "loyal"}]),
    ]
    assert [(e.prompt_ids, e.response_ids) for e in examples] == [tuple(x) for x in expected]
    assert all(e.response_ids[-1] == tokenizer.eos_id and e.response_ids.count(tokenizer.eos_id) == 1
               for e in examples)
    assert summary.num_kept == 3 and "read 3 records" in summary.format()


def test_collate_mask_covers_response_and_eos():
    from data.sft import SequenceExample

    batch = collate_sequences([SequenceExample([1, 5, 6], [7, 2], index=0), SequenceExample([1, 9], [3, 4, 8, 2],
                                                                                           index=1)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 2, 0], [1, 9, 3, 4, 8, 2]]
    assert batch["targets"].tolist() == [[5, 6, 7, 2, 0, 0], [9, 3, 4, 8, 2, 0]]
    # Positions whose target is a response token or EOS: row 0 predicts 7, 2 at t = 2, 3; row 1 predicts 3, 4, 8, 2.
    assert batch["loss_mask"].tolist() == [[False, False, True, True, False, False],
                                           [False, True, True, True, True, False]]
    assert batch["attention_mask"].sum(-1).tolist() == [5, 6]


def test_truncation_keeps_prompt_end_and_response_start(tokenizer, tmp_path):
    long_prompt = " ".join(["the cat sat on the mat"] * 8)
    path = write(tmp_path / "sft.jsonl", [{"prompt": long_prompt, "response": "dogs are loyal and the sun is warm"}])
    (example,), summary = load_sft_data(path, tokenizer, max_length=20, max_prompt_length=12)
    full_prompt = tokenizer.encode_prompt([{"role": "user", "content": long_prompt}])
    full_response = tokenizer.encode_response("dogs are loyal and the sun is warm")
    assert example.prompt_ids == full_prompt[:1] + full_prompt[-11:]
    assert example.response_ids == full_response[:8]
    assert len(example.prompt_ids) + len(example.response_ids) == 20
    assert len(summary.truncated) == 2


def test_empty_response_is_skipped_and_counted(tokenizer, tmp_path):
    path = write(tmp_path / "sft.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "  "}])
    examples, summary = load_sft_data(path, tokenizer, 32, 16)
    assert len(examples) == 1 and summary.skipped == {"empty response": [2]}


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "a", "response": "b"}, {"prompt": "a"}], ':2: missing field "response"'),
    (['{"prompt": "a", "response": '], ":1: malformed JSON"),
    ([{"prompt": 3, "response": "b"}], ':1: field "prompt" must be a string or a list of messages, got a number'),
    ([{"prompt": "a", "response": ["b"]}], ':1: field "response" must be a string, got list'),
    ([{"messages": [{"role": "user", "content": "a"}]}], ':1: "messages" must end with an assistant turn'),
])
def test_bad_records_fail_with_one_line(tokenizer, tmp_path, rows, message):
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_sft_data(path, tokenizer, 32, 16)
    assert str(error.value).startswith(str(path)) and message in str(error.value)
    assert "\n" not in str(error.value)


def test_sequence_batches_resume_exactly(tokenizer, tmp_path):
    path = write(tmp_path / "sft.jsonl", [{"prompt": f"q {i}", "response": "a" * (i % 5 + 1)} for i in range(10)])
    examples, _ = load_sft_data(path, tokenizer, 32, 16)
    first = SequenceBatches(examples, 3, tokenizer.pad_id, seed=7)
    seen = [next(first) for _ in range(5)]
    second = SequenceBatches(examples, 3, tokenizer.pad_id, seed=7)
    [next(second) for _ in range(2)]
    resumed = SequenceBatches(examples, 3, tokenizer.pad_id, seed=7)
    resumed.load_state_dict(second.state_dict())
    for expected in seen[2:]:
        got = next(resumed)
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    # Every example is visited exactly once per epoch.
    epoch = SequenceBatches(examples, 3, tokenizer.pad_id, seed=7)
    indices = torch.cat([next(epoch)["index"] for _ in range(len(epoch))]).tolist()
    assert sorted(indices) == list(range(10))
