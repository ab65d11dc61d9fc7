"""ray_dpo.tracking: what reaches MLflow (metrics.loggable), the MLflow run the driver keeps
(mlflow_sink) and the Ray Train callback (callback), against a real MLflow SQLite store.

The callback runs in this process, without a Ray cluster: its hooks are plain methods, and
with no actors to watch it never reads Ray's actor table.
"""

from __future__ import annotations

import json
import pickle
import time

import pytest

from ray_dpo import faults
from ray_dpo.config import MLflowConfig
from ray_dpo.tracking.metrics import loggable
from ray_dpo.tracking.mlflow_sink import MLflowRun, default_tracking_uri, log_metrics, resolve_tracking_uri


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating its schema takes seconds); tests keep apart
    by experiment name."""
    root = tmp_path_factory.mktemp("mlflow")
    return {"uri": default_tracking_uri(str(root)), "root": root}


def open_run(store, experiment, **kw) -> MLflowRun:
    return MLflowRun.open(uri=store["uri"], experiment=experiment, run_name="r",
                          artifact_root=str(store["root"] / "artifacts"), **kw)


def history(run: MLflowRun, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in run.client.get_metric_history(run.run_id, key))


# --------------------------------------------------------------------------- metrics


def test_loggable_keeps_finite_scalars_under_the_logged_prefixes():
    report = {"train/loss": 0.5, "eval/acc": 1, "perf/mfu": float("nan"), "data/pairs": 12.0,
              "sync/seconds": float("inf"), "online/samples": 3, "step": 4, "epoch": 1.0,
              "pair_ids": ["a:1"], "train/flag": True, "train/name": "x", "train/list": [1.0]}
    out = loggable(report)
    assert out == {"train/loss": 0.5, "eval/acc": 1.0, "data/pairs": 12.0, "online/samples": 3.0}
    assert all(type(v) is float for v in out.values())


# --------------------------------------------------------------------------- mlflow_sink


def test_tracking_uri_config_then_environment_then_sqlite_under_storage(tmp_path, monkeypatch):
    default = default_tracking_uri(str(tmp_path / "runs"))
    assert default == "sqlite:///" + str(tmp_path / "runs" / "mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(MLflowConfig(), str(tmp_path / "runs")) == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(MLflowConfig(), str(tmp_path / "runs")) == "http://mlflow:5000"
    assert resolve_tracking_uri(MLflowConfig(tracking_uri="sqlite:///x.db"), "ignored") == "sqlite:///x.db"


def test_open_creates_the_run_with_artifacts_next_to_the_store_and_reopens_it(store, tmp_path, capsys):
    id_file = str(tmp_path / "run" / "mlflow_run_id")
    run = open_run(store, "open", id_file=id_file)
    assert not run.resumed and open(id_file).read() == run.run_id
    experiment = run.client.get_experiment_by_name("open")
    assert experiment.artifact_location == "file://" + str(store["root"] / "artifacts")
    run.finish()
    assert run.client.get_run(run.run_id).info.status == "FINISHED"

    again = open_run(store, "open", id_file=id_file)  # a resumed run: the same MLflow run
    assert again.resumed and again.run_id == run.run_id
    assert again.client.get_run(run.run_id).info.status == "RUNNING"

    with open(id_file, "w") as f:
        f.write("no-such-run")
    fresh = open_run(store, "open", id_file=id_file)  # an id the store does not know: a new run
    assert not fresh.resumed and fresh.run_id not in (run.run_id, "no-such-run")
    assert open(id_file).read() == fresh.run_id
    assert "cannot reopen MLflow run no-such-run" in capsys.readouterr().out
    fresh.finish("FAILED")
    assert fresh.client.get_run(fresh.run_id).info.status == "FAILED"


def test_params_are_batched_truncated_and_changes_on_resume_go_to_a_tag(store, tmp_path):
    id_file = str(tmp_path / "id")
    run = open_run(store, "params", id_file=id_file)
    params = {f"p{i:03d}": i for i in range(150)}  # more than one batch of 100
    run.log_params({**params, "long": "x" * 7000})
    logged = run.client.get_run(run.run_id).data.params
    assert len(logged) == 151 and logged["p149"] == "149" and logged["long"] == "x" * 6000

    resumed = open_run(store, "params", id_file=id_file)
    resumed.log_params({"p000": 0, "p001": 99, "new": "n"})  # p001 changed: MLflow forbids that
    data = resumed.client.get_run(run.run_id).data
    assert data.params["p001"] == "1" and data.params["new"] == "n"
    assert json.loads(data.tags["ray_dpo.resume_changes"]) == {"p001": "99"}


def test_metrics_are_batched_and_first_and_last_takes_a_rerun_steps_last_value(store):
    run = open_run(store, "metrics")
    log_metrics(run.client, run.run_id, {f"train/m{i}": float(i) for i in range(1200)}, step=1)
    assert len(run.client.get_run(run.run_id).data.metrics) == 1200  # more than one batch of 1000
    for step, value in ((1, 0.9), (2, 0.8), (3, 0.7)):
        run.log_metrics({"train/loss": value}, step)
    time.sleep(0.01)  # a later timestamp: the re-run of step 3 after a rollback
    run.log_metrics({"train/loss": 0.5}, 3)
    assert run.first_and_last("train/loss") == ((1, 0.9), (3, 0.5))
    assert run.first_and_last("never/logged") is None


def test_tags_json_and_text_artifacts(store):
    run = open_run(store, "artifacts")
    run.set_tags({"ray_dpo.hf_model": "/x/hf_model", "n": 3})
    run.log_json({"b": 1, "a": [1, 2]}, "report/data.json")
    run.log_text("hello\n", "notes.txt")
    assert run.client.get_run(run.run_id).data.tags["n"] == "3"
    local = run.client.download_artifacts(run.run_id, "report/data.json", dst_path=str(store["root"] / "dl"))
    assert json.loads(open(local).read()) == {"a": [1, 2], "b": 1}
    assert sorted(a.path for a in run.client.list_artifacts(run.run_id)) == ["notes.txt", "report"]


# --------------------------------------------------------------------------- callback


def make_callback(store, experiment, tmp_path, **kw):
    from ray_dpo.tracking.callback import TrackingCallback

    run = open_run(store, experiment)
    callback = TrackingCallback(tracking_uri=store["uri"], run_id=run.run_id, total_steps=4,
                                ledger_path=str(tmp_path / "run" / "ledger.jsonl"), **kw)
    return run, callback


def report(step, *, attempt="a", loss=None, pair_ids=(("p1", "p2"), ("p3",)), **extra):
    """One ray.train.report of two ranks (rank 0's metrics are the all-reduced ones)."""
    loss = 1.0 / step if loss is None else loss
    common = {"step": step, "attempt": attempt, "resumed_from": 0, "train/loss": loss, **extra}
    return [{**common, "node": f"10.0.0.{rank}", "pair_ids": list(ids)} for rank, ids in enumerate(pair_ids)]


def ledger(tmp_path) -> list[dict]:
    with open(tmp_path / "run" / "ledger.jsonl") as f:
        return [json.loads(line) for line in f]


def test_callback_logs_every_nth_step_eval_always_and_writes_the_ledger(store, tmp_path, capsys):
    run, callback = make_callback(store, "callback", tmp_path, log_every=2)
    callback.after_report(None, [{"no_step": 1}], None)  # not a step report: ignored
    for step in (1, 2, 3, 4):
        extra = {"eval/rewards/accuracies": 0.75} if step == 3 else {}
        callback.after_report(None, report(step, **{"train/rewards/accuracies": 0.5, **extra}), None)
    assert history(run, "train/loss") == [(2, 0.5), (4, 0.25)]  # every 2nd step, and the last
    assert history(run, "eval/rewards/accuracies") == [(3, 0.75)]  # eval: whatever the step
    assert history(run, "faults/worker_restarts") == [(1, 0.0)]  # logged once, then on change
    assert [(e["step"], e["pair_ids"]) for e in ledger(tmp_path)] == [(s, ["p1", "p2", "p3"]) for s in (1, 2, 3, 4)]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[ray_dpo] step")]
    assert len(lines) == 4 and lines[0].startswith("[ray_dpo] step 1/4 (25%) | loss 1.0000 | acc 0.50")
    assert "ETA ?" in lines[0] and "eval acc 0.75" in lines[2] and "ETA" not in lines[3]


def test_callback_logs_the_start_up_seconds_at_the_first_step_of_the_invocation(store, tmp_path, capsys):
    import time

    run, callback = make_callback(store, "startup", tmp_path, started_at=time.time() - 60)
    for step in (1, 2):  # step 1 computed for 10 of those 60 s: start-up is the 50 before it
        callback.after_report(None, report(step, **{"perf/step_time_s": 10.0}), None)
    [(step, seconds)] = history(run, "perf/startup_s")
    assert step == 1 and 50 <= seconds < 60
    out = capsys.readouterr().out
    assert "[ray_dpo] step 1 began after 50s of start-up" in out or "step 1 began after 51s" in out, out


def test_callback_counts_a_restart_and_rolls_the_ledger_back(store, tmp_path, capsys):
    run, callback = make_callback(store, "restart", tmp_path, max_failures=2, progress=False)
    for step in (1, 2, 3):
        callback.after_report(None, report(step, attempt="first"), None)
    # The worker group restarted from the checkpoint at step 1: steps 2-3 run again.
    callback.after_report(None, report(2, attempt="second", pair_ids=(("q1",), ("q2",))), None)
    out = capsys.readouterr().out
    assert "policy workers restarted (1 of policy.max_failures=2); resumed at step 1" in out
    assert "back to the checkpoint at step 1: steps 2-3 run again" in out
    assert history(run, "faults/worker_restarts") == [(1, 0.0), (2, 1.0)]
    assert history(run, "faults/rolled_back_steps") == [(1, 2.0)]
    assert [(e["step"], e["pair_ids"]) for e in ledger(tmp_path)] == [(1, ["p1", "p2", "p3"]), (2, ["q1", "q2"])]
    with open(tmp_path / "run" / "ledger.rolled_back.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [2, 3]


def test_callback_says_an_elastic_group_shrank_after_a_failure_and_grew_back_without_one(store, tmp_path, capsys):
    run, callback = make_callback(store, "elastic", tmp_path, max_failures=3, progress=False, num_workers=2)
    callback.after_report(None, report(1, attempt="two"), "a checkpoint")
    callback.after_report(None, report(2, attempt="two"), None)
    callback.after_exception(None, {1: RuntimeError("its node was lost")})
    callback.after_report(None, report(2, attempt="one", pair_ids=(("p1", "p2", "p3"),)), "a checkpoint")
    callback.after_report(None, report(3, attempt="grown"), None)  # Ray Train's resize: no failure
    out = capsys.readouterr().out
    assert "policy workers restarted (1 of policy.max_failures=3) with 1 of 2 workers; resumed at step 1" in out
    assert "each step keeps its pairs" in out
    assert "policy group resized from 1 to 2 of 2 workers (nodes came back); resumed at step 2" in out
    assert history(run, "faults/worker_restarts")[-1][1] == 1.0  # the resize is not a failure


def test_callback_records_the_failed_rank_and_survives_pickling(store, tmp_path, capsys):
    run, callback = make_callback(store, "failure", tmp_path)
    callback.after_report(None, report(1), "a checkpoint")
    callback.after_report(None, report(2), None)
    callback.after_exception(None, {1: RuntimeError("CUDA error: out of memory"), 0: RuntimeError("peer gone")})
    failure = faults.Failure.from_json(run.client.get_run(run.run_id).data.tags["ray_dpo.last_failure"])
    assert failure == faults.Failure(rank=0, node="10.0.0.0", step=2, reason="RuntimeError: peer gone",
                                     checkpoint_step=1)
    assert "policy worker rank 0 on node 10.0.0.0 failed after step 2" in capsys.readouterr().out

    shipped = pickle.loads(pickle.dumps(callback))  # Ray ships the callback to the controller
    assert shipped._client is None and shipped.run_id == run.run_id
    shipped.after_report(None, report(3, loss=0.125), None)
    assert history(run, "train/loss")[-1] == (3, 0.125)
