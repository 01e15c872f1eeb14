"""Several train.py jobs in one torchrun launch, for the tests: `torchrun ... tests/torchrun_jobs.py JOBS.json`.

JOBS.json is a list of {"argv": [...], "stdout": "PATH"}, each optionally with "prepare": ["module:function",
arg, ...]. Every process calls `train.main(argv)` for each job in turn, as `torchrun train.py argv` would
(train.main joins the process group and leaves it), and writes what it printed to PATH.RANK. A job's prepare
function runs on rank 0 before the job starts (the others wait for it: they block on the job's port, which rank 0
publishes after it), so a job may use files the jobs before it wrote (e.g. damage a checkpoint, then resume).
A launch costs torchrun's start and every process's import of torch and train.py (~6 CPU-seconds on the 2-core
machine), more than a tiny job's training: the suite pays it once for several jobs.
A job that fails stops the launch with its exit code.

Each job joins a process group of its own, on a fresh store: rank 0 picks a free port, hands it to the others
through torchrun's store, and train.main's `init_process_group` (env://) then serves its store there. Joining
twice through torchrun's own store is not safe: destroy_process_group resets the group counter, so the second
group's keys have the first one's names, and a process arriving early can read its peer's stale address and
wait forever (seen: rank 1 in a broadcast, rank 0 still building its gloo group)."""
import contextlib
import importlib
import json
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, as `torchrun train.py` has it

import torch.distributed as dist  # noqa: E402

import train  # noqa: E402


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


rank = int(os.environ["RANK"])
launch = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                       timeout=timedelta(seconds=120))
os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"  # env:// then starts a store on rank 0 at MASTER_PORT
for i, job in enumerate(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))):
    if rank == 0:
        if job.get("prepare"):
            module, function = job["prepare"][0].split(":")
            getattr(importlib.import_module(module), function)(*job["prepare"][1:])
        launch.set(f"torchrun_jobs/{i}/port", free_port())
    os.environ["MASTER_PORT"] = launch.get(f"torchrun_jobs/{i}/port").decode()
    with open(f"{job['stdout']}.{rank}", "w", encoding="utf-8", buffering=1) as log, contextlib.redirect_stdout(log):
        code = train.main(job["argv"])
    if code:
        sys.exit(code)
