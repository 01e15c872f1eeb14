"""data.preferences: readers for the layouts users have, skip accounting, and one-line errors for bad input.

Oracles: fixtures written here in exactly the published layouts (TRL standard and conversational,
UltraFeedback-binarized, HH-RLHF transcripts), with the expected messages and replies worked out by hand from
each layout's definition; line numbers and byte columns computed here from the bytes the test wrote.
"""
import hashlib
import json

import pytest

from data.preferences import DataError, read_preferences, split_hh_transcripts


def write_jsonl(path, objects):
    path.write_text("".join(json.dumps(obj) + "\n" for obj in objects), encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def test_standard_layout(tmp_path):
    """TRL standard: the prompt string becomes one user message; line numbers count blank lines too."""
    path = tmp_path / "standard.jsonl"
    path.write_text(json.dumps({"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."}) + "\n\n"
                    + json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5", "chosen_prob": 0.75}) + "\n")
    records, summary = read_preferences(path)
    assert [(r.prompt, r.chosen, r.rejected, r.chosen_prob, r.line) for r in records] == [
        ([user("Capital of France?")], "Paris.", "Lyon.", 1.0, 1),
        ([user("2+2?")], "4", "5", 0.75, 3),
    ]
    assert (summary.num_read, summary.num_kept, summary.num_skipped) == (2, 2, 0)
    # The content hash: sha256 of one canonical JSON line [prompt, chosen, rejected, chosen_prob] per record kept.
    canonical = "".join(json.dumps(content, ensure_ascii=False, sort_keys=True) + "\n" for content in [
        [[user("Capital of France?")], "Paris.", "Lyon.", 1.0], [[user("2+2?")], "4", "5", 0.75]])
    assert summary.sha256 == hashlib.sha256(canonical.encode()).hexdigest()


def test_conversational_layout_with_system_message_and_multi_turn_prompt(tmp_path):
    """TRL conversational: prompt is a message list (system first), chosen / rejected one assistant message."""
    prompt = [{"role": "system", "content": "Be brief."}, user("Hi"), assistant("Hello!"), user("Name a colour.")]
    path = write_jsonl(tmp_path / "conv.jsonl", [
        {"prompt": prompt, "chosen": [assistant("Blue.")], "rejected": [assistant("I cannot.")]}])
    (record,), _ = read_preferences(path)
    assert (record.prompt, record.chosen, record.rejected) == (prompt, "Blue.", "I cannot.")


def test_ultrafeedback_binarized_layout(tmp_path):
    """UltraFeedback-binarized: prompt is the user's string, chosen / rejected the whole conversation; scores
    and `messages` are ignored. A system message in the conversation is kept as part of the prompt."""
    path = write_jsonl(tmp_path / "uf.jsonl", [
        {"prompt": "Explain DPO.", "prompt_id": "abc", "score_chosen": 8.0, "score_rejected": 3.5,
         "chosen": [user("Explain DPO."), assistant("A preference loss.")],
         "rejected": [user("Explain DPO."), assistant("No idea.")],
         "messages": [user("Explain DPO."), assistant("A preference loss.")]},
        {"prompt": "Say hi.",
         "chosen": [{"role": "system", "content": "Be kind."}, user("Say hi."), assistant("Hi!")],
         "rejected": [{"role": "system", "content": "Be kind."}, user("Say hi."), assistant("No.")]},
    ])
    first, second = read_preferences(path)[0]
    assert (first.prompt, first.chosen, first.rejected) == ([user("Explain DPO.")], "A preference loss.", "No idea.")
    assert second.prompt == [{"role": "system", "content": "Be kind."}, user("Say hi.")]
    assert (second.chosen, second.rejected) == ("Hi!", "No.")


def test_hh_rlhf_multi_turn_transcripts(tmp_path):
    """HH-RLHF: the prompt is everything through the last shared "\\n\\nAssistant:", split into turns.

    The two replies here share their first characters ("4"), so the shared string prefix runs past the
    marker; the prompt must still end at the marker, and each reply is the rest, stripped.
    """
    shared = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: What is 2+2?\n\nAssistant:"
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": shared + " 4, of course.", "rejected": shared + " 4 or 5."},
        {"chosen": "\n\nHuman: Tell me a joke.\n\nAssistant: Why did the chicken cross the road?",
         "rejected": "\n\nHuman: Tell me a joke.\n\nAssistant: No."},
    ])
    (multi, single), summary = read_preferences(path)
    assert multi.prompt == [user("Hi there"), assistant("Hello! How can I help?"), user("What is 2+2?")]
    assert (multi.chosen, multi.rejected) == ("4, of course.", "4 or 5.")
    assert single.prompt == [user("Tell me a joke.")]
    assert (single.chosen, single.rejected) == ("Why did the chicken cross the road?", "No.")
    assert summary.num_kept == 2


