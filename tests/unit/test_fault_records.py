"""ray_dpo.faults: complete checkpoints, ledger rollback, the failure line (no Ray)."""

import json
import os

import pytest
from pyarrow import fs as pafs

from ray_dpo import faults


def make_checkpoint(run_dir, step, *, world_size=2, suffix=""):
    """A checkpoint directory as Ray merges it: each rank's files plus its manifest."""
    path = run_dir / f"checkpoint_{step:06d}{suffix}"
    for rank in range(world_size):
        staging = run_dir / f"staging-{step}{suffix}-{rank}"
        (staging / "deepspeed").mkdir(parents=True)
        (staging / "deepspeed" / f"zero_pp_rank_{rank}_states.pt").write_bytes(b"x" * (100 + rank))
        faults.write_manifest(str(staging), rank=rank, world_size=world_size, step=step)
        for root, _, names in os.walk(staging):
            for name in names:
                src = os.path.join(root, name)
                dst = path / os.path.relpath(src, staging)
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(open(src, "rb").read())
    return path


LOCAL = pafs.LocalFileSystem()


def test_a_merged_checkpoint_is_complete(tmp_path):
    path = make_checkpoint(tmp_path, 4)
    assert faults.checkpoint_problem(LOCAL, str(path)) is None
    manifest = json.loads((path / "manifest" / "rank00001.json").read_text())
    assert manifest["files"] == {"deepspeed/zero_pp_rank_1_states.pt": 101}


def test_truncated_missing_or_unmanifested_files_make_it_incomplete(tmp_path):
    path = make_checkpoint(tmp_path, 4)
    shard = path / "deepspeed" / "zero_pp_rank_1_states.pt"
    shard.write_bytes(b"x" * 10)
    assert "has 10 bytes, rank 1 wrote 101" in faults.checkpoint_problem(LOCAL, str(path))
    shard.unlink()
    assert "is missing" in faults.checkpoint_problem(LOCAL, str(path))
    (path / "manifest" / "rank00000.json").unlink()
    assert "rank(s) [0]" in faults.checkpoint_problem(LOCAL, str(path))
    (path / "manifest" / "rank00001.json").unlink()
    assert "no manifest" in faults.checkpoint_problem(LOCAL, str(path))


def test_resume_falls_back_past_an_incomplete_latest_checkpoint(tmp_path):
    make_checkpoint(tmp_path, 4)
    make_checkpoint(tmp_path, 8)
    latest = make_checkpoint(tmp_path, 12)
    make_checkpoint(tmp_path, 16)  # written but never registered by Ray: not a candidate
    (latest / "deepspeed" / "zero_pp_rank_0_states.pt").write_bytes(b"")
    chosen, warnings = faults.pick_checkpoint(LOCAL, str(latest))
    assert chosen == str(tmp_path / "checkpoint_000008")
    assert len(warnings) == 1 and "checkpoint_000012 is incomplete" in warnings[0]


def test_no_complete_checkpoint_gives_none_and_every_reason(tmp_path):
    first = make_checkpoint(tmp_path, 4)
    latest = make_checkpoint(tmp_path, 8)
    for path in (first, latest):
        (path / "manifest" / "rank00000.json").unlink()
    chosen, warnings = faults.pick_checkpoint(LOCAL, str(latest))
    assert chosen is None and len(warnings) == 2


def test_a_rewritten_checkpoint_gets_a_fresh_name_and_sorts_after(tmp_path):
    assert faults.fresh_checkpoint_name(LOCAL, str(tmp_path), 8) == "checkpoint_000008"
    make_checkpoint(tmp_path, 8)
    assert faults.fresh_checkpoint_name(LOCAL, str(tmp_path), 8) == "checkpoint_000008_1"
    rewritten = make_checkpoint(tmp_path, 8, suffix="_1")
    assert faults.checkpoint_sort_key("checkpoint_000008_1") > faults.checkpoint_sort_key("checkpoint_000008")
    assert faults.pick_checkpoint(LOCAL, str(rewritten))[0] == str(rewritten)
    assert faults.step_of_checkpoint(str(rewritten)) == 8


