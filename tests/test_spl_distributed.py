"""train.py under torchrun (CPU, gloo): data parallel, resume, FSDP2, and the batch split behind them.

Oracles: invariants. Two processes that each take half of every global micro-batch, weight their losses by the
global pair count and sum their LoRA gradients compute the one-process gradient of the same global batch, so the
adapters agree up to float32 summation order (within 1e-5 after 4 AdamW steps; measured ~2e-6). A run resumed
under torchrun from its step-2 checkpoint computes the same steps again and must land on the same adapter bit for
bit, with activation checkpointing and with FSDP2 sharding the frozen weights and per-process dropout noise. The batch split is checked
against its definition: every rank's share is a disjoint, contiguous piece of the global batch and the pieces
cover it.

The data set has 21 pairs with responses of different lengths: with 4 pairs per global micro-batch, the epoch
ends in a batch of 1 pair, so one rank gets an empty share (it runs on a stand-in pair weighted 0), and each
share is padded to its own longest row, not the global batch's.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from spl import distributed
import spl.config as train_config
from tests.test_spl_online import online_args

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5


def args(data, model, out, *extra):
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "8",
            "--grad-accum", "2", "--lr", "1e-2", "--warmup-steps", "2", "--lora-rank", "4", "--lora-dropout", "0",
            "--no-progress", "--no-plot", "--max-length", "40", "--max-prompt-length", "24", "--save-every", "2",
            *extra]


def torchrun(argv, processes=2, script=ROOT / "train.py"):
    """`torchrun --standalone --nproc_per_node N train.py argv` (a free port, one thread per process)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(script), *argv]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def torchrun_jobs(jobs, root, processes=2, prepare=None):
    """Several train.py jobs in one torchrun launch (tests/torchrun_jobs.py: each process calls train.main for each
    job in turn); `jobs` maps a name to train.py's argv, `prepare` a job's name to ["module:function", args...]
    that rank 0 calls before that job. Returns each job's output, every process's together."""
    prepare = prepare or {}
    listing = [{"argv": [str(a) for a in argv], "stdout": str(root / f"{name}.stdout"),
                "prepare": [str(a) for a in prepare.get(name, [])]} for name, argv in jobs.items()]
    (root / "jobs.json").write_text(json.dumps(listing), encoding="utf-8")
    torchrun([str(root / "jobs.json")], processes, script=ROOT / "tests" / "torchrun_jobs.py")
    return {name: "".join(Path(f"{job['stdout']}.{rank}").read_text(encoding="utf-8") for rank in range(processes))
            for name, job in zip(jobs, listing)}


def adapter(out):
    return load_file(str(Path(out) / "adapter" / "adapter_model.safetensors"))


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_tensors(a, b):
    assert a.keys() == b.keys() and any(t.abs().max() > 1e-3 for name, t in a.items() if "lora_B" in name)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_close_adapters(a, b):
    assert a.keys() == b.keys()
    assert any(t.abs().max() > 1e-3 for name, t in a.items() if "lora_B" in name)  # it trained
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=TOLERANCE, msg=name)


def grouped_data(root):
    """7 prompts x 3 pairs of different lengths, for prompt-grouped batches."""
    rows = []
    for i in range(7):
        responses = ["dogs are loyal", "cats are calm" + " and calm" * (i % 3), "fish are quiet"]
        rows += [{"prompt": f"which pet is best? {i}", "chosen": responses[a], "rejected": responses[b],
                  "chosen_prob": q} for a, b, q in ((0, 1, 0.6), (0, 2, 0.8), (1, 2, 0.7))]
    data = root / "grouped.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return data


GROUPED = ("--prompts-per-batch", "4", "--anchor", "0.5")
FSDP = ("--fsdp", "--lora-dropout", "0.1")
DAMAGED = Path("checkpoints") / "step_000004" / "optimizer.safetensors"  # of the resumed copy: cut short


