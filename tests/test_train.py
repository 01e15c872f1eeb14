"""train.py end to end on a tiny random model: a few steps, resume, signals, bad input, presets.

Oracles: invariants. A run resumed from its checkpoint ends bit-identical to the uninterrupted run (same
command); a SIGKILL at an arbitrary moment loses at most the work since the last complete checkpoint and the
resumed run still ends bit-identical; SIGTERM leaves a complete, loadable checkpoint; bad inputs exit
non-zero with one line naming the problem and leave existing files untouched; presets equal the values
stated in the paper's Appendix B.3 and C.4.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
import spl.config as train_config
from models.lora import TARGET_NAMES

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(tiny_run):
    return tiny_run


def args(tiny, out, *extra):
    return ["--model", str(tiny["model"]), "--data", str(tiny["data"]), "--out", str(out), "--steps", "6",
            "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-2", "--warmup-steps", "2", "--lora-rank", "4", "--lora-alpha", "8",
            "--lora-dropout", "0.1", "--no-progress", "--no-plot", "--max-length", "40", "--max-prompt-length", "24",
            *extra]


def adapter(out):
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_few_steps_write_every_output(tiny, tmp_path):
    out = tmp_path / "run"
    assert train.main(args(tiny, out, "--alpha", "0.2", "--beta", "0.1")) == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["alpha"] == 0.2 and config["beta"] == 0.1 and config["lora_rank"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "margin", "reward_chosen", "reward_rejected", "reward_accuracy", "logps_chosen",
                "logps_rejected", "lr", "grad_norm", "tokens_per_s"):
        assert all(key in r for r in records), key
    # The adapter moved away from B = 0, and the SPL margin z moved toward the optimum of the soft-label loss
    # with q = 0.75, z* = logit(0.75) = ln 3 (d loss / dz = sigmoid(z) - q), lowering the loss.
    assert any(t.abs().max() > 0 for name, t in adapter(out).items() if "lora_B" in name)
    assert abs(records[-1]["margin"] - math.log(3)) < abs(records[0]["margin"] - math.log(3))
    assert records[-1]["loss"] < records[0]["loss"]


def test_resume_is_bit_identical(tiny, tmp_path):
    """Uninterrupted 6 steps vs. the same command stopped after its step-3 checkpoint and resumed."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert train.main(args(tiny, full, "--save-every", "3")) == 0
    assert train.main(args(tiny, resumed, "--save-every", "3")) == 0
    # Roll the second run back to its step-3 checkpoint, as if it had died right after writing it.
    import shutil
    shutil.rmtree(resumed / "checkpoints" / "step_000006")
    shutil.rmtree(resumed / "adapter")
    assert train.main(args(tiny, resumed, "--save-every", "3", "--resume")) == 0
    assert_same_tensors(adapter(full), adapter(resumed))
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_changed_option_and_extends_steps(tiny, tmp_path, capsys):
    """--resume compares the command line with the run's config.json: a changed option of the computation
    (--beta, --lora-rank) is refused in one line naming it, before anything is read or written; --steps may grow
    (the run continues from its last checkpoint to the new total) but not fall below the checkpoint's step."""
    out = tmp_path / "run"
    assert train.main(args(tiny, out, "--steps", "2", "--save-every", "2")) == 0
    before = {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*")}
    for extra, said in ((("--beta", "0.3"), "--beta was 0.1 when the run started, 0.3 now;"),
                        (("--lora-rank", "8", "--beta", "0.3"), "--beta was 0.1 when the run started, 0.3 now (and "
                                                                "1 more: --lora-rank);")):
        capsys.readouterr()
        assert train.main(args(tiny, out, "--steps", "2", "--save-every", "2", "--resume", *extra)) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"train.py: error: {out / 'config.json'}: ") and said in err and "\n" not in err
        assert {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert train.main(args(tiny, out, "--steps", "1", "--save-every", "2", "--resume")) == 2
    assert "is step 2, past the 1 step asked for" in capsys.readouterr().err
    assert train.main(args(tiny, out, "--steps", "3", "--save-every", "2", "--resume", "--log-every", "1")) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3] and (out / "checkpoints" / "step_000003").is_dir()


