"""train.py's options say what they do: checkpoints by default on long runs, presets overridable flag by flag,
warnings, help text, lengths against the model's context, what config.json and train.log keep.

Oracles: invariants of the run directory (which checkpoints exist after N steps), the parser's own list of
options (every one has help), the model's config.json (max_position_embeddings), and the lines the run printed.
"""
import json
from pathlib import Path

import pytest

import train
from spl.config import PRESETS, parse_args


def args(tiny, out, *extra):
    return ["--model", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out), "--steps", "3",
            "--batch-size", "4", "--lr", "1e-2", "--warmup-steps", "1", "--lora-rank", "2", "--lora-alpha", "4",
            "--no-progress", "--no-plot", "--max-length", "40", "--max-prompt-length", "24", "--threads", "1", *extra]


def checkpoints(out):
    folder = Path(out) / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_checkpoints_by_default_every_500_steps_and_the_last_two_kept(tiny_run, tmp_path):
    """The default --save-every is 500 (a crash of the paper's 5000-step recipe loses at most 500 steps): a run
    shorter than that writes none; a period that fits keeps its last two checkpoints, the final step's among them."""
    assert parse_args(["--model", "m", "--data", "d"]).save_every == 500
    assert parse_args([]).save_every == 500 and parse_args([]).keep_checkpoints == 2
    out = tmp_path / "short"
    assert train.main(args(tiny_run, out)) == 0
    assert checkpoints(out) == []
    out = tmp_path / "periodic"
    assert train.main(args(tiny_run, out, "--steps", "7", "--save-every", "2")) == 0
    assert checkpoints(out) == ["step_000006", "step_000007"]


def test_a_preset_is_overridable_flag_by_flag_steps_against_epochs(tiny_run, tmp_path, capsys):
    """paper-math states one epoch, paper-chat 5000 steps: --steps (or --epochs) given wins over the other, and
    the recipe line names only the values taken from the preset (not the flags given, even when equal to them)."""
    math_ = parse_args(["--preset", "paper-math", "--steps", "2"])
    assert (math_.steps, math_.epochs) == (2, None) and "epochs" not in math_.from_preset
    chat = parse_args(["--preset", "paper-chat", "--epochs", "1"])
    assert (chat.steps, chat.epochs) == (None, 1) and "steps" not in chat.from_preset
    out = tmp_path / "run"
    assert train.main(args(tiny_run, out, "--preset", "paper-math", "--steps", "2", "--beta", "0.1")) == 0
    printed = capsys.readouterr().out
    assert "recipe: paper-math for the options not given: --lora-dropout 0.05\n" in printed  # --beta 0.1 was given
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((out / "config.json").read_text())["from_preset"] == ["lora_dropout"]


def test_a_warmup_longer_than_the_run_warns_in_one_line(tiny_run, tmp_path, capsys):
    """Linear warmup over 10 steps, run of 3: the last step's learning rate is lr * 3 / 10 (train.learning_rate)."""
    out = tmp_path / "run"
    assert train.main(args(tiny_run, out, "--warmup-steps", "10")) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert lines == ["warning: --warmup-steps 10 is longer than the run's 3 steps: the learning rate never reaches "
                     "--lr 0.01 (it ends at 0.003)"]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["lr"] == pytest.approx(1e-2 * 3 / 10, rel=1e-12)


def test_every_option_has_help_and_help_shows_what_model_takes():
    from spl.config import TrainConfig, argument_parser
    parser = argument_parser(TrainConfig())
    missing = [a.option_strings for a in parser._actions if a.option_strings and not (a.help or "").strip()]
    assert missing == []
    text = parser.format_help()
    assert "default 0.005; with --model 1e-05 (paper-chat)" in text
    assert "default 250; the world's main job 200; with --model 5000" in " ".join(text.split())
    assert PRESETS["paper-chat"]["lr"] == 1e-5 and PRESETS["paper-chat"]["steps"] == 5000


def test_lengths_past_the_models_context_are_refused_in_both_scripts(tiny_run, tmp_path, capsys):
    """The tiny model's config.json says max_position_embeddings 512: --max-length 600 is refused before anything
    is written, and sample.py refuses a prompt whose tokens plus --max-new-tokens pass 512, with the same rule."""
    import sample
    positions = json.loads((tiny_run["model"] / "config.json").read_text())["max_position_embeddings"]
    assert positions == 512
    out = tmp_path / "run"
    assert train.main(args(tiny_run, out, "--max-length", "600")) == 2
    error = capsys.readouterr().err.strip()
    assert error == (f"train.py: error: --max-length 600: longer than the max_position_embeddings 512 of the model "
                     f"in {tiny_run['model']}; give at most 512 tokens")
    assert not out.exists()
    assert sample.main(["--model", str(tiny_run["model"]), "--prompt", "which pet", "--max-new-tokens", "510",
                        "--threads", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("sample.py: error: --prompt: ") and "+ --max-new-tokens 510 = " in error
    assert error.endswith(f": longer than the max_position_embeddings 512 of the model in {tiny_run['model']}; "
                          f"give at most 512 tokens")


def test_config_records_the_detected_chat_format_and_train_log_keeps_the_console(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(args(tiny_run, out, "--save-every", "3")) == 0
    printed = capsys.readouterr().out
    detected = printed.split("chat format: ", 1)[1].split(" ", 1)[0]
    config = json.loads((out / "config.json").read_text())
    assert config["chat_format"] is None and config["detected_chat_format"] == detected
    assert (out / "train.log").read_text() == printed  # stdout (stderr is empty: no progress bar, no error)
    assert train.main(args(tiny_run, out, "--save-every", "3", "--steps", "4", "--resume")) == 0
    resumed = capsys.readouterr().out
    assert (out / "train.log").read_text() == printed + resumed and "resumed" in resumed.lower()
