"""Kill a run's processes mid-run and check what survived (tests/ray/test_faults.py and
benchmarks/chaos.py).

A run is ``ray-dpo train`` in a subprocess that joins an existing Ray cluster; a role's
process is found in Ray's actor table by its class and killed with SIGKILL, as a crash, an
OOM kill or a lost node would. The checks are a user's: the exit code, the MLflow run, the
number of optimizer steps, and every pair exactly once per epoch in the ledger.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

from ray_dpo import compat

# role -> actor class name in Ray's actor table ("driver" is the ray-dpo process itself)
ROLE_CLASSES = {"worker": "RayTrainWorker", "feeder": "_FeederActor", "reference": "ReferenceActor",
                "coordinator": "_CoordinatorActor", "engine": "Engine"}  # VLLMEngine, TransformersEngine


def ledger(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "ledger.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def start_cli(config_path: str, log_path: str, gcs_address: str, command: str = "train") -> tuple[subprocess.Popen, object]:
    """``ray-dpo <command> CONFIG`` (train or sweep) joining the cluster at ``gcs_address``;
    output to ``log_path``."""
    env = dict(os.environ, RAY_ADDRESS=gcs_address)
    out = open(log_path, "w+", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "ray_dpo.cli", command, config_path], env=env,
                            stdout=out, stderr=subprocess.STDOUT, text=True)
    return proc, out


def finish(proc: subprocess.Popen, out, timeout: float = 900) -> tuple[int, str]:
    """Wait for the run; (exit code, console)."""
    code = proc.wait(timeout=timeout)
    out.seek(0)
    text = out.read()
    out.close()
    return code, text


def alive_pids(class_name: str) -> list[int]:
    """PIDs of the live actors of ``class_name`` (Ray's actor table, sorted by PID)."""
    return sorted(a["Pid"] for a in compat.actor_table().values()
                  if a["ActorClassName"].endswith(class_name) and a["State"] == "ALIVE" and a["Pid"])


def role_pid(role: str, proc: subprocess.Popen, pick: int = 0) -> int:
    """The PID to kill for ``role`` (worker / feeder / reference / driver)."""
    if role == "driver":
        return proc.pid
    pids = alive_pids(ROLE_CLASSES[role])
    if not pids:
        raise LookupError(f"no live {ROLE_CLASSES[role]} actor")
    return pids[pick % len(pids)]


def kill_when(proc: subprocess.Popen, run_dir: str, *, steps: int, pid_of: Callable[[], int],
              timeout: float = 600, sig: int = signal.SIGKILL) -> Optional[int]:
    """Send ``sig`` (SIGKILL) to ``pid_of()`` once the ledger has ``steps`` steps; the PID, or
    None if the run ended first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if len(ledger(run_dir)) >= steps:
            pid = pid_of()
            os.kill(pid, sig)
            return pid
        time.sleep(0.1)
    return None


def ledger_problems(run_dir: str, *, steps: int, pairs_per_step: int) -> list[str]:
    """Why the ledger is not steps 1..steps once each with every pair once; empty if it is."""
    problems, counts = _steps_once_pairs_once(run_dir, steps)
    if len(counts) != steps * pairs_per_step:
        problems.append(f"{len(counts)} distinct pairs, expected {steps * pairs_per_step}")
    return problems


def _steps_once_pairs_once(run_dir: str, steps: int) -> tuple[list[str], collections.Counter]:
    """(problems with "steps 1..steps once each, no pair twice", pair id -> times trained)."""
    entries = ledger(run_dir)
    problems = []
    if [e["step"] for e in entries] != list(range(1, steps + 1)):
        problems.append(f"ledger steps {[e['step'] for e in entries]}, expected 1..{steps}")
    counts = collections.Counter(pid for e in entries for pid in e["pair_ids"])
    twice = [pid for pid, n in counts.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} pair(s) trained twice, e.g. {twice[:3]}")
    return problems, counts


def round_pair_ids(run_dir: str) -> set[str]:
    """The pair ids every online round kept (its rows in the round store)."""
    directory = os.path.join(run_dir, "online_rounds")
    ids = set()
    for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
        if name.endswith(".jsonl"):
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                ids.update(json.loads(line)["pair_id"] for line in list(f)[1:] if line.strip())
    return ids


def online_ledger_problems(run_dir: str, *, steps: int) -> list[str]:
    """Why the ledger of a one-epoch online run is not steps 1..steps once each with every
    kept pair of every round exactly once; empty if it is."""
    problems, counts = _steps_once_pairs_once(run_dir, steps)
    kept = round_pair_ids(run_dir)
    if not kept:
        problems.append("no round in the round store")
    if set(counts) - kept:
        problems.append(f"{len(set(counts) - kept)} trained pair(s) no round kept, e.g. {sorted(set(counts) - kept)[:3]}")
    if kept - set(counts):
        problems.append(f"{len(kept - set(counts))} kept pair(s) never trained, e.g. {sorted(kept - set(counts))[:3]}")
    return problems


def mlflow_run(storage_path: str, run_dir: str):
    """(MlflowClient, Run) of the run whose id the driver kept in ``run_dir``."""
    from mlflow.tracking import MlflowClient

    with open(os.path.join(run_dir, "mlflow_run_id"), encoding="utf-8") as f:
        run_id = f.read().strip()
    client = MlflowClient(f"sqlite:///{os.path.join(os.path.abspath(storage_path), 'mlflow.db')}")
    return client, client.get_run(run_id)