def test_hh_transcripts_that_diverge_before_the_last_turn_are_skipped(tmp_path):
    shared = "\n\nHuman: Hi\n\nAssistant:"
    messages, chosen, rejected = split_hh_transcripts(shared + " Hello", shared + " Hey")
    assert (messages, chosen, rejected) == ([user("Hi")], "Hello", "Hey")
    path = write_jsonl(tmp_path / "hh_bad.jsonl", [
        {"chosen": shared + " A\n\nHuman: more\n\nAssistant: B", "rejected": shared + " C"},
        {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nHuman: b\n\nAssistant: y"},
        {"chosen": "Preamble" + shared + " x", "rejected": "Preamble" + shared + " y"},
    ])
    records, summary = read_preferences(path)
    assert records == []
    assert summary.skipped == {"HH-RLHF transcripts differ before their last turn": [1],
                               "HH-RLHF transcript turns do not alternate Human, Assistant": [2],
                               'HH-RLHF transcript does not start with "\\n\\nHuman:"': [3]}
    with pytest.raises(ValueError, match="share no"):
        split_hh_transcripts("\n\nHuman: a", "\n\nHuman: b")


def test_json_array_detected_by_content_with_element_lines(tmp_path):
    """A JSON array (here in a file named .jsonl: detection is by content) reports the line each element starts on."""
    elements = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]
    text = "[\n" + ",\n".join(json.dumps(e, indent=2) for e in elements) + "\n]\n"
    path = tmp_path / "array.jsonl"
    path.write_text(text)
    second_start = text.index('{\n  "prompt": "d"')
    records, _ = read_preferences(path)
    second_line = text.count("\n", 0, second_start) + 1
    assert [(r.prompt[0]["content"], r.line) for r in records] == [("a", 2), ("d", second_line)]


def test_column_map_and_soft_labels(tmp_path):
    path = write_jsonl(tmp_path / "mapped.jsonl", [{"question": "q", "good": "g", "bad": "b", "p": 0.6}])
    column_map = {"prompt": "question", "chosen": "good", "rejected": "bad", "chosen_prob": "p"}
    (record,), _ = read_preferences(path, column_map)
    assert (record.prompt, record.chosen, record.rejected, record.chosen_prob) == ([user("q")], "g", "b", 0.6)
    with pytest.raises(ValueError, match="column_map: unknown column 'answer'"):
        read_preferences(path, {"answer": "x"})


def test_unusable_pairs_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "skips.jsonl", [
        {"prompt": "q1", "chosen": "same", "rejected": "same"},
        {"prompt": "q2", "chosen": "ok", "rejected": "fine"},
        {"prompt": "q3", "chosen": "  ", "rejected": "x"},
        {"prompt": "q4", "chosen": "x", "rejected": ""},
        {"prompt": " ", "chosen": "x", "rejected": "y"},
        {"prompt": "q6", "chosen": "dup", "rejected": "dup"},
    ])
    records, summary = read_preferences(path)
    assert [r.line for r in records] == [2]
    assert (summary.num_read, summary.num_kept, summary.num_skipped) == (6, 1, 5)
    assert summary.format().splitlines() == [
        f"{path}: read 6 pairs, kept 1, skipped 5",
        "  skipped 2: chosen and rejected responses are identical (line 1, 6)",
        "  skipped 1: empty chosen response (line 3)",
        "  skipped 1: empty rejected response (line 4)",
        "  skipped 1: empty prompt (line 5)",
    ]