def _start(tiny, out, *extra):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args(tiny, out, *extra)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, process, timeout=120):
    deadline = time.time() + timeout
    while not (path.exists() and (path.is_dir() or path.stat().st_size > 0)):
        assert process.poll() is None, process.stdout.read()
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_sigkill_then_resume_is_bit_identical(tiny, tmp_path, capsys):
    """Killed hard at an arbitrary moment after the first checkpoint: resume ends where the full run ends. SIGKILL
    leaves out/.lock naming the dead process; --resume takes it over and says whose it was."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    many = ("--steps", "40", "--save-every", "2")
    assert train.main(args(tiny, full, *many)) == 0
    process = _start(tiny, killed, *many)
    _wait_for(killed / "checkpoints" / "step_000002", process)
    time.sleep(0.3)  # somewhere in a later step, or in the middle of a save
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL  # killed before it finished its 40 steps
    assert json.loads((killed / ".lock").read_text())["pid"] == process.pid
    capsys.readouterr()
    assert train.main(args(tiny, killed, *many, "--resume")) == 0
    said = capsys.readouterr().out
    assert f"took over the lock of process {process.pid} on " in said and "which no longer runs" in said
    assert not (killed / ".lock").exists()
    assert_same_tensors(adapter(full), adapter(killed))
    assert not [p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]  # no staging left


def test_sigterm_saves_a_loadable_checkpoint(tiny, tmp_path):
    out = tmp_path / "run"
    process = _start(tiny, out, "--steps", "100000")
    _wait_for(out / "metrics.jsonl", process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert len(checkpoints) == 1
    state = json.loads((checkpoints[0] / "state.json").read_text())
    tensors = load_file(str(checkpoints[0] / "trainable.safetensors"))
    assert state["step"] >= 1 and any("lora_B" in name for name in tensors)


@pytest.mark.parametrize("extra, message", [
    (("--alpha", "0"), "--alpha must be > 0"),
    (("--alpha", "-1"), "--alpha must be > 0"),
    (("--beta", "-0.1"), "--beta must be >= 0"),
    (("--batch-size", "3", "--grad-accum", "2"), "must be a positive multiple of --grad-accum"),
    (("--max-prompt-length", "64"), "--max-prompt-length (64) < --max-length (40)"),
    # data.tokenization.check_lengths' lower bound (a prompt keeps at least BOS and one token): once a traceback
    (("--max-prompt-length", "1"), "need 2 <= --max-prompt-length (1) < --max-length (40)"),
    (("--max-prompt-length", "40"), "--max-prompt-length (40) < --max-length (40)"),
    (("--lora-targets", "q_proj,w9"), "--lora-targets: unknown LoRA target(s) ['w9']"),  # models.lora's one rule
])
def test_bad_options_exit_with_one_line(tiny, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert train.main(args(tiny, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error:") and message in err and "\n" not in err
    assert not out.exists()


def test_bad_paths_exit_with_one_line(tiny, tmp_path, capsys):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"prompt": "a", "chosen": "b"}\n', encoding="utf-8")
    cases = [
        (["--data", str(bad_data)], f'{bad_data}:1: missing field "rejected"'),
        (["--data", str(tmp_path / "none.jsonl")], "no such file"),
        (["--model", str(tmp_path / "no-model")], "no such model directory"),
    ]
    for override, message in cases:
        argv = args(tiny, tmp_path / "run") + override  # later flags win
        assert train.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, err
        assert not (tmp_path / "run").exists()


def test_existing_run_is_never_overwritten(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert train.main(args(tiny, out)) == 1
    assert "already exists" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_script_reports_bad_input_without_traceback(tiny, tmp_path, script):
    """As a process would run it (tests/conftest.py `script`; tests/test_bad_input.py starts real processes)."""
    code, _, stderr = script("train.py", args(tiny, tmp_path / "r", "--alpha", "-1"))
    assert code == 2
    assert "Traceback" not in stderr and stderr.count("\n") == 1


def test_presets_are_the_papers_recipes():
    """Appendix B.3 (chat): LoRA r = 16, lora_alpha = 16, dropout 0.05, lr 1e-5, 150 warmup steps, batch 8,
    5000 steps, max length 512, beta = 0.1. Appendix C.4 (math): r = 64, lora_alpha = 64, dropout 0.05,
    lr 1e-5, 150 warmup steps, batch 4, one epoch, max length 1024, beta = 0.1."""
    chat = train_config.parse_args(["--preset", "paper-chat", "--alpha", "0.2"])
    assert (chat.lora_rank, chat.lora_alpha, chat.lora_dropout, chat.lr, chat.warmup_steps, chat.batch_size,
            chat.steps, chat.max_length, chat.beta, chat.alpha) == (16, 16, 0.05, 1e-5, 150, 8, 5000, 512, 0.1, 0.2)
    math_ = train_config.parse_args(["--preset", "paper-math"])
    assert (math_.lora_rank, math_.lora_alpha, math_.lora_dropout, math_.lr, math_.warmup_steps, math_.batch_size,
            math_.epochs, math_.steps, math_.max_length, math_.beta) == (64, 64, 0.05, 1e-5, 150, 4, 1, None, 1024, 0.1)
    # Flags given on the command line win over the preset.
    assert train_config.parse_args(["--preset", "paper-chat", "--lr", "2e-5"]).lr == 2e-5


def test_own_model_without_preset_takes_the_chat_recipe():
    """--model with no --preset: every option not given comes from paper-chat (the world's defaults, lr 5e-3 for a
    2.3M-parameter model, are not a recipe for a real checkpoint); flags given win; an explicit --preset wins; the
    world keeps its own defaults."""
    own = train_config.parse_args(["--model", "some/dir"])
    chat = train_config.parse_args(["--preset", "paper-chat"])
    for key in train_config.PRESETS["paper-chat"]:
        assert getattr(own, key) == getattr(chat, key), key
    assert own.preset == "paper-chat" and own.lr == 1e-5
    given = train_config.parse_args(["--model", "some/dir", "--lr", "1e-4", "--epochs", "2"])
    assert (given.lr, given.epochs, given.steps, given.lora_rank) == (1e-4, 2, None, 16)
    assert train_config.parse_args(["--model", "some/dir", "--preset", "paper-math"]).lora_rank == 64
    world = train_config.parse_args([])
    assert world.preset is None and world.lr == train_config.TrainConfig().lr == 5e-3


def test_learning_rate_schedule():
    """Linear warmup to the peak, then cosine to 10% of it: lr(w-1) = peak, lr(total) = 0.1 peak."""
    peak, warmup, total = 1.0, 10, 110
    assert train.learning_rate(0, total, warmup, peak) == pytest.approx(0.1)
    assert train.learning_rate(warmup - 1, total, warmup, peak) == pytest.approx(1.0)
    assert train.learning_rate(warmup + 50, total, warmup, peak) == pytest.approx(0.1 + 0.9 * 0.5)
    assert train.learning_rate(total, total, warmup, peak) == pytest.approx(0.1)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "fdpo", "rpo", "dpop", "reward", "sft"])
def test_every_loss_runs(tiny, tmp_path, loss):
    """Two steps of each objective: finite metrics and its output written (an SFT file is made from the pairs)."""
    extra = ["--loss", loss, "--steps", "2"]
    if loss == "sft":
        sft = tmp_path / "sft.jsonl"
        sft.write_text("".join(json.dumps({"prompt": f"which pet is best? {i}", "response": "dogs are loyal"}) + "\n"
                               for i in range(8)), encoding="utf-8")
        extra += ["--data", str(sft)]
    if loss == "fdpo":
        extra += ["--fdpo-divergence", "js"]
    out = tmp_path / "run"
    assert train.main(args(tiny, out, *extra)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    if loss == "reward":
        assert (out / "adapter" / "reward_head.safetensors").is_file()


def grouped_data(path, prompts=6):
    """`prompts` prompts with three responses each and all three pairs (soft labels): 3 * prompts pairs."""
    rows = []
    for i in range(prompts):
        responses = ["dogs are loyal", "cats are calm" + " and calm" * (i % 3), "fish are quiet"]
        for a, b, q in ((0, 1, 0.6), (0, 2, 0.8), (1, 2, 0.7)):
            rows.append({"prompt": f"which pet is best? {i}", "chosen": responses[a], "rejected": responses[b],
                         "chosen_prob": q})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_main_job_keeps_the_option_mass_and_other_runs_keep_the_papers_loss():
    """No --model/--data: the main job's measured defaults (WORLD_MAIN_JOB: the anchor on prompt-grouped
    batches); --model (the paper's recipe), --data and the other losses: the plain loss on pair batches, unless
    asked; a flag given always wins."""
    world = train_config.parse_args([])
    assert (world.anchor, world.prompts_per_batch) == (train_config.WORLD_MAIN_JOB["anchor"],
                                                       train_config.WORLD_MAIN_JOB["prompts_per_batch"])
    assert world.anchor > 0 and world.prompts_per_batch > 0
    assert world.lora_targets == [*TARGET_NAMES, "lm_head"]  # the output head too (README, The main job)
    for argv in (["--model", "some/dir"], ["--data", "x.jsonl"], ["--loss", "ipo"]):
        other = train_config.parse_args(argv)
        assert (other.anchor, other.prompts_per_batch) == (0.0, 0), argv
        assert "lm_head" not in other.lora_targets, argv
    assert train_config.parse_args(["--anchor", "0"]).anchor == 0.0
    asked = train_config.parse_args(["--model", "some/dir", "--anchor", "0.5", "--prompts-per-batch", "4"])
    assert (asked.anchor, asked.prompts_per_batch) == (0.5, 4)


def test_online_spl_on_the_world_gets_its_measured_recipe_and_a_flag_given_wins(tmp_path):
    """--loss spl-online with no --model/--data: WORLD_ONLINE_JOB (every question each step, K = 4, the output
    head trainable, the natural estimator); with --model it keeps the paper's recipe and TrainConfig's K; any flag
    given wins, including the estimator."""
    online = train_config.parse_args(["--loss", "spl-online"])
    for name, value in train_config.WORLD_ONLINE_JOB.items():
        assert getattr(online, name) == value, name
    assert online.lora_targets == [*TARGET_NAMES, "lm_head"] and online.online_estimator == "natural"
    assert (online.anchor, online.prompts_per_batch) == (0.0, 0)  # the main job's offline remedies are not online's
    (tmp_path / "rm" / "adapter").mkdir(parents=True)
    (tmp_path / "rm" / "adapter" / "reward_head.safetensors").touch()  # parse_args checks only that it is there
    own = train_config.parse_args(["--loss", "spl-online", "--model", "some/dir", "--reward-model", str(tmp_path / "rm")])
    assert own.online_samples == train_config.TrainConfig.online_samples and "lm_head" not in own.lora_targets
    assert own.lr == train_config.PRESETS[train_config.OWN_MODEL_PRESET]["lr"]
    assert own.lora_dropout == 0.0  # the preset's 0.05 would make the samples come from another policy
    asked = train_config.parse_args(["--loss", "spl-online", "--online-samples", "6", "--lr", "1e-3", "--steps", "7",
                              "--lora-targets", "q_proj", "--online-estimator", "rloo"])
    assert (asked.online_samples, asked.lr, asked.steps, asked.lora_targets, asked.online_estimator) == \
        (6, 1e-3, 7, ["q_proj"], "rloo")


@pytest.mark.parametrize("extra, message", [
    (("--anchor", "1"), "--anchor needs each prompt's responses in one batch"),
    (("--anchor", "-1", "--prompts-per-batch", "2"), "must be >= 0"),
    (("--prompts-per-batch", "3"), "positive multiple of --grad-accum (2)"),
    (("--prompts-per-batch", "2", "--loss", "sft"), "--prompts-per-batch groups preference pairs"),
    (("--lora-targets", "q_proj,lm_head", "--lora-dropout", "0.1"), "--lora-targets lm_head needs --lora-dropout 0"),
])
def test_bad_anchor_options_exit_with_one_line(tiny, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert train.main(args(tiny, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error:") and message in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("loss", ["spl", "rpo", "dpop"])
def test_grouped_anchored_run_resumes_bit_identical(tiny, tmp_path, loss):
    """Prompt-grouped batches with the anchor (and RPO / DPOP on them): a run stopped at its step-3 checkpoint
    and resumed ends bit-identical to the uninterrupted run, so the grouped data position is saved exactly; the
    anchor is logged and every metric is finite."""
    data = grouped_data(tmp_path / "grouped.jsonl")
    extra = ["--data", str(data), "--prompts-per-batch", "2", "--anchor", "0.5", "--loss", loss]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert train.main(args(tiny, full, *extra, "--save-every", "3")) == 0
    assert train.main(args(tiny, resumed, *extra, "--save-every", "3")) == 0
    import shutil
    shutil.rmtree(resumed / "checkpoints" / "step_000006")  # as if it had died right after step 3's checkpoint
    shutil.rmtree(resumed / "adapter")
    assert train.main(args(tiny, resumed, *extra, "--save-every", "3", "--resume")) == 0
    assert_same_tensors(adapter(full), adapter(resumed))
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(math.isfinite(r["loss"]) and r["anchor"] >= 0 for r in records)


def test_truncated_latest_checkpoint_resumes_from_the_one_before(tiny, tmp_path, capsys):
    """The newest checkpoint's trainable.safetensors cut short (a copy interrupted): --resume names it in one line,
    resumes from the step-3 checkpoint and ends bit-identical to the uninterrupted run."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert train.main(args(tiny, full, "--save-every", "3")) == 0
    assert train.main(args(tiny, resumed, "--save-every", "3")) == 0
    damaged = resumed / "checkpoints" / "step_000006" / "trainable.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:64])
    import shutil
    shutil.rmtree(resumed / "adapter")
    capsys.readouterr()
    assert train.main(args(tiny, resumed, "--save-every", "3", "--resume")) == 0
    out = capsys.readouterr().out
    assert f"damaged checkpoint: {damaged}: 64 bytes, manifest.json says" in out
    assert f"resumed from {resumed / 'checkpoints' / 'step_000003'} at step 3" in out
    assert_same_tensors(adapter(full), adapter(resumed))


def test_no_usable_checkpoint_stops_in_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(args(tiny, out, "--save-every", "6")) == 0
    damaged = out / "checkpoints" / "step_000006" / "rng.json"
    damaged.write_text("{}")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    capsys.readouterr()
    assert train.main(args(tiny, out, "--save-every", "6", "--resume")) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("train.py: error: ") and "no usable checkpoint" in err and str(damaged) in err
    assert "\n" not in err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before  # nothing touched


def test_failing_save_keeps_the_previous_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    """The disk fills while the step-6 checkpoint is written: one line naming it and the intact step-3 one, exit
    1, and --resume then continues from step 3 to the uninterrupted run's adapter."""
    import errno

    from spl import runs

    full, out = tmp_path / "full", tmp_path / "run"
    assert train.main(args(tiny, full, "--save-every", "3")) == 0
    real_save_file, calls = runs.save_file, []

    def fills_up(tensors, filename, *rest, **kwargs):
        calls.append(filename)
        if "step_000006" in filename:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save_file(tensors, filename, *rest, **kwargs)

    monkeypatch.setattr(runs, "save_file", fills_up)
    capsys.readouterr()
    assert train.main(args(tiny, out, "--save-every", "3")) == 1
    err = capsys.readouterr().err.strip()
    step3 = out / "checkpoints" / "step_000003"
    assert err == (f"train.py: error: {out / 'checkpoints' / 'step_000006'}: checkpoint not saved (No space left "
                   f"on device); the previous checkpoint {step3} is intact")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000003"] and not (out / ".lock").exists()
    monkeypatch.setattr(runs, "save_file", real_save_file)
    assert train.main(args(tiny, out, "--save-every", "3", "--resume")) == 0
    assert_same_tensors(adapter(full), adapter(out))


def test_second_process_on_a_busy_directory_is_refused(tiny, tmp_path, capsys):
    """While one train.py runs in --out, another (plain, --overwrite, --resume) is refused in one line naming the
    first's pid, touches nothing, and the first completes with all its outputs."""
    out = tmp_path / "run"
    process = _start(tiny, out, "--steps", "30", "--save-every", "5")
    try:
        _wait_for(out / "metrics.jsonl", process)
        for extra in ((), ("--overwrite",), ("--resume",)):
            capsys.readouterr()
            assert train.main(args(tiny, out, "--steps", "30", "--save-every", "5", *extra)) == 1
            err = capsys.readouterr().err.strip()
            assert err.startswith(f"train.py: error: {out}: in use by process {process.pid} on "), err
            assert "\n" not in err
    finally:
        output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and not (out / ".lock").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 31))