def damage_and_roll_back(root):
    """Before the resumed jobs (rank 0, in the launch): the two-process run copied with its step-4 checkpoint's
    optimizer file cut short (a full disk) and its adapter gone; the FSDP2 run rolled back to step 2."""
    root = Path(root)
    copy = root / "resumed"
    shutil.copytree(root / "two", copy)
    damaged = copy / DAMAGED
    damaged.write_bytes(damaged.read_bytes()[:100])
    shutil.rmtree(copy / "adapter")
    roll_back(root / "fsdp", root / "fsdp-resumed")


@pytest.fixture(scope="module")
def runs(tiny_run, tmp_path_factory):
    """The same 4-step job run by one process and by two under torchrun; the two-process FSDP2, prompt-grouped
    and online SPL runs of their tests; then the two-process and FSDP2 runs damaged or rolled back
    (`damage_and_roll_back`) and resumed with their own commands: all in one launch."""
    root = tmp_path_factory.mktemp("distributed")
    rows = [json.loads(line) for line in Path(tiny_run["data"]).read_text().splitlines()][:21]
    for i, row in enumerate(rows):
        row["chosen"] += " and calm" * (i % 4)  # different lengths: each share has its own padding
    data = root / "prefs21.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    grouped = grouped_data(root)
    model = tiny_run["model"]
    one, two = root / "one", root / "two"
    assert train.main(args(data, model, one)) == 0
    stdout = torchrun_jobs({"two": args(data, model, two, "--grad-checkpointing"),
                            "fsdp": args(data, model, root / "fsdp", *FSDP),
                            "grouped": args(grouped, model, root / "grouped-two", *GROUPED),
                            "online": online_args(root / "online", "--steps", "2", "--batch-size", "4", "--threads",
                                                  "1"),  # the last --steps wins
                            "resumed": args(data, model, root / "resumed", "--grad-checkpointing", "--resume"),
                            "fsdp-resumed": args(data, model, root / "fsdp-resumed", *FSDP, "--resume")},
                           root, prepare={"resumed": ["tests.test_spl_distributed:damage_and_roll_back", root]})
    return {"data": data, "model": model, "one": one, "two": two, "stdout": stdout["two"], "root": root,
            "fsdp_stdout": stdout["fsdp"], "grouped": grouped, "resumed_stdout": stdout["resumed"]}


@pytest.fixture(scope="module")
def resumed(runs):
    """The resumed two-process run's output and the file cut short (`damage_and_roll_back`)."""
    return {"stdout": runs["resumed_stdout"], "damaged": runs["root"] / "resumed" / DAMAGED}


