"""eval/experiments/common.py: the helpers the experiment scripts share.

Oracles: Python's csv and json modules reading back what was written; argparse's documented usage-error exit (2)."""
import argparse
import csv
import json

import pytest

from eval.experiments import common as experiment


def test_parse_list_defaults_values_and_usage_errors(capsys):
    parser = argparse.ArgumentParser()
    assert experiment.parse_list(parser, "--ratios", None, [1.0, 2.0]) == (1.0, 2.0)
    assert experiment.parse_list(parser, "--ratios", "1,1.5,11", ()) == (1.0, 1.5, 11.0)
    assert experiment.parse_list(parser, "--levels", "3,1", (), int) == (3, 1)
    for text, kind, what in (("1,x", float, "numbers"), ("1.5", int, "integers")):
        with pytest.raises(SystemExit) as error:
            experiment.parse_list(parser, "--opt", text, (), kind)
        assert error.value.code == 2
        assert f"--opt: expected comma-separated {what}, got {text!r}" in capsys.readouterr().err


def test_check_arguments_reports_the_first_failure(capsys):
    parser = argparse.ArgumentParser()
    experiment.check_arguments(parser, [(True, "never shown")])
    with pytest.raises(SystemExit) as error:
        experiment.check_arguments(parser, [(True, "a"), (False, "second is wrong"), (False, "third")])
    assert error.value.code == 2
    err = capsys.readouterr().err
    assert "second is wrong" in err and "third" not in err


def test_run_names_and_alphas():
    assert experiment.alpha_for(1.1, 0.1) == 0.11 and 1.1 * 0.1 != 0.11  # the rounding is what makes it 0.11
    assert experiment.alpha_for(10, 0.1) == 1.0
    assert experiment.run_name(experiment.alpha_for(1.1, 0.1), 0.1) == "alpha0.11_beta0.1"
    assert experiment.run_name(1.0, 0.1) == "alpha1_beta0.1"


def test_result_files_round_trip(tmp_path):
    rows = [{"policy": "DPO", "alpha": 0.1, "text": "a, \"quoted\"\nline"}, {"policy": "SPL", "alpha": 0.2, "text": ""}]
    experiment.write_csv(tmp_path / "t.csv", rows)
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as f:
        assert list(csv.reader(f)) == [["policy", "alpha", "text"], ["DPO", "0.1", "a, \"quoted\"\nline"],
                                       ["SPL", "0.2", ""]]
    header, read = experiment.read_csv(tmp_path / "t.csv")
    assert header == ["policy", "alpha", "text"] and read[0]["text"] == rows[0]["text"] and read[1]["alpha"] == "0.2"
    records = [{"text": "é ∝"}, {"n": [1, 2]}]
    experiment.write_jsonl(tmp_path / "s.jsonl", records)
    lines = (tmp_path / "s.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == records and "é ∝" in lines[0]
    experiment.write_json(tmp_path / "e.json", {"a": 1})
    assert json.loads((tmp_path / "e.json").read_text(encoding="utf-8")) == {"a": 1}


def test_pyplot_is_optional(monkeypatch):
    """Without matplotlib pyplot() is None (the scripts then skip the PNG); with it, the Agg backend, which needs
    no display."""
    import importlib.util
    import sys

    if importlib.util.find_spec("matplotlib") is not None:
        plt = experiment.pyplot()
        assert plt is not None and plt.get_backend().lower() == "agg"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert experiment.pyplot() is None


def test_first_records(tmp_path):
    """None gives the source file itself; n gives a new file of exactly its first n lines, named after it."""
    source = tmp_path / "pairs_soft.jsonl"
    source.write_text("".join(f'{{"i": {i}}}\n' for i in range(5)), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    assert experiment.first_records(out, source, None) == source
    path = experiment.first_records(out, source, 3)
    assert path == out / "pairs_soft_first3.jsonl"
    assert path.read_text(encoding="utf-8").splitlines() == ['{"i": 0}', '{"i": 1}', '{"i": 2}']


def test_main_job_options_give_the_main_jobs_recipe_with_data_and_model():
    """Invariant: a run given --data (and --model) plus `main_job_options` trains with the options the embedded
    world's main job takes by itself (spl/config.py WORLD_MAIN_JOB over TrainConfig's defaults); only what the
    caller chooses (model, data, steps) and the preset's bookkeeping differ. Without the pinned options, --model
    would take the paper-chat preset's dropout 0.05 and lr 1e-5."""
    import dataclasses

    from eval.experiments.policies import main_job_options
    from spl.config import parse_args
    world = dataclasses.asdict(parse_args(["--steps", "7"]))
    caller = {"model", "data", "steps", "batch_size", "preset", "from_preset"}
    for argv in (["--data", "p.jsonl", *main_job_options()],
                 ["--data", "p.jsonl", "--model", "m", *main_job_options(model=True)]):
        run = dataclasses.asdict(parse_args([*argv, "--steps", "7"]))
        assert {k: v for k, v in run.items() if k not in caller} == {k: v for k, v in world.items() if k not in caller}
    bare = parse_args(["--data", "p.jsonl", "--model", "m"])
    assert (bare.lora_dropout, bare.lr) == (0.05, 1e-5)  # what the pinning prevents


def test_a_finished_run_as_train_py_writes_it_is_reused(tmp_path):
    """Invariant: config.json as train.py writes it (the parsed options plus what it records beside them: the chat
    format it detected, the inputs' fingerprints) matches the same argv, so train_policy reuses the run; any
    option that changes what is trained does not."""
    import dataclasses

    from eval.experiments.policies import finished_run_matches
    from spl.config import parse_args
    argv = ["--data", "p.jsonl", "--alpha", "0.2", "--steps", "7", "--out", str(tmp_path)]
    saved = dataclasses.asdict(parse_args(argv)) | {"detected_chat_format": "mistral-v1",
                                                   "inputs": {"data": "sha256:0"}}
    (tmp_path / "config.json").write_text(json.dumps(saved), encoding="utf-8")
    (tmp_path / "adapter").mkdir()
    assert not finished_run_matches(tmp_path, argv)  # no adapter written: not finished
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    assert finished_run_matches(tmp_path, argv)
    assert not finished_run_matches(tmp_path, [*argv[:3], "0.3", *argv[4:]])
