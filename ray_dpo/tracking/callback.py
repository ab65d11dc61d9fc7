"""The Ray Train callback that turns worker reports into MLflow metrics, progress and a ledger.

Ray Train 2.60 runs ``UserCallback`` hooks in the train controller, which it places on the
driver's node, so the MLflow store the driver opened is reachable here too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from ray.train import UserCallback

from ray_dpo.tracking.metrics import StepClock, loggable, progress_line
from ray_dpo.tracking.mlflow_sink import _client, log_metrics


class TrackingCallback(UserCallback):
    """Logs rank 0's (already all-reduced) metrics, prints progress, records trained pairs.

    Args:
        tracking_uri, run_id: the MLflow run the driver created.
        total_steps: optimizer steps of the whole run, for progress and ETA.
        log_every: log train metrics every N steps (eval metrics are always logged).
        ledger_path: local JSONL file that receives ``{"step", "pair_ids"}`` per step, or None.
            The ledger is how tests (and users) check that every pair was trained exactly once.
        progress: print a progress line to stdout.
    """

    def __init__(self, *, tracking_uri: str, run_id: str, total_steps: int, log_every: int = 1,
                 ledger_path: str | None = None, progress: bool = True):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.total_steps = total_steps
        self.log_every = log_every
        self.ledger_path = ledger_path
        self.progress = progress
        self._client = None
        self._clock = StepClock()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_client"] = None  # MlflowClient holds a DB engine; rebuild it where we run
        return state

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not metrics or "step" not in metrics[0]:
            return
        step = int(metrics[0]["step"])
        # Every step's report moves the clock, printed or not, so eval and checkpoint time
        # between reports is spread over the steps.
        eta_s = self._clock.eta_s(step=step, total=self.total_steps, now=time.monotonic())
        values = loggable(metrics[0])
        if step % self.log_every != 0 and step != self.total_steps:
            values = {k: v for k, v in values.items() if k.startswith("eval/")}
        if values:
            if self._client is None:
                self._client = _client(self.tracking_uri)
            log_metrics(self._client, self.run_id, values, step)
        self._write_ledger(step, metrics)
        if self.progress and "train/loss" in metrics[0]:
            line = progress_line(step=step, total=self.total_steps, metrics=loggable(metrics[0]), eta_s=eta_s)
            print(f"[ray_dpo] {line}", file=sys.stdout, flush=True)

    def _write_ledger(self, step: int, metrics: list[dict[str, Any]]) -> None:
        if not self.ledger_path:
            return
        ids = [pid for m in metrics for pid in m.get("pair_ids", ())]
        if not ids:
            return
        os.makedirs(os.path.dirname(self.ledger_path), exist_ok=True)
        with open(self.ledger_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "pair_ids": ids}) + "\n")
