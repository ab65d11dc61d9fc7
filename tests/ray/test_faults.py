"""Fault tolerance on the tiny config: real Ray processes killed with SIGKILL mid-run.

Each test runs ``ray-dpo train`` in a subprocess that joins this module's cluster, kills one
role's process once the ledger shows the run under way, and checks what a user would
(ray_dpo/testing/chaos.py): exit code, the MLflow run, the number of optimizer steps, and
every pair exactly once in the final ledger. 12 steps of 16 pairs, a checkpoint every 4.
"""

from __future__ import annotations

import json
import os
import random
import signal

import pytest

from ray_dpo.testing import chaos

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FAST = {"policy.checkpoint_every_steps": 4, "policy.max_steps": 12, "eval.every_steps": 0,
        "data.eval_files": "[]"}
STEPS, PAIRS_PER_STEP = 12, 16  # two workers x micro-batch 8


def start(cfg, tmp_path, ray):
    from ray_dpo.config import to_yaml

    path = tmp_path / f"{cfg.run.name}.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    log = tmp_path / f"{cfg.run.name}-{len(list(tmp_path.glob(cfg.run.name + '-*.log')))}.log"
    return chaos.start_cli(str(path), str(log), ray.get_runtime_context().gcs_address)


def kill(proc, cfg, role, *, steps):
    pid = chaos.kill_when(proc, cfg.run_dir, steps=steps, pid_of=lambda: chaos.role_pid(role, proc))
    assert pid is not None, f"the run ended (exit {proc.poll()}) before step {steps}"


def run_killing(cfg, tmp_path, ray, role, *, steps):
    """Run cfg, SIGKILL ``role`` once the ledger has ``steps`` steps; (exit code, console)."""
    proc, out = start(cfg, tmp_path, ray)
    kill(proc, cfg, role, steps=steps)
    return chaos.finish(proc, out)


