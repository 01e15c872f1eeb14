"""eval/bench/gpu.py, the check a first lent GPU runs: its dry run on CPU, so that the script cannot rot before a
GPU arrives. Oracles: invariants of the summary it writes (every step's command, exit code and record), FSDP2's
sharded step equal to the unsharded one (the step's own check, asserted again here from its numbers), and the
GPU plan naming existing scripts with the shapes the issue asks for."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.bench import gpu

pytestmark = pytest.mark.slow  # the dry run: scheduled first (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_plan_names_real_scripts_and_the_asked_shapes(tmp_path):
    plan = {name: command for name, command, _, _ in gpu.steps(dry_run=False, work=tmp_path)}
    assert set(plan) == {"device_tests", "step_7b", "step_7b_compiled", "logprobs_fused", "logprobs_naive",
                         "logprobs_torch", "generate", "torchrun_train", "nccl_fsdp2"}
    for command in plan.values():
        scripts = [part for part in command if part.endswith(".py")]
        assert all(Path(script).is_file() for script in scripts), command
    assert plan["logprobs_fused"][plan["logprobs_fused"].index("--dim") + 1] == "4096"
    assert plan["logprobs_fused"][plan["logprobs_fused"].index("--vocab") + 1] == "32768"
    assert "bfloat16" in plan["step_7b"] and "cuda" in plan["step_7b"] and "--scale" not in plan["step_7b"]
    limits = sum(limit for *_, limit in gpu.steps(dry_run=False, work=tmp_path))
    assert limits < 8 * 60  # the whole check fits one lent machine call with room to rerun


def test_dry_run_writes_a_summary(tmp_path):
    """Two of the steps, each its own process as on the GPU: a log-prob benchmark (the uncompiled one: the fused
    kernel's CPU compile costs ~8 CPU-seconds here, and tests/test_spl_logprobs.py checks it compiled) and the
    torchrun FSDP2 smoke run."""
    out = tmp_path / "dry.json"
    assert gpu.main(["--dry-run", "--out", str(out), "--only", "logprobs_naive,nccl_fsdp2"]) == 0
    summary = json.loads(out.read_text())
    assert summary["dry_run"] and [s["name"] for s in summary["steps"]] == ["logprobs_naive", "nccl_fsdp2"]
    logprobs, fsdp = (s["result"] for s in summary["steps"])
    assert all(s["exit_code"] == 0 for s in summary["steps"])
    assert logprobs["method"] == "naive" and logprobs["time_ms"] > 0
    assert fsdp["backend"] == "gloo" and fsdp["all_reduce_ok"] and fsdp["lora_tensors"] == 28
    assert abs(fsdp["loss_fsdp2"] - fsdp["loss_unsharded"]) < 1e-5 and fsdp["max_lora_grad_diff"] < 1e-5


def test_a_failing_step_is_recorded_not_fatal(tmp_path):
    """A step whose process fails keeps its exit code and output tail in the summary."""
    record = gpu.run_step("broken", ["python", "-c", "import sys; print('partial'); sys.exit(3)"], {}, 30)
    assert record["exit_code"] == 3 and "partial" in record["output_tail"] and record["result"] is None
    assert gpu.last_json('noise\n{"a": 1}\ntail\n') == {"a": 1}