def test_two_processes_equal_one_process(runs):
    assert_close_adapters(adapter(runs["one"]), adapter(runs["two"]))
    one, two = metrics(runs["one"]), metrics(runs["two"])
    assert [r["step"] for r in two] == [1, 2, 3, 4]  # rank 0 alone writes the log: one line per step
    for a, b in zip(one, two):  # the logged means are over the global batch, all processes together
        for key in ("loss", "margin", "reward_accuracy", "logps_chosen", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key


def test_only_rank_zero_prints_and_writes(runs):
    stdout = runs["stdout"]
    assert stdout.count("model: ") == 1 and stdout.count("adapter: ") == 1
    assert "x 2 processes" in stdout
    checkpoints = sorted(p.name for p in (runs["two"] / "checkpoints").iterdir())
    assert checkpoints == ["step_000002", "step_000004"]  # no temporary directories left by other ranks
    from spl.runs import load_checkpoint
    _, _, rng, _ = load_checkpoint(runs["two"] / "checkpoints" / "step_000002")
    assert len(rng["per_rank"]) == 2  # every process's RNG, so dropout noise resumes per process
    assert not torch.equal(rng["per_rank"][0]["torch"], rng["per_rank"][1]["torch"])  # each its own


def roll_back(run, copy, step=4):
    """A copy of `run` as if it had died right after its checkpoint before `step`: that checkpoint and the
    adapter removed (the metrics log keeps its later lines, which --resume drops)."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / f"step_{step:06d}")
    shutil.rmtree(copy / "adapter")
    return copy


def assert_same_steps(a, b):
    """The logged steps of two runs, bit for bit (floats compared exactly), but for the wall-clock fields."""
    timing = {"tokens_per_s", "step_s", "step_cpu_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in a] == \
        [{k: v for k, v in r.items() if k not in timing} for r in b]


def test_resume_under_torchrun_is_bit_identical(runs, resumed):
    """Damage the two-process run's step-4 checkpoint (its optimizer file cut short) and resume it with the same
    command: the damaged one is named and passed over, steps 3 and 4 are computed again from the step-2
    checkpoint (every process's RNG, the global data position, the reference log-probs from the cache that rank
    0 wrote), and the adapter and every logged value equal the uninterrupted run's exactly."""
    stdout = resumed["stdout"]
    assert f"damaged checkpoint: {resumed['damaged']}: 100 bytes" in stdout  # named in one line, passed over
    assert "resumed from" in stdout and "step 2" in stdout
    assert "reference log-probs: loaded" in stdout  # the cache rank 0 wrote, sent to the other process
    assert_same_tensors(adapter(runs["two"]), adapter(runs["root"] / "resumed"))
    assert_same_steps(metrics(runs["two"]), metrics(runs["root"] / "resumed"))


def test_fsdp_with_dropout_resumes_bit_identical(runs, resumed):
    """FSDP2 sharding the frozen weights, LoRA dropout 0.1 (each process draws its own noise): a run rolled back to
    its step-2 checkpoint and resumed ends exactly where the uninterrupted one ends, adapter and logged values."""
    full = runs["root"] / "fsdp"
    assert "(FSDP)" in runs["fsdp_stdout"]
    assert_same_tensors(adapter(full), adapter(runs["root"] / "fsdp-resumed"))
    assert_same_steps(metrics(full), metrics(runs["root"] / "fsdp-resumed"))


def test_shares_partition_every_global_batch(tiny_run):
    """share_batches: for each global batch of the one-process order, the ranks' shares are contiguous, disjoint
    and cover it; a rank with nothing left gets a stand-in pair marked counts=False."""
    from data.batching import PreferenceBatches
    from data.tokenization import PreferenceExample

    examples = [PreferenceExample([1, 5 + i], [7] * (1 + i % 3) + [2], [8, 2], 0.75, index=i) for i in range(9)]
    whole = PreferenceBatches(examples, 4, pad_id=0, seed=3)
    world = 3
    shares = [distributed.share_batches(PreferenceBatches(examples, 4, pad_id=0, seed=3), distributed.Processes(rank, world))
              for rank in range(world)]
    for _ in range(len(whole) * 2):  # two epochs: 4 + 4 + 1 pairs each
        expected = next(whole)["pair_index"].tolist()
        got = [next(share) for share in shares]
        counted = [b["pair_index"].tolist() for b in got if b["counts"]]
        assert sum(counted, []) == expected  # contiguous pieces, in order, covering the batch exactly once
        for b in got:
            if not b["counts"]:
                assert b["pair_index"].tolist() == expected[:1]  # the stand-in: the batch's first pair
            assert b["attention_mask"][:, -1].any()  # padded to its own longest row, not the batch's
    assert distributed.share_batches(whole, distributed.Processes()) is whole  # one process: unchanged


def test_batch_size_must_split_over_processes(monkeypatch, capsys):
    """--batch-size counts pairs over all processes: it must divide into processes x grad_accum micro-batches,
    checked at start-up from torchrun's WORLD_SIZE, before any process group or file."""
    with pytest.raises(train_config.UsageError, match=r"multiple of --grad-accum \(2\) x 2 processes = 4"):
        train_config.validate(train_config.TrainConfig(batch_size=6, grad_accum=2), world_size=2)
    train_config.validate(train_config.TrainConfig(batch_size=8, grad_accum=2), world_size=2)  # 2 processes x 2 x 2
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train.main(["--batch-size", "6", "--grad-accum", "1"]) == 2
    err = capsys.readouterr().err
    assert "--grad-accum (1) x 4 processes = 4" in err and err.count("\n") == 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train.main(["--fsdp"]) == 2
    err = capsys.readouterr().err
    assert "--fsdp shards the frozen weights across processes" in err and err.count("\n") == 1


def test_grouped_anchored_two_processes_equal_one_process(runs, tmp_path):
    """Prompt-grouped batches with the anchor under torchrun: each process takes whole prompts of every global
    micro-batch (PromptGroupedBatches.shares), so each prompt's option-mass anchor sees all its responses on one
    process, and the two-process adapter equals the one-process one. 7 prompts x 3 pairs, 2 prompts per
    micro-batch: the epoch's last micro-batch holds one prompt, so one rank runs a stand-in weighted 0."""
    one, two = tmp_path / "one", runs["root"] / "grouped-two"
    assert train.main(args(runs["grouped"], runs["model"], one, *GROUPED)) == 0
    a, b = adapter(one), adapter(two)
    assert a.keys() == b.keys() and any(t.abs().max() > 1e-3 for name, t in a.items() if "lora_B" in name)
    for name in a:  # measured 1.3e-5 at most (entries ~0.2): float32 rounding of differently padded shares, which
        # AdamW turns into steps of up to lr where a gradient entry is near 0; a wrong split moves them by ~lr = 1e-2
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-4, msg=name)
    for a, b in zip(metrics(one), metrics(two)):
        # Step 1 (before any update) is the computation itself: equal to float32 rounding (measured 8e-8 at most).
        # Later steps differ by more as AdamW's first, sign-like updates turn a gradient entry's rounding into an
        # lr-sized step (measured 1.2e-5 at step 2, 1.7e-4 at steps 3 and 4: the shares' prefix trees pack their
        # tokens differently); a prompt whose responses were split over the processes would move the anchor by
        # O(1) from step 2 on.
        for key in ("loss", "anchor", "margin", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-6 if a["step"] == 1 else 1e-3, abs=1e-6), (a["step"], key)


