"""Data in several pieces: a split stored as shards, a repository's subsets, several paths or a glob, records and a
datasets.Dataset in memory (data/sources.py), read by data/preferences.py and train.py as one.

Oracle: the invariant that data in pieces reads as one file holding the same records in the same order: the same
PreferenceRecords, skip counts and DataSummary.sha256 (the reference cache's dataset key); the file a bad record
is in is the one its message names.
"""
import gzip
import json

import pytest

import train
from data.preferences import DataError, read_preferences

ROWS = [{"prompt": f"which pet is best? {i}", "chosen": "dogs are loyal", "rejected": "fish are quiet"}
        for i in range(9)]
ROWS[4] = {"prompt": "which pet?", "chosen": "same", "rejected": "same"}  # skipped: identical responses


def write_jsonl(path, rows, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def write_parquet(path, rows):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def as_one(tmp_path, rows):
    return read_preferences(write_jsonl(tmp_path / "one" / "all.jsonl", rows))


def same(read, expected):
    (records, summary), (want, want_summary) = read, expected
    assert [(r.prompt, r.chosen, r.rejected, r.chosen_prob) for r in records] == \
           [(r.prompt, r.chosen, r.rejected, r.chosen_prob) for r in want]
    assert (summary.sha256, summary.num_read, summary.num_kept, summary.num_skipped) == \
           (want_summary.sha256, want_summary.num_read, want_summary.num_kept, want_summary.num_skipped)
    return summary


def test_a_split_stored_as_three_shards_reads_as_one(tmp_path):
    repo = tmp_path / "repo"
    for k in range(3):
        write_parquet(repo / "data" / f"train-{k:05d}-of-00003.parquet", ROWS[3 * k:3 * k + 3])
    write_parquet(repo / "data" / "test-00000-of-00001.parquet", ROWS[:2])
    summary = same(read_preferences(repo, split="train"), as_one(tmp_path, ROWS))
    assert summary.path.endswith("train-00000-of-00003.parquet (+ 2 more)")
    assert summary.skipped == {"chosen and rejected responses are identical": ["train-00001-of-00003.parquet:1"]}
    with pytest.raises(DataError, match="has splits test, train: choose one with --data-split"):
        read_preferences(repo)


def test_a_bad_record_in_the_second_shard_names_that_shard(tmp_path):
    repo = tmp_path / "repo"
    write_jsonl(repo / "train-00000-of-00002.jsonl", ROWS[:3])
    second = write_jsonl(repo / "train-00001-of-00002.jsonl", [ROWS[0], {"prompt": "p", "chosen": "c"}])
    with pytest.raises(DataError) as raised:
        read_preferences(repo)
    assert str(raised.value) == f'{second}:2: missing field "rejected"'


def test_a_repository_root_with_subsets_all_or_chosen(tmp_path):
    """HH-RLHF's layout: helpful-base/, harmless-base/ with train and test files each, and red-team-attempts/ whose
    one file is a split of its own name (not read for --data-split train)."""
    repo = tmp_path / "hh"
    write_jsonl(repo / "harmless-base" / "train.jsonl.gz", ROWS[:4], gz=True)
    write_jsonl(repo / "harmless-base" / "test.jsonl.gz", ROWS[:1], gz=True)
    write_jsonl(repo / "helpful-base" / "train.jsonl.gz", ROWS[4:], gz=True)
    write_jsonl(repo / "helpful-base" / "test.jsonl.gz", ROWS[:1], gz=True)
    write_jsonl(repo / "red-team-attempts" / "red_team_attempts.jsonl.gz", [{"transcript": "x"}], gz=True)
    same(read_preferences(repo, split="train"), as_one(tmp_path, ROWS))  # subsets in name order
    same(read_preferences(repo, split="train", subsets=["helpful-base"]), as_one(tmp_path / "h", ROWS[4:]))
    same(read_preferences(repo, split="train", subsets=["helpful-base", "harmless-base"]),
         as_one(tmp_path / "hh2", ROWS[4:] + ROWS[:4]))  # in the order named
    with pytest.raises(DataError) as raised:
        read_preferences(repo, split="train", subsets=["helpful-online"])
    assert str(raised.value) == (f"{repo}: has no subset 'helpful-online' (its subsets: harmless-base, helpful-base, "
                                 f"red-team-attempts)")
    with pytest.raises(DataError, match="has splits test, train, red_team_attempts: choose one with --data-split"):
        read_preferences(repo)


def test_several_paths_a_glob_and_records_in_memory(tmp_path):
    first = write_jsonl(tmp_path / "parts" / "a.jsonl", ROWS[:5])
    second = write_parquet(tmp_path / "parts" / "b.parquet", ROWS[5:])
    one = as_one(tmp_path, ROWS)
    same(read_preferences([first, second]), one)
    same(read_preferences(str(tmp_path / "parts" / "*")), one)
    same(read_preferences([dict(r) for r in ROWS]), one)
    datasets = pytest.importorskip("datasets")
    same(read_preferences(datasets.Dataset.from_list(ROWS)), one)
    with pytest.raises(DataError, match=r"\*.jsonl: no file matches this pattern"):
        read_preferences(str(tmp_path / "none" / "*.jsonl"))
    with pytest.raises(DataError, match="<records>: no records"):
        read_preferences([])


def test_train_on_a_three_shard_split_uses_every_record(tiny_run, tmp_path, capsys):
    rows = [json.loads(line) for line in tiny_run["data"].read_text().splitlines()]  # 24 pairs
    repo = tmp_path / "repo"
    for k in range(3):
        write_jsonl(repo / "data" / f"train-{k:05d}-of-00003.jsonl", rows[8 * k:8 * k + 8])
    argv = ["--model", str(tiny_run["model"]), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "4",
            "--lora-rank", "2", "--max-length", "40", "--max-prompt-length", "24", "--threads", "1",
            "--no-progress", "--no-plot"]
    assert train.main(["--data", str(repo), *argv]) == 0
    printed = capsys.readouterr().out
    assert "(+ 2 more): read 24 pairs, kept 24, skipped 0" in printed and "24 examples, 1 step of" in printed
    parts = [str(p) for p in sorted((repo / "data").iterdir())]
    assert train.main(["--data", *parts[:2], *argv, "--overwrite"]) == 0  # several paths
    assert "16 examples" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == parts[:2]
