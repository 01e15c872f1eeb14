"""Preference data as downloaded: .jsonl.gz / .json.gz, Parquet, `datasets.save_to_disk` directories, split dirs.

Oracles: invariants across forms. The same records written by the standard library (json, gzip), by pyarrow
(`pa.Table.from_pylist` + `pq.write_table`) and by HF datasets (`Dataset.from_list(...).save_to_disk`), each the
writer's own code, must read back as the same PreferenceRecords, the same skips, the same tokenised examples
and the same reference-cache key; errors name the file and the line (the 0-based row for tables); a missing
optional package is one line naming what to install. The records are hand-written below.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

from data.preferences import DataError, read_preferences
from data.reference_cache import ReferenceCacheKey
from data.tokenization import load_preference_data
from models.tokenizer import Tokenizer


def writers():
    """pyarrow, pyarrow.parquet and HF datasets: the forms' writers (test oracles, requirements-dev.txt), imported
    by the tests that write, not at collection (datasets alone takes ~0.8 s to import, on every xdist worker)."""
    import datasets
    import pyarrow
    import pyarrow.parquet
    return pyarrow, pyarrow.parquet, datasets


V1 = Path(pytest.importorskip("mistral_common").__file__).parent / "data" / "tokenizer.model.v1"


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


# TRL's standard layout; chosen_prob on some rows only (a null column value elsewhere); rows 2 and 4 are unusable.
STANDARD = [
    {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon.", "chosen_prob": 0.75},
    {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
    {"prompt": "Same?", "chosen": "yes", "rejected": "yes"},
    {"prompt": "Ünïcode  spaces\r\n", "chosen": "日本語 🎉", "rejected": "  no  ", "chosen_prob": 1.0},
    {"prompt": "Empty?", "chosen": "", "rejected": "something"},
]
# UltraFeedback-binarized: chosen / rejected are whole conversations, with the scores beside them.
ULTRAFEEDBACK = [
    {"prompt": "Write a haiku.", "chosen": [user("Write a haiku."), assistant("Old pond, a frog jumps.")],
     "rejected": [user("Write a haiku."), assistant("No.")], "score_chosen": 8.0, "score_rejected": 2.5},
    {"prompt": "Hi", "chosen": [user("Hi"), assistant("Hello!")], "rejected": [user("Hi"), assistant("Go away.")],
     "score_chosen": 9.0, "score_rejected": 1.0},
]


def write_forms(directory: Path, rows: list[dict]) -> dict[str, Path]:
    """The same rows as every form the readers take, each written by its own library."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    forms = {"jsonl": directory / "pairs.jsonl", "jsonl.gz": directory / "pairs.jsonl.gz",
             "json.gz": directory / "pairs.json.gz", "parquet": directory / "pairs.parquet",
             "save_to_disk": directory / "saved", "dataset_dict": directory / "saved_dict",
             "split_dir": directory / "repo"}
    forms["jsonl"].write_text(lines, encoding="utf-8")
    forms["jsonl.gz"].write_bytes(gzip.compress(lines.encode()))
    forms["json.gz"].write_bytes(gzip.compress(json.dumps(rows, indent=2, ensure_ascii=False).encode()))
    pa, pq, datasets = writers()
    pq.write_table(pa.Table.from_pylist(rows), forms["parquet"])
    datasets.Dataset.from_list(rows).save_to_disk(str(forms["save_to_disk"]))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(forms["dataset_dict"]))
    (forms["split_dir"] / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), forms["split_dir"] / "data" / "train-00000-of-00001.parquet")
    return forms


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(V1)


def key_of(examples, summary, tokenizer) -> ReferenceCacheKey:
    return ReferenceCacheKey.build(examples, dataset_sha256=summary.sha256, reference_model="m", max_length=64,
                                   max_prompt_length=32, chat_format=tokenizer.chat_format, tokenizer_sha256="t")


@pytest.mark.parametrize("rows", [STANDARD, ULTRAFEEDBACK], ids=["standard", "ultrafeedback"])
def test_every_form_gives_the_same_records_examples_skips_and_cache_key(tmp_path, tokenizer, rows):
    forms = write_forms(tmp_path, rows)
    results = {}
    for name, path in forms.items():
        records, summary = read_preferences(path)
        examples, _ = load_preference_data(path, tokenizer, 64, 32)
        results[name] = (records, summary, examples)
    records, summary, examples = results["jsonl"]
    for name, (other_records, other_summary, other_examples) in results.items():
        assert [(r.prompt, r.chosen, r.rejected, r.chosen_prob) for r in other_records] == \
               [(r.prompt, r.chosen, r.rejected, r.chosen_prob) for r in records], name
        assert other_examples == examples, name
        assert (other_summary.num_read, other_summary.num_kept) == (summary.num_read, summary.num_kept), name
        assert other_summary.sha256 == summary.sha256, name
        assert key_of(other_examples, other_summary, tokenizer) == key_of(examples, summary, tokenizer), name
    if rows is STANDARD:  # the same skips; lines count from 1 in files, rows from 0 in tables
        assert summary.skipped == {"chosen and rejected responses are identical": [3], "empty chosen response": [5]}
        assert results["json.gz"][1].skipped == {"chosen and rejected responses are identical": [13],
                                                 "empty chosen response": [24]}  # where each element's "{" is
        assert results["parquet"][1].skipped == {"chosen and rejected responses are identical": [2],
                                                 "empty chosen response": [4]}
        assert "(row 2)" in results["parquet"][1].format() and "(line 3)" in summary.format()
        assert [r.chosen_prob for r in records] == [0.75, 1.0, 1.0]  # null chosen_prob: the default
    assert results["dataset_dict"][1].path == f"{forms['dataset_dict']}[train]"


