"""``ray-dpo sweep`` on the tiny model: Ray Tune trials that share one reference pass, stop
a bad trial early and resume after the sweep's driver is killed.

One sweep of four trials over policy.learning_rate (the last one, 1e-9, learns nothing on
purpose), run as a subprocess joining this module's cluster; SIGKILLed once its first trial
has finished, then run again with the same command.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from ray_dpo.testing import chaos

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RATES = [1.0e-3, 2.0e-3, 3.0e-3, 1.0e-9]
STEPS = 20  # the stop must land before the bad trial's last step, also on a loaded machine


def _start(cfg, tmp_path, ray, attempt):
    from ray_dpo.config import to_yaml

    path = tmp_path / "sweep.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    return chaos.start_cli(str(path), str(tmp_path / f"sweep-{attempt}.log"),
                           ray.get_runtime_context().gcs_address, command="sweep")


def _run(client, trial):
    from ray_dpo.driver import run_id_file
    from ray_dpo.tracking.mlflow_sink import read_text

    run_id = read_text(run_id_file(trial.config))
    return client.get_run(run_id) if run_id else None


def test_a_sweep_shares_one_reference_pass_stops_a_bad_trial_and_resumes_after_a_driver_kill(
        ray_cluster, tiny_config, tmp_path):
    from ray_dpo.driver import REFERENCE_CACHE_TAG
    from ray_dpo.sweep.runner import OVERRIDES_TAG, PARENT_ID_TAG, STATUS_TAG
    from ray_dpo.sweep.trials import expand
    from ray_dpo.tracking.mlflow_sink import default_tracking_uri, mlflow_client

    cfg = tiny_config("sw", **{
        "policy.num_workers": 1, "policy.max_steps": STEPS, "policy.checkpoint_every_steps": 2,
        "eval.every_steps": 2, "tracking.progress": False,
        "sweep.grid": json.dumps({"policy.learning_rate": RATES}),
        "sweep.scheduler": "median", "sweep.metric": "eval/rewards/accuracies", "sweep.grace_period": 2})
    trials = expand(cfg)
    assert [t.overrides["policy.learning_rate"] for t in trials] == RATES
    client = mlflow_client(default_tracking_uri(cfg.run.storage_path))

    # First invocation: killed once the first trial's run has finished.
    proc, out = _start(cfg, tmp_path, ray_cluster, 0)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        run = _run(client, trials[0])
        if run is not None and run.info.status == "FINISHED":
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.5)
    code, first = chaos.finish(proc, out)
    assert code == -signal.SIGKILL, f"the sweep ended (exit {code}) before it was killed:\n{first[-6000:]}"
    finished_first = _run(client, trials[0])

    # Second invocation: the same command finishes the rest.
    proc, out = _start(cfg, tmp_path, ray_cluster, 1)
    code, second = chaos.finish(proc, out)
    assert code == 0, second[-6000:]
    assert "1 already done by an earlier run of this sweep" in second, second[-4000:]
    assert f"trial {trials[0].label}" not in second.split("already done")[1], "the finished trial ran again"

    runs = [_run(client, t) for t in trials]
    # The finished trial was not touched by the rerun.
    assert runs[0].info.run_id == finished_first.info.run_id
    assert runs[0].info.end_time == finished_first.info.end_time
    # Each trial is a child run of the sweep's parent, with its overrides as params and a tag.
    parents = {r.data.tags[PARENT_ID_TAG] for r in runs}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.info.status == "FINISHED" and parent.data.tags["ray_dpo.sweep.parent"] == "1"
    for trial, run in zip(trials, runs):
        assert json.loads(run.data.tags[OVERRIDES_TAG]) == trial.overrides
        assert float(run.data.params["policy.learning_rate"]) == trial.overrides["policy.learning_rate"]
    # One reference pass for the whole sweep: computed by the first invocation before any
    # trial, read by every trial.
    assert (first + second).count("sweep: reference pass computed") == 1, first + second
    assert all(r.data.tags[REFERENCE_CACHE_TAG].startswith("hit ") for r in runs)
    assert len(os.listdir(os.path.join(cfg.run.storage_path, "reference_cache"))) == 1
    assert parent.data.tags["ray_dpo.sweep.reference"].endswith("shared by 3 offline trial(s)")  # the rerun's
    # The good trials finished; the one that learns nothing was stopped early, not failed.
    for run in runs[:3]:
        assert run.info.status == "FINISHED", run.data.tags
        assert run.data.metrics["eval/rewards/accuracies"] > 0.6
    bad = runs[3]
    assert bad.data.tags[STATUS_TAG] == "stopped" and bad.info.status == "KILLED"
    assert max(m.step for m in client.get_metric_history(bad.info.run_id, "train/loss")) < STEPS
    assert "ray_dpo.hf_model" not in bad.data.tags  # it never got to its export
    assert parent.data.metrics["sweep/stopped"] == 1 and parent.data.metrics["sweep/failed"] == 0
    assert f"trial {trials[3].label} stopped early by the scheduler at step" in second, second[-3000:]
