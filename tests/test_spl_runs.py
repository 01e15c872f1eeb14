"""spl/runs.py: pickle-free checkpoints that resume bit for bit, verified on load; the run-directory lock.

Oracles: invariants. AdamW continued from a saved and re-loaded checkpoint takes exactly the steps (torch.equal)
of the optimizer that never stopped; every RNG (torch, numpy, Python random) restored from a checkpoint draws
exactly what it would have drawn; a checkpoint damaged in any way is refused naming the file, and resume falls
back to the newest one that verifies; a save failing with ENOSPC leaves the checkpoints there were, loadable;
a lock held by a live process (another OS process, or another open of the file) refuses; one left by a process
killed with SIGKILL is taken over, naming it. The grep-level guarantee (no pickle anywhere in runtime code) is
test_no_pickle.py's.
"""
import errno
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from spl import runs


def small_problem(seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = {"a.weight": torch.nn.Parameter(torch.randn(4, 3, generator=generator)),
              "b.weight": torch.nn.Parameter(torch.randn(5, generator=generator))}
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1)
    return params, optimizer


def adam_steps(params, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = sum((p * torch.randn(p.shape, generator=generator)).sum() ** 2 for p in params.values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_optimizer_and_rng_resume_bit_for_bit(tmp_path):
    """3 steps, checkpoint, 3 more; against a fresh model + optimizer loaded from the checkpoint taking the same
    3 steps. Then the RNGs: what each draws after set_rng_state(loaded) equals what it drew right after saving."""
    params, optimizer = small_problem()
    adam_steps(params, optimizer, 3, seed=1)
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's state
    path = runs.save_checkpoint(tmp_path, 3, params, optimizer, {"data": {"epoch": 0, "position": 12}})
    after_save = (torch.rand(4), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    adam_steps(params, optimizer, 3, seed=2)

    fresh, fresh_optimizer = small_problem(seed=9)
    tensors, optimizer_state, rng, state = runs.load_checkpoint(path)
    with torch.no_grad():
        for name, p in fresh.items():
            p.copy_(tensors[name])
    fresh_optimizer.load_state_dict(optimizer_state)
    assert fresh_optimizer.param_groups[0]["betas"] == (0.8, 0.99)
    assert state == {"step": 3, "data": {"epoch": 0, "position": 12}}
    adam_steps(fresh, fresh_optimizer, 3, seed=2)
    for name in params:
        assert torch.equal(fresh[name], params[name]), name
    for a, b in zip(fresh_optimizer.state_dict()["state"].values(), optimizer.state_dict()["state"].values()):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    assert len(rng["per_rank"]) == 1
    runs.set_rng_state(rng["per_rank"][0])
    again = (torch.rand(4), np.random.standard_normal(3), random.random(), random.gauss(0, 1))
    assert torch.equal(again[0], after_save[0]) and np.array_equal(again[1], after_save[1])
    assert again[2:] == after_save[2:]


def test_rng_state_as_json_is_exact():
    """rng_state -> JSON text -> rng_state_from_json (how torchrun's processes send theirs to rank 0): after setting
    the round-tripped state, every RNG draws exactly what it drew right after rng_state() was taken."""
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    np.random.standard_normal()  # a cached Gaussian, a float that must survive JSON exactly
    random.gauss(0, 1)  # Python's gauss_next likewise
    state = runs.rng_state()
    drawn = (torch.rand(5), np.random.standard_normal(4), random.random(), random.gauss(0, 1))
    runs.set_rng_state(runs.rng_state_from_json(json.loads(json.dumps(runs.rng_state_to_json(state)))))
    again = (torch.rand(5), np.random.standard_normal(4), random.random(), random.gauss(0, 1))
    assert torch.equal(again[0], drawn[0]) and np.array_equal(again[1], drawn[1]) and again[2:] == drawn[2:]


def test_cuda_rng_state_is_saved_and_restored(tmp_path, monkeypatch):
    """The CUDA branch without a GPU: torch.cuda monkeypatched to a device in use whose generator state is a known
    byte string. rng_state() takes it, the checkpoint stores it as rank0.cuda, the JSON form carries it, and
    set_rng_state(loaded) hands torch.cuda.set_rng_state exactly those bytes; with CUDA absent at resume it is
    left alone (the CPU RNGs are still restored)."""
    cuda_state = torch.arange(16, dtype=torch.uint8) * 7  # stands for a Philox seed and offset
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": cuda_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state.clone()))
    params, optimizer = small_problem()
    state = runs.rng_state()
    assert torch.equal(state["cuda"], cuda_state)
    assert torch.equal(runs.rng_state_from_json(runs.rng_state_to_json(state))["cuda"], cuda_state)
    path = runs.save_checkpoint(tmp_path, 1, params, optimizer, {"data": {}})
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(path / "rng.safetensors"))["rank0.cuda"], cuda_state)
    _, _, rng, _ = runs.load_checkpoint(path)
    runs.set_rng_state(rng["per_rank"][0])
    assert len(restored) == 1 and torch.equal(restored[0], cuda_state)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(3)
    expected = torch.rand(3)
    runs.set_rng_state(rng["per_rank"][0] | {"torch": torch.manual_seed(3).get_state()})
    assert len(restored) == 1 and torch.equal(torch.rand(3), expected)


def test_checkpoint_files_hold_no_pickle(tmp_path):
    """Every file is safetensors or JSON: each .json parses as JSON; each .safetensors is its 8-byte header length,
    a JSON header whose last data offset is where the file ends (nothing else fits: not a zip as torch.save
    writes, not a pickle stream)."""
    params, optimizer = small_problem()
    adam_steps(params, optimizer, 1, seed=1)
    path = runs.save_checkpoint(tmp_path, 1, params, optimizer, {"data": {}})
    names = sorted(p.name for p in path.iterdir())
    assert names == ["manifest.json", "optimizer.json", "optimizer.safetensors", "rng.json", "rng.safetensors",
                     "state.json", "trainable.safetensors"]
    for file in path.iterdir():
        data = file.read_bytes()
        if file.suffix == ".json":
            json.loads(data)
        else:
            length = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + length])
            end = max(entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__")
            assert 8 + length + end == len(data), file.name


def checkpoints_at(tmp_path, steps):
    params, optimizer = small_problem()
    paths = []
    for step in steps:
        adam_steps(params, optimizer, 1, seed=step)
        paths.append(runs.save_checkpoint(tmp_path, step, params, optimizer, {"data": {}}, keep=10))
    return paths


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest", "garbage-json"])
def test_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, damage):
    first, second = checkpoints_at(tmp_path, [2, 4])
    target = second / ("state.json" if damage == "garbage-json" else "trainable.safetensors")
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[:len(data) // 3])
    elif damage == "flip":
        target.write_bytes(data[:-2] + bytes([data[-2] ^ 4]) + data[-1:])
    elif damage == "no-manifest":
        (second / "manifest.json").unlink()
    else:  # edited consistently, manifest and all, into something that is no checkpoint
        target.write_text('{"step": "four"}')
        (second / "manifest.json").unlink()
        from models.files import write_manifest
        write_manifest(second)
    lines = []
    path, (_, _, _, state) = runs.load_latest_checkpoint(tmp_path, say=lines.append)
    assert path == first and state["step"] == 2
    assert len(lines) == 1 and "\n" not in lines[0] and str(second) in lines[0]
    assert lines[0].endswith("trying the checkpoint before it")


def test_no_usable_checkpoint_names_the_file(tmp_path):
    (only,) = checkpoints_at(tmp_path, [2])
    (only / "rng.safetensors").write_bytes(b"")
    lines = []
    with pytest.raises(runs.RunError) as error:
        runs.load_latest_checkpoint(tmp_path, say=lines.append)
    message = str(error.value)
    assert "no usable checkpoint" in message and str(only / "rng.safetensors") in message and "\n" not in message
    assert runs.load_latest_checkpoint(tmp_path / "fresh") is None  # no checkpoints at all: start from step 0


def test_failing_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The disk fills while the step-4 checkpoint is written (safetensors' write raises ENOSPC): one-line
    RunError naming the step-4 directory and the intact step-2 one, which still loads; nothing else left."""
    (first,) = checkpoints_at(tmp_path, [2])
    params, optimizer = small_problem()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(runs, "save_file", full_disk)
    with pytest.raises(runs.RunError) as error:
        runs.save_checkpoint(tmp_path, 4, params, optimizer, {"data": {}})
    assert str(error.value) == (f"{tmp_path / 'checkpoints' / 'step_000004'}: checkpoint not saved (No space left "
                                f"on device); the previous checkpoint {first} is intact")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000002"]
    assert runs.load_checkpoint(first)[3]["step"] == 2


def test_lock_refuses_a_second_holder_and_cleans_up(tmp_path):
    out = tmp_path / "run"
    with runs.RunLock(out) as lock:
        holder = json.loads((out / ".lock").read_text())
        assert holder["pid"] == os.getpid() and lock.took_over is None
        with pytest.raises(runs.RunError, match=rf"in use by process {os.getpid()} on .* \(since "):
            with runs.RunLock(out):
                pass
        assert (out / ".lock").exists()  # the refused one did not remove the holder's lock
    assert not out.exists()  # created by the lock, nothing written: removed with it
    out.mkdir()
    (out / "config.json").write_text("{}")
    with runs.RunLock(out):
        pass
    assert sorted(os.listdir(out)) == ["config.json"]


def test_lock_of_another_live_process_refuses_and_of_a_killed_one_is_taken_over(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from spl.runs import RunLock\n"
         f"with RunLock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(runs.RunError, match=rf"in use by process {holder.pid} "):
            with runs.RunLock(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops a dead process's flock at once; allow for a slow reaper
        try:
            with runs.RunLock(out) as lock:
                took_over = lock.took_over
            break
        except runs.RunError:
            assert time.time() < deadline
            time.sleep(0.05)
    assert took_over is not None and f"process {holder.pid} on " in took_over and "no longer runs" in took_over


def test_overwrite_keeps_the_lock_file(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / "checkpoints").mkdir()
    (out / ".spl-run").write_text("{}")  # a run directory train.py made: --overwrite may empty it
    with runs.RunLock(out):
        runs.prepare_run_dir(out, resume=False, overwrite=True)
        assert sorted(os.listdir(out)) == [".lock", ".spl-run"]  # the old files gone, a fresh marker
        runs.check_run_dir(out, resume=False, overwrite=False)  # its own lock does not make it "not empty"