GOOD = json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})


@pytest.mark.parametrize("content, line, problem", [
    (GOOD + '\n{"prompt": "p", "chosen": "c"\n', 2, "malformed JSON: Expecting ',' delimiter (column 30)"),
    (GOOD + "\n" + GOOD + '\n{"prompt": "p", "chosen": "c"}\n', 3, 'missing field "rejected"'),
    ('{"prompt": "p", "chosen": 5, "rejected": "r"}\n', 1,
     'field "chosen" must be a string or a list of messages, got a number'),
    ('{"prompt": {"a": 1}, "chosen": "c", "rejected": "r"}\n', 1,
     'field "prompt" must be a string or a list of messages, got an object'),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "chosen_prob": 1.5}\n', 1,
     'field "chosen_prob" must be a number in [0, 1], got 1.5'),
    ('{"prompt": "p", "chosen": "c", "rejected": "r", "chosen_prob": true}\n', 1,
     'field "chosen_prob" must be a number in [0, 1], got true'),
    (GOOD + "\n[1, 2]\n", 2, "expected a JSON object, got an array"),
    ("[1, 2]\n", 1, "expected a JSON object, got a number"),
    ('{"chosen": "c", "rejected": "r"}\n', 1,
     'missing field "prompt" ("chosen" and "rejected" are not HH-RLHF transcripts: they share no '
     '"\\n\\nAssistant:" turn)'),
    ('{"prompt": [{"role": "robot", "content": "x"}], "chosen": "c", "rejected": "r"}\n', 1,
     "field \"prompt\": message 0: unknown role 'robot' (expected one of ('system', 'user', 'assistant'))"),
    ('{"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "user", "content": "c"}], '
     '"rejected": "r"}\n', 1, "field \"chosen\": the last message must be the assistant's reply, got role 'user'"),
    ("[\n" + GOOD + ",\n" + GOOD + ",\n]\n", 4, "malformed JSON in array element 2: Expecting value (column 1)"),
    ("[\n" + GOOD + "\n" + GOOD + "\n]\n", 3, "malformed JSON: expected ',' or ']' after array element 0"),
    ('{\n  "prompt": "p",\n  "chosen": "c",\n  "rejected": "r"\n}\n', 1,
     "the file is one JSON object; expected JSON Lines (one object per line) or a JSON array"),
    ("[]\n", None, "JSON array is empty (no preference pairs)"),
    ("", None, "file is empty (no preference pairs)"),
    ("\n  \n", None, "file is empty (no preference pairs)"),
])
def test_bad_input_is_one_line_naming_file_and_line(tmp_path, content, line, problem):
    path = tmp_path / "x.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as raised:
        read_preferences(path)
    location = f"{path}:{line}" if line is not None else f"{path}"
    assert str(raised.value) == f"{location}: {problem}"
    assert "\n" not in str(raised.value) and isinstance(raised.value, ValueError)


def test_non_utf8_bytes_name_line_and_column(tmp_path):
    path = tmp_path / "latin1.jsonl"
    second = '{"prompt": "caf\u00e9", "chosen": "c", "rejected": "r"}'.encode("latin-1")  # \xe9 alone is not UTF-8
    path.write_bytes(GOOD.encode() + b"\n" + second + b"\n")
    with pytest.raises(DataError) as raised:
        read_preferences(path)
    column = second.index(b"\xe9") + 1
    assert str(raised.value) == f"{path}:2: not valid UTF-8 (byte 0xe9 at column {column})"


def test_missing_file(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError) as raised:
        read_preferences(path)
    assert str(raised.value) == f"{path}: no such file"