def test_grouped_shares_keep_whole_prompts(tiny_run):
    """share_batches on PromptGroupedBatches: the ranks' shares of each global batch are whole prompts, disjoint,
    and together the batch's pairs in order."""
    from data.batching import PromptGroupedBatches
    from data.tokenization import PreferenceExample

    examples = [PreferenceExample([1, 5 + p], [7] * (1 + r) + [2], [8, 2], 0.75, index=3 * p + r)
                for p in range(5) for r in range(3)]
    whole = PromptGroupedBatches(examples, 3, pad_id=0, seed=1)
    shares = [distributed.share_batches(PromptGroupedBatches(examples, 3, pad_id=0, seed=1), distributed.Processes(rank, 2))
              for rank in range(2)]
    for _ in range(4):
        expected = next(whole)["pair_index"].tolist()
        got = [next(share) for share in shares]
        counted = [b["pair_index"].tolist() for b in got if b["counts"]]
        assert sum(counted, []) == expected
        prompts = [{i // 3 for i in pairs} for pairs in counted]
        assert all(len(pairs) == 3 * len(p) for pairs, p in zip(counted, prompts))  # whole prompts only
        assert len(prompts) < 2 or not prompts[0] & prompts[1]


def test_train_spl_online_under_torchrun(runs):
    """Online SPL with two processes (gloo), each sampling for its share of every batch of prompts: the run
    completes, every step's metrics are logged once (summed over both shares: the option fraction stays a
    fraction), only rank 0 writes the adapter and the report, and the adapter trained. (Resuming under torchrun is
    bit-identical: docs/results.md gives the command that showed it.)"""
    out = runs["root"] / "online"
    records = metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(0 <= r["option_fraction"] <= 1 and 0 < r["candidate_mass"] <= 1 for r in records)
    assert len(json.loads((out / "report.json").read_text())["questions"]) == 30
    tensors = adapter(out)
    assert any(float(t.abs().max()) > 0 for name, t in tensors.items() if "lora_B" in name)
