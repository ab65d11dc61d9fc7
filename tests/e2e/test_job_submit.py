"""A real Ray head (`ray start --head`), the tiny config submitted with `ray job submit`.

This is the path users take on a cluster: the job's entrypoint is the same `ray-dpo train`
command, it joins the cluster through RAY_ADDRESS, and the run lands in MLflow. Token
authentication stays on (Ray 2.60's default); the test hands the token to both sides.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
               RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}:{os.environ['PATH']}")
    # Every port of its own: the defaults (e.g. the dashboard agent's 52365, which job
    # submission needs) collide with any other Ray cluster on the machine.
    gcs, dash, agent = free_port(), free_port(), free_port()
    # A temp dir of its own, with a short path (unix socket names have a length limit): its
    # path is in every process of this head, which is how the teardown finds them.
    temp_dir = tempfile.mkdtemp(prefix="rdpo-e2e-", dir="/tmp")
    try:
        subprocess.run([f"{BIN}/ray", "start", "--head", f"--port={gcs}", "--num-cpus=4",
                        f"--dashboard-port={dash}", "--include-dashboard=true", "--disable-usage-stats",
                        f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}"],
                       env=env, check=True, capture_output=True, text=True, timeout=180)
        yield env, f"http://127.0.0.1:{dash}"
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def stop_head(temp_dir: str) -> None:
    """End this head's processes only (by their command line or open log files under the
    head's temp dir). `ray stop` would end every Ray process on the machine, other
    people's clusters included."""
    import psutil

    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            # Agents retitle themselves (ray::DashboardAgent), but keep their logs open.
            if (any(temp_dir in arg for arg in proc.info["cmdline"] or ())
                    or any(f.path.startswith(temp_dir) for f in proc.open_files())):
                procs.append(proc)
        except psutil.Error:
            continue
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


@pytest.mark.extended
def test_ray_job_submit_runs_tiny_config(ray_head, tiny_assets, tmp_path):
    from mlflow.tracking import MlflowClient

    env, address = ray_head
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_assets["root"], work / ".tiny")
    storage = tmp_path / "runs"
    cmd = [f"{BIN}/ray", "job", "submit", "--address", address, "--working-dir", str(work),
           "--submission-id", "tiny-e2e", "--",
           f"{BIN}/ray-dpo", "train", os.path.abspath("configs/tiny-cpu.yaml"),
           "--set", f"run.storage_path={storage}", "--set", "policy.max_steps=6",
           "--set", "eval.every_steps=3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # The job's console keeps ray_dpo's progress (printed in the Ray Train controller, on the
    # cluster) and summary, without Ray's per-step report dicts and their pair ids.
    from console_checks import console_problems

    problems = console_problems(proc.stdout + proc.stderr, steps=6)
    assert not problems, "\n".join(problems)
    status = subprocess.run([f"{BIN}/ray", "job", "status", "--address", address, "tiny-e2e"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert "succeeded" in (status.stdout + status.stderr).lower()

    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    exp = client.get_experiment_by_name("ray_dpo-tiny")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray_dpo.mode"] == "offline"
    assert {"train/loss", "train/rewards/accuracies", "eval/loss", "perf/tokens_per_s"} <= set(run.data.metrics)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