def test_rollback_moves_the_steps_that_run_again_aside(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text("".join(json.dumps({"step": s, "pair_ids": [f"p{s}"]}) + "\n" for s in range(1, 7)))
    assert faults.last_ledger_step(str(ledger)) == 6
    assert faults.rollback_ledger(str(ledger), 5) == 2
    assert [json.loads(line)["step"] for line in ledger.read_text().splitlines()] == [1, 2, 3, 4]
    aside = (tmp_path / "ledger.rolled_back.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in aside] == [5, 6]
    assert faults.rollback_ledger(str(ledger), 5) == 0
    assert faults.last_ledger_step(str(tmp_path / "none.jsonl")) == 0


class ActorDiedError(Exception):
    """Stands in for ray.exceptions.ActorDiedError (matched by name)."""


class WorkerHealthCheckFailedError(Exception):
    def __init__(self, message, failure):
        super().__init__(message)
        self.health_check_failure = failure


def test_the_dead_rank_is_named_not_the_one_stuck_in_a_collective():
    errors = {0: RuntimeError("Traceback (most recent call last):\n  ...\nRuntimeError: Connection reset by peer"),
              1: WorkerHealthCheckFailedError("health check failed", ActorDiedError("The actor died"))}
    failure = faults.describe_worker_errors(errors, {0: "10.0.0.1", 1: "10.0.0.2"}, step=20, checkpoint_step=16)
    assert (failure.rank, failure.node, failure.step) == (1, "10.0.0.2", 20)
    assert "process died" in failure.reason
    assert faults.Failure.from_json(failure.to_json()) == failure

    only = faults.describe_worker_errors({0: errors[0]}, {}, step=3)
    assert only.reason == "RuntimeError: Connection reset by peer" and only.node.startswith("(unknown")


def test_the_failure_line_names_role_node_step_and_resume_point():
    failure = faults.Failure(rank=1, node="10.0.0.2", step=20, reason="the process died", checkpoint_step=16)
    line = faults.failure_line(failure, max_failures=3)
    assert "\n" not in line
    for part in ("policy worker rank 1", "10.0.0.2", "after step 20", "policy.max_failures=3",
                 "resumes from the checkpoint at step 16"):
        assert part in line
    line = faults.failure_line(None, max_failures=0, error=ValueError("x"))
    assert "ValueError: x" in line and "latest checkpoint" in line


class EngineLostError(RuntimeError):
    """Stands in for ray_dpo.engines.engine_restarts.EngineLostError as Ray wraps it."""


def test_a_role_lost_for_good_is_named_and_not_restarted_for():
    lost = EngineLostError("generation engine 0 died and Ray will not restart it: 3 restart(s) used")
    errors = {0: RuntimeError(f"Traceback ...\nray.exceptions.RayTaskError(EngineLostError): {lost}"),
              1: WorkerHealthCheckFailedError("health check failed", ActorDiedError("The actor died"))}
    failure = faults.describe_worker_errors(errors, {0: "10.0.0.1", 1: "10.0.0.2"}, step=9, checkpoint_step=8)
    assert (failure.rank, failure.lost_role) == (0, True)
    assert "EngineLostError" in failure.reason and "generation engine 0" in failure.reason
    assert faults.Failure.from_json(failure.to_json()) == failure
    line = faults.failure_line(failure, max_failures=3)
    assert "not restarted" in line and "policy.max_failures" not in line and "step 8" in line
    assert not faults.describe_worker_errors({1: errors[1]}, {}, step=9).lost_role


def test_fail_fast_turns_a_retry_into_a_raise_only_for_a_lost_role():
    from types import SimpleNamespace

    from ray.train.v2._internal.execution.failure_handling import FailureDecision

    from ray_dpo.tracking.callback import FailFastOnLostRoles

    guard = FailFastOnLostRoles()
    guard.after_worker_group_poll_status(SimpleNamespace(errors={0: RuntimeError("Connection reset")}))
    guard.before_controller_execute_failure_decision(FailureDecision.RETRY)  # an ordinary failure: retried
    guard.after_worker_group_poll_status(SimpleNamespace(errors={}))
    guard.after_worker_group_poll_status(
        SimpleNamespace(errors={1: EngineLostError("generation engine 0 did not come back within 600s")}))
    guard.before_controller_execute_failure_decision(FailureDecision.RAISE)  # already ending: nothing to add
    with pytest.raises(faults.RunFailedError, match="not restarting the policy workers: EngineLostError: "
                                                     "generation engine 0 did not come back"):
        guard.before_controller_execute_failure_decision(FailureDecision.RETRY)


@pytest.mark.parametrize("name,step", [("checkpoint_000016", 16), ("checkpoint_000016_2", 16), ("other", None)])
def test_checkpoint_names(name, step):
    assert faults.step_of_checkpoint(f"/runs/r/{name}") == step


def test_a_rerun_reopens_the_same_mlflow_run_from_the_id_file(tmp_path):
    """What makes a rerun (or a KubeRay retry) continue one MLflow run: the id kept next to
    the checkpoints (pyarrow filesystem: a local path here, an object-store URI on a cluster)."""
    from ray_dpo.tracking.mlflow_sink import MLflowRun

    uri, id_file = f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "runs" / "r" / "mlflow_run_id")
    first = MLflowRun.open(uri=uri, experiment="e", run_name="r", id_file=id_file)
    first.finish("FAILED")
    again = MLflowRun.open(uri=uri, experiment="e", run_name="r", id_file=id_file)
    assert again.run_id == first.run_id and again.resumed
    assert again.client.get_run(again.run_id).info.status == "RUNNING"