def test_splits_choose_records_and_change_the_cache_key(tmp_path, tokenizer):
    train, test = STANDARD[:2], STANDARD[3:4]
    saved = tmp_path / "dict"
    _, _, datasets = writers()
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(saved))
    repo = tmp_path / "repo"
    repo.mkdir()
    for name, rows in (("train", train), ("test", test)):
        (repo / f"{name}.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    for path in (saved, repo):
        keys = {}
        for split, rows in (("train", train), ("test", test)):
            records, summary = read_preferences(path, split=split)
            assert [r.chosen for r in records] == [r["chosen"] for r in rows]
            examples, summary = load_preference_data(path, tokenizer, 64, 32, split=split)
            keys[split] = key_of(examples, summary, tokenizer)
        assert keys["train"].dataset_sha256 != keys["test"].dataset_sha256 and keys["train"] != keys["test"]
        with pytest.raises(DataError) as raised:
            read_preferences(path)
        assert str(raised.value) in (f"{path}: has splits train, test: choose one with --data-split",
                                     f"{path}: has splits test, train: choose one with --data-split")
        with pytest.raises(DataError, match=r"has no split 'validation' \(its splits: "):
            read_preferences(path, split="validation")
    with pytest.raises(DataError, match=r"--data-split 'train' names a split, but this is one file"):
        read_preferences(repo / "train.jsonl.gz", split="train")


@pytest.mark.parametrize("form, location", [("parquet", "pairs.parquet:row 1"), ("save_to_disk", "saved:row 1"),
                                            ("dataset_dict", "saved_dict[train]:row 1"), ("jsonl.gz", "pairs.jsonl.gz:2"),
                                            ("json.gz", "pairs.json.gz:7")])
def test_errors_name_the_file_and_the_line_or_row(tmp_path, form, location):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c", "rejected": None}]
    path = write_forms(tmp_path, rows)[form]
    with pytest.raises(DataError) as raised:
        read_preferences(path)
    problem = "field \"rejected\" must be a string or a list of messages, got null" if "json" in form \
        else 'missing field "rejected"'  # a table's null is an absent field
    assert str(raised.value) == f"{tmp_path}/{location}: {problem}"


def test_a_conversation_the_formats_refuse_is_a_data_error_at_its_line(tmp_path, tokenizer):
    rows = [{"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]},
            {"prompt": [user("a"), assistant(""), user("b")], "chosen": [assistant("b")], "rejected": [assistant("c")]}]
    path = write_forms(tmp_path, rows)["parquet"]
    with pytest.raises(DataError) as raised:
        read_preferences(path)
    assert str(raised.value) == (f"{path}:row 1: field \"prompt\": message 1: empty assistant turn "
                                 f"(mistral-common refuses it too)")


def test_ids_outside_the_embedding_are_a_data_error_naming_the_line(tmp_path, tokenizer):
    """vocab_size = 1 + the largest id of line 1's pair: line 1 fits, line 2 ("Ω", id 30146 in v1) does not."""
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                    + json.dumps({"prompt": "a", "chosen": "b", "rejected": "\u03a9"}) + "\n", encoding="utf-8")
    first = tokenizer.encode_prompt([user("a")]) + tokenizer.encode_response("b") + tokenizer.encode_response("c")
    vocab_size = max(first) + 1
    rare = max(tokenizer.encode_response("\u03a9"))
    assert rare >= vocab_size
    with pytest.raises(DataError) as raised:
        load_preference_data(path, tokenizer, 64, 32, vocab_size=vocab_size)
    assert str(raised.value) == (f"{path}:2: rejected token id {rare} is outside the model's embedding "
                                 f"(vocab_size {vocab_size})")


def test_damaged_files(tmp_path):
    bad_gzip = tmp_path / "x.jsonl.gz"
    bad_gzip.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"x.jsonl.gz: not a valid gzip file \("):
        read_preferences(bad_gzip)
    bad_json = tmp_path / "y.jsonl.gz"
    bad_json.write_bytes(gzip.compress(b'{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": \n'))
    with pytest.raises(DataError, match=r"y.jsonl.gz:2: malformed JSON"):
        read_preferences(bad_json)
    bad_parquet = tmp_path / "z.parquet"
    bad_parquet.write_bytes(b"PAR1 but not really")
    with pytest.raises(DataError, match=r"z.parquet: not a readable Parquet file \("):
        read_preferences(bad_parquet)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(DataError, match=r"empty: is a directory with no data files"):
        read_preferences(empty_dir)


@pytest.mark.parametrize("form, modules, package", [
    ("parquet", ("pyarrow", "pyarrow.parquet"), "pyarrow"),
    ("save_to_disk", ("datasets",), "datasets"),
])
def test_without_the_optional_package_one_line_says_what_to_install(tmp_path, monkeypatch, form, modules, package):
    """A module set to None in sys.modules is one Python cannot import: the package's absence, simulated."""
    path = write_forms(tmp_path, STANDARD[:1])[form]
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(DataError) as raised:
        read_preferences(path)
    purpose = "reading Parquet" if package == "pyarrow" else "reading a datasets.save_to_disk directory"
    assert str(raised.value) == f"{path}: {purpose} needs the optional package {package}: pip install {package}"