def assert_complete(cfg, code, console, *, steps=STEPS):
    assert code == 0, console[-6000:]
    problems = chaos.ledger_problems(cfg.run_dir, steps=steps, pairs_per_step=PAIRS_PER_STEP)
    assert not problems, "\n".join(problems) + "\n" + console[-4000:]
    client, run = chaos.mlflow_run(cfg.run.storage_path, cfg.run_dir)
    assert run.info.status == "FINISHED"
    assert {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")} == set(range(1, steps + 1))
    return client, run


def test_a_killed_policy_worker_restarts_from_the_checkpoint(ray_cluster, tiny_config, tmp_path):
    cfg = tiny_config("kill-worker", **FAST)
    code, console = run_killing(cfg, tmp_path, ray_cluster, "worker", steps=6)
    client, run = assert_complete(cfg, code, console)
    assert "policy workers restarted (1 of policy.max_failures=3)" in console
    # What the user sees, restart included: ray_dpo's lines, not Ray's per-step chatter.
    from console_checks import console_problems
    assert not console_problems(console, steps=STEPS), "\n".join(console_problems(console, steps=STEPS))
    assert run.data.metrics["faults/worker_restarts"] == 1
    # Steps after the checkpoint were logged twice; the rollback is marked at the checkpoint.
    rolled = client.get_metric_history(run.info.run_id, "faults/rolled_back_steps")
    assert [m.step for m in rolled] == [4] and rolled[0].value >= 2


@pytest.mark.extended
def test_a_killed_feeder_is_restarted_and_loses_no_pair(ray_cluster, tiny_config, tmp_path):
    cfg = tiny_config("kill-feeder", **FAST)
    code, console = run_killing(cfg, tmp_path, ray_cluster, "feeder", steps=6)
    _, run = assert_complete(cfg, code, console)
    assert run.data.metrics["faults/feeder_restarts"] == 1
    assert run.data.metrics["faults/worker_restarts"] == 0


# Extended tier since stop 19 (187 s here; CI's 35 minutes): CI keeps the worker kill above.
@pytest.mark.extended
def test_a_killed_driver_reruns_past_a_truncated_checkpoint(ray_cluster, tiny_config, tmp_path):
    """The driver dies (its job's actors with it); the latest checkpoint is then damaged:
    the same command resumes from the one before, says so, and the ledger is exact."""
    cfg = tiny_config("kill-driver", **{**FAST, "policy.checkpoint_every_steps": 3})
    run_killing(cfg, tmp_path, ray_cluster, "driver", steps=7)
    with open(os.path.join(cfg.run_dir, "checkpoint_manager_snapshot.json"), encoding="utf-8") as f:
        latest = json.load(f)["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert latest != "checkpoint_000003", "the kill landed before the second checkpoint"
    shard = next(os.path.join(root, name) for root, _, names in os.walk(os.path.join(cfg.run_dir, latest))
                 for name in names if name.endswith("optim_states.pt"))
    with open(shard, "r+b") as f:
        f.truncate(100)

    proc, out = start(cfg, tmp_path, ray_cluster)
    code, console = chaos.finish(proc, out)
    assert f"{latest} is incomplete" in console, console[-6000:]
    assert_complete(cfg, code, console)


@pytest.mark.extended
def test_exhausted_failures_end_with_one_line_saying_how_to_resume(ray_cluster, tiny_config, tmp_path):
    cfg = tiny_config("no-retries", **{**FAST, "policy.max_failures": 0})
    code, console = run_killing(cfg, tmp_path, ray_cluster, "worker", steps=5)
    assert code == 1, console[-6000:]
    [line] = [line for line in console.splitlines() if line.startswith("[ray_dpo] run failed:")]
    for part in ("policy worker rank", "on node", "failed after step", "the process died",
                 "policy.max_failures=0", "resumes from the checkpoint at step 4", "ray-dpo train "):
        assert part in line, line
    assert "Traceback" not in console, console[-6000:]
    assert chaos.mlflow_run(cfg.run.storage_path, cfg.run_dir)[1].info.status == "FAILED"


@pytest.mark.extended
def test_a_reference_lost_for_good_ends_the_run_at_once(ray_cluster, tiny_config, tmp_path):
    """reference.max_restarts=0: the killed reference actor never comes back, so restarting
    the policy workers (policy.max_failures=2) could only fail again. The run ends at the
    first failure it causes (later than the kill: the feeder scores steps ahead) with one
    line that names the lost actor."""
    from ray_dpo import compat

    def train_workers_ever():
        return sum(a["ActorClassName"].endswith("RayTrainWorker") for a in compat.actor_table().values())

    cfg = tiny_config("reference-lost", **{**FAST, "reference.max_restarts": 0, "policy.max_failures": 2})
    before = train_workers_ever()
    code, console = run_killing(cfg, tmp_path, ray_cluster, "reference", steps=5)
    assert train_workers_ever() - before == cfg.policy.num_workers, "the worker group was started again"
    assert code == 1, console[-6000:]
    [line] = [line for line in console.splitlines() if line.startswith("[ray_dpo] run failed:")]
    for part in ("ReferenceActorLostError", "reference actor", "not restarted",
                 "resumes from the checkpoint at step", "ray-dpo train "):
        assert part in line, line
    assert "Traceback" not in console, console[-6000:]
    run = chaos.mlflow_run(cfg.run.storage_path, cfg.run_dir)[1]
    assert run.info.status == "FAILED"
    assert run.data.metrics.get("faults/worker_restarts", 0) == 0


@pytest.mark.extended
def test_seeded_chaos_two_random_kills_in_one_run(ray_cluster, tiny_config, tmp_path):
    """A random role at a random step, twice in one run (seeded; more runs:
    benchmarks/chaos.py)."""
    rng = random.Random(11)
    cfg = tiny_config("chaos", **FAST)
    proc, out = start(cfg, tmp_path, ray_cluster)
    first, second = sorted(rng.sample(range(2, STEPS - 2), 2))
    roles = [rng.choice(["worker", "feeder", "reference"]) for _ in range(2)]
    for at, role in zip((first, second + 1), roles):
        kill(proc, cfg, role, steps=at)
    code, console = chaos.finish(proc, out)
    _, run = assert_complete(cfg, code, console)
    for role in ("worker", "feeder", "reference"):
        assert run.data.metrics[f"faults/{role}_restarts"] == roles.count(role), (role, roles)


@pytest.mark.extended
def test_sigterm_checkpoints_before_the_worker_exits(ray_cluster, tiny_config, tmp_path):
    """What Kubernetes sends before evicting a pod: the step finishes, the group saves a
    checkpoint there, the worker exits, the restarted group runs no step twice. No regular
    checkpoint before the last step, so any other one is the SIGTERM's."""
    cfg = tiny_config("sigterm", **{**FAST, "policy.sigterm_grace_s": 25, "policy.checkpoint_every_steps": 0,
                                    "policy.num_checkpoints_to_keep": 3})
    proc, out = start(cfg, tmp_path, ray_cluster)
    pid = chaos.kill_when(proc, cfg.run_dir, steps=5, sig=signal.SIGTERM,
                          pid_of=lambda: chaos.role_pid("worker", proc, pick=1))
    assert pid is not None
    code, console = chaos.finish(proc, out)
    client, run = assert_complete(cfg, code, console)
    assert run.data.metrics["faults/worker_restarts"] == 1
    assert not client.get_metric_history(run.info.run_id, "faults/rolled_back_steps"), console[-4000:]
    steps = {int(name.split("_")[1]) for name in os.listdir(cfg.run_dir) if name.startswith("checkpoint_0")}
    [saved] = steps - {STEPS}
    assert saved >= 5 and f"resumed at step {saved}" in console, (sorted(steps), console[-4000:])
