"""The Ray Train callback that turns worker reports into MLflow metrics, progress and a ledger.

Ray Train 2.60 runs ``UserCallback`` hooks in the train controller, which it places on the
driver's node, so the MLflow store the driver opened is reachable here too.

It also keeps the books of failures (ray_dpo/faults.py): a report from a new worker-group
attempt is a restart (``faults/worker_restarts``); a report at or below the last step seen
is a rollback to a checkpoint, so the ledger drops the steps that run again and
``faults/rolled_back_steps`` marks it in MLflow; restarts Ray made of the feeder and the
reference actors are read from Ray's actor table (``faults/<role>_restarts``). A failed
rank is recorded in the MLflow tag ``ray_dpo.last_failure`` for the driver's final message.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

from ray.train import UserCallback

from ray_dpo import compat, faults
from ray_dpo.tracking.metrics import StepClock, loggable, progress_line
from ray_dpo.tracking.mlflow_sink import log_metrics, mlflow_client

FAILURE_TAG = "ray_dpo.last_failure"
_POLL_EVERY_S = 2.0
# Ray Train's controller-side hooks: internal API, which a run_config callback that is not
# a UserCallback may implement.
WorkerGroupCallback, ControllerCallback = compat.train_callback_bases()


class TrackingCallback(UserCallback):
    """Logs rank 0's (already all-reduced) metrics, prints progress, records trained pairs.

    Args:
        tracking_uri, run_id: the MLflow run the driver created.
        total_steps: optimizer steps of the whole run, for progress and ETA.
        log_every: log train metrics every N steps (eval metrics are always logged).
        ledger_path: local JSONL file that receives ``{"step", "pair_ids"}`` per step, or None.
            The ledger is how tests (and users) check that every pair was trained exactly once:
            it holds the run's current history (a step run again replaces its first run).
        progress: print a progress line to stdout.
        max_failures: policy.max_failures, for the console lines about restarts.
        watch: {role: [actor id hex]} whose Ray restarts are logged as faults/<role>_restarts.
        started_at: when the command started (time.time()): its first step logs the seconds
            from then to that step's start as perf/startup_s (data, reference pass, actors,
            model load; its report time minus its perf/step_time_s), and says them.
        num_workers: policy.num_workers; an elastic group's restart on fewer, and its resize
            back when nodes return (a new attempt without a failure), are said as such.
        eval_every: eval.every_steps, for an ETA that counts the eval pauses ahead (StepClock).
    """

    def __init__(self, *, tracking_uri: str, run_id: str, total_steps: int, log_every: int = 1,
                 ledger_path: str | None = None, progress: bool = True, max_failures: int = 0,
                 watch: dict[str, list[str]] | None = None, started_at: float | None = None,
                 num_workers: int = 0, eval_every: int = 0):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.total_steps = total_steps
        self.log_every = log_every
        self.ledger_path = ledger_path
        self.progress = progress
        self.max_failures = max_failures
        self.watch = watch or {}
        self.started_at = started_at
        self.num_workers = num_workers
        self._workers: int | None = None  # the current group's size
        self._failed = False  # a rank failed since the current attempt began
        self._client = None
        self._clock = StepClock(eval_every)
        self._attempt: str | None = None
        self._last_step: int | None = None
        self._counts: dict[str, float] = {}  # faults/*_restarts of this invocation
        self._logged: dict[str, float] | None = None  # what was logged last
        self._base: dict[str, float] | None = None  # faults/* of earlier invocations (resume)
        self._nodes: dict[int, str] = {}
        self._checkpoint_step: int | None = None  # the resume point if the run failed now
        self._last_poll = 0.0

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = None  # MlflowClient holds a DB engine; rebuild it where we run
        return state

    def _mlflow(self):
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri)
        return self._client

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics or "step" not in metrics[0]:
            return
        step = int(metrics[0]["step"])
        self._nodes.update({r: m["node"] for r, m in enumerate(metrics) if "node" in m})
        self._track_attempt(step, metrics[0].get("attempt"), len(metrics))
        if checkpoint is not None:
            self._checkpoint_step = step
        elif self._checkpoint_step is None and metrics[0].get("resumed_from"):
            self._checkpoint_step = int(metrics[0]["resumed_from"])
        # Every step's report moves the clock, printed or not, so eval and checkpoint time
        # between reports is spread over the steps.
        eta_s = self._clock.eta_s(step=step, total=self.total_steps, now=time.monotonic(),
                                  evaluated=any(k.startswith("eval/") for k in metrics[0]))
        values = loggable(metrics[0])
        if step % self.log_every != 0 and step != self.total_steps:
            values = {k: v for k, v in values.items() if k.startswith("eval/")}
        values.update(self._fault_counts(final=step >= self.total_steps))
        if self.started_at is not None:  # this invocation's first step
            # Until the step began: its own compute (perf/step_time_s) is training, not start-up.
            took = float(metrics[0].get("perf/step_time_s") or 0.0)
            values["perf/startup_s"] = startup = time.time() - self.started_at - took
            self.started_at = None
            print(f"[ray_dpo] step {step} began after {startup:.0f}s of start-up (data, reference, actors, "
                  "models)", file=sys.stdout, flush=True)
        if values:
            log_metrics(self._mlflow(), self.run_id, values, step)
        self._write_ledger(step, metrics)
        self._last_step = step
        if self.progress and "train/loss" in metrics[0]:
            line = progress_line(step=step, total=self.total_steps, metrics=loggable(metrics[0]), eta_s=eta_s)
            print(f"[ray_dpo] {line}", file=sys.stdout, flush=True)

    def after_exception(self, run_context, worker_exceptions: dict[int, BaseException]) -> None:
        """Record which rank failed, on which node, after which step (one MLflow tag; the
        driver turns it into the final line if the failures are exhausted)."""
        failure = faults.describe_worker_errors(worker_exceptions, self._nodes, self._last_step or 0,
                                                checkpoint_step=self._checkpoint_step)
        self._failed = True
        print(f"[ray_dpo] policy worker rank {failure.rank} on node {failure.node} failed after step "
              f"{failure.step}: {failure.reason}", file=sys.stdout, flush=True)
        try:
            self._mlflow().set_tag(self.run_id, FAILURE_TAG, failure.to_json())
        except Exception as e:  # noqa: BLE001 - the failure itself matters more than its record
            print(f"[ray_dpo] could not record the failure in MLflow: {e}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ faults

    def _track_attempt(self, step: int, attempt: str | None, workers: int) -> None:
        """A new attempt id after one was seen: Ray Train restarted the worker group, after
        a failure, or (an elastic group) to resize it. A step at or below the last one seen
        (or in the ledger, for a driver that was started again): the run went back to a
        checkpoint."""
        if self._base is None:
            self._base = self._previous_counts()
            self._last_step = faults.last_ledger_step(self.ledger_path) or None
        restarted = attempt is not None and self._attempt is not None and attempt != self._attempt
        self._attempt = attempt or self._attempt
        size = f" with {workers} of {self.num_workers} workers" if workers < self.num_workers else ""
        if restarted and not self._failed and workers != self._workers:
            print(f"[ray_dpo] policy group resized from {self._workers} to {workers} of {self.num_workers} workers "
                  f"({'nodes came back' if workers > (self._workers or 0) else 'fewer fit'}); resumed at step "
                  f"{step - 1}", flush=True)
        elif restarted:
            self._counts["faults/worker_restarts"] = self._counts.get("faults/worker_restarts", 0) + 1
            print(f"[ray_dpo] policy workers restarted ({int(self._counts['faults/worker_restarts'])} of "
                  f"policy.max_failures={self.max_failures}){size}; resumed at step {step - 1}", flush=True)
        if restarted and size:
            print("[ray_dpo] each step keeps its pairs: fewer workers accumulate more micro-batches "
                  "(policy.min_workers)", flush=True)
        self._workers, self._failed = workers, self._failed and not restarted
        if self._last_step is not None and step <= self._last_step:
            again = self._last_step - step + 1
            if self.ledger_path:
                faults.rollback_ledger(self.ledger_path, step)
            log_metrics(self._mlflow(), self.run_id, {"faults/rolled_back_steps": again}, step - 1)
            print(f"[ray_dpo] back to the checkpoint at step {step - 1}: steps {step}-{self._last_step} "
                  "run again (MLflow keeps both points of those steps; the later one is the re-run)",
                  flush=True)

    def _previous_counts(self) -> dict[str, float]:
        """faults/* an earlier invocation of this run logged (0 for a new run)."""
        try:
            logged = self._mlflow().get_run(self.run_id).data.metrics
        except Exception:  # noqa: BLE001
            return {}
        return {k: v for k, v in logged.items() if k.startswith("faults/") and k.endswith("_restarts")}

    def _fault_counts(self, *, final: bool = False) -> dict[str, float]:
        """faults/*_restarts to log now: all of them on the first report, then the ones that
        changed (Ray's actor table is read at most every _POLL_EVERY_S seconds, and at the
        last step)."""
        now = time.monotonic()
        if final or now - self._last_poll >= _POLL_EVERY_S:
            self._last_poll = now
            for role, n in faults.gcs_restart_counts(self.watch).items():
                self._counts[f"faults/{role}_restarts"] = n
        current = {"faults/worker_restarts": 0, **{f"faults/{r}_restarts": 0 for r in self.watch},
                   **self._counts}
        changed = current if self._logged is None else \
            {k: v for k, v in current.items() if self._logged.get(k) != v}
        self._logged = current
        base = self._base or {}
        return {k: base.get(k, 0) + v for k, v in changed.items()}

    def _write_ledger(self, step: int, metrics: list[dict[str, Any]]) -> None:
        if not self.ledger_path:
            return
        ids = [pid for m in metrics for pid in m.get("pair_ids", ())]
        if not ids:
            return
        os.makedirs(os.path.dirname(self.ledger_path), exist_ok=True)
        with open(self.ledger_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "pair_ids": ids}) + "\n")



class FailFastOnLostRoles(WorkerGroupCallback, ControllerCallback):
    """Ends the run at once, instead of restarting the policy workers, when a rank failed
    because a role outside the worker group is gone for good (faults.LOST_FOR_GOOD: a
    generation engine or reference actor whose Ray restarts are spent). Every worker
    restart would meet the same dead role; the user gets the one failure line sooner."""

    def __init__(self) -> None:
        self.lost: str | None = None

    def after_worker_group_poll_status(self, worker_group_status) -> None:
        errors = list((getattr(worker_group_status, "errors", None) or {}).values())
        lost = [err for err in errors if faults.is_lost_for_good(err)]
        if lost:
            self.lost = faults.first_line(lost[0])

    def before_controller_execute_failure_decision(self, failure_decision) -> None:
        if self.lost is not None and getattr(failure_decision, "name", "") == "RETRY":
            raise faults.RunFailedError(f"not restarting the policy workers: {self.lost}")


class WaitForWorkerCapacity(ControllerCallback):
    """Bounds the wait for room for the policy workers, after their node was lost
    (ray_dpo/capacity.py). Before each worker-group start, if no live nodes can hold the
    group's workers of ``request``: the wait's line, once, and the start attempt
    (whose pending placement group is what asks an autoscaler for a node) may take what is
    left of ``limit_s`` (compat.limit_worker_group_start); once that is over, the failure
    record gets the reason and the run ends (CapacityLostError, which Ray Train does not
    retry).

    An elastic group (``min_workers``) starts with as many workers as fit, so the wait is
    for room for min_workers; Ray Train does not attempt a start while fewer fit, and the
    same check then runs on each of its sizing decisions instead (compat.sizing_worker_group).
    Ray sizes an elastic group from its AutoscalingCoordinator's view of the nodes, which
    this keeps fresh (compat.refresh_cluster_view): at each restart, so a lost node is not
    counted, and every ``resize_check_s`` while the group runs, so a returned node is seen
    at the group's next resize check rather than up to 20 s later.
    """

    # Ray Train 2.60 repeats an elastic group's sizing decision without pausing while too
    # few workers fit; the check pauses this long so that the wait does not spin a core.
    SIZING_PAUSE_S = 1.0
    # How long an elastic group's start attempt at a size the live nodes cannot hold waits.
    STALE_START_S = 5.0

    def __init__(self, *, request: dict, limit_s: float, tracking_uri: str, run_id: str,
                 min_workers: Optional[int] = None, resize_check_s: float = 60.0):
        self.request, self.limit_s = dict(request), limit_s
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.min_workers, self.resize_check_s = min_workers, resize_check_s
        self._wait = None
        self._refreshed = time.monotonic()

    def on_controller_start_worker_group(self, *, scaling_config, num_workers: int):
        from ray_dpo.capacity import live_nodes, room

        left = self._check(self.min_workers or num_workers)
        if left is None and self.min_workers and room(self.request, live_nodes()) < num_workers:
            # Ray sized this group from a view that still counts a node lost since (it
            # reads Ray's node table every 20 s; a worker on it may fail before Ray declares
            # the node dead): this attempt cannot be placed, so it gives up soon and Ray
            # sizes the group again, from the view refreshed here.
            self._refresh()
            left = self.STALE_START_S
        compat.limit_worker_group_start(left)
        return None

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if self.min_workers is None:
            return
        if not compat.sizing_worker_group(current_state):
            if time.monotonic() - self._refreshed >= self.resize_check_s:
                self._refresh()
        elif previous_state is not current_state:
            self._refresh()  # a restart, perhaps after a node loss
        elif self._check(self.min_workers) is not None:  # still too few fit
            time.sleep(self.SIZING_PAUSE_S)

    def _refresh(self) -> None:
        compat.refresh_cluster_view()
        self._refreshed = time.monotonic()

    def _check(self, count: int) -> Optional[float]:
        """CapacityWait.check for ``count`` workers (None: room), recording a give-up."""
        from ray_dpo.capacity import CapacityLostError, CapacityWait, dead_node_ids

        if self._wait is None:  # the first start: nodes dead now were not this run's
            self._wait = CapacityWait("", self.request, count=count, limit_s=self.limit_s, before=dead_node_ids())
        self._wait.count = count
        self._wait.role = f"{count} policy worker{'s' if count > 1 else ''}"
        try:
            return self._wait.check()
        except CapacityLostError as err:
            self._record(str(err))
            raise

    def _record(self, reason: str) -> None:
        """Add ``reason`` to the failure the TrackingCallback recorded (the driver's last line)."""
        try:
            client = mlflow_client(self.tracking_uri)
            failure = faults.Failure.from_json(client.get_run(self.run_id).data.tags.get(FAILURE_TAG)) or \
                faults.Failure(rank=0, node="(unknown)", step=0, reason="its node was lost")
            failure.capacity = reason
            client.set_tag(self.run_id, FAILURE_TAG, failure.to_json())
        except Exception as e:  # noqa: BLE001 - the run ends anyway; the line is then less precise
            print(f"[ray_dpo] could not record the failure in MLflow: {e}", file=sys.stderr, flush=True)
