"""MLflow from the driver's side.

Workers never talk to MLflow: they report through Ray Train, and the driver (plus the Ray
Train controller, which Ray places on the driver's node) writes here. So an embedded SQLite
store on the head node serves a whole multi-node cluster, and a remote tracking server
works the same way.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping

from ray_dpo.config import MLflowConfig
from ray_dpo.config.secrets import redact

# MLflow refuses batches above these sizes (mlflow/utils/validation.py).
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_LENGTH = 6000


def default_tracking_uri(storage_path: str) -> str:
    """An embedded SQLite store shared by every run under ``storage_path``.

    Shared (not one per run) so offline and online runs of one storage path can be
    compared side by side in one MLflow UI.
    """
    return "sqlite:///" + os.path.join(os.path.abspath(os.path.expanduser(storage_path)), "mlflow.db")


def resolve_tracking_uri(cfg: MLflowConfig, storage_path: str) -> str:
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(storage_path)


def mlflow_client(uri: str):
    """An MlflowClient for ``uri`` (telemetry off unless the environment says otherwise)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


class MLflowRun:
    """One MLflow run: created at start, FINISHED or FAILED at the end."""

    def __init__(self, *, uri: str, run_id: str, resumed: bool = False):
        self.uri = uri
        self.client = mlflow_client(uri)
        self.run_id = run_id
        self.resumed = resumed

    @classmethod
    def open(cls, *, uri: str, experiment: str, run_name: str, artifact_root: str | None = None,
             id_file: str | None = None) -> "MLflowRun":
        """Create a run, or reopen the one a previous attempt of this run name left in ``id_file``.

        Reopening keeps a resumed run's metrics on one MLflow run instead of scattering them.
        """
        client = mlflow_client(uri)
        previous = read_text(id_file)
        if previous:
            try:
                client.update_run(previous, status="RUNNING")
                return cls(uri=uri, run_id=previous, resumed=True)
            except Exception as e:  # deleted run or another store: start a fresh one
                print(f"[ray_dpo] cannot reopen MLflow run {previous} ({e}); starting a new one", flush=True)
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            experiment_id = exp.experiment_id
        else:
            # A local artifact root next to the SQLite file, not ./mlruns of whatever
            # directory the driver happened to start in.
            location = None
            if artifact_root and uri.startswith("sqlite:"):
                location = "file://" + os.path.abspath(artifact_root)
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        run_id = client.create_run(experiment_id, run_name=run_name).info.run_id
        if id_file:
            _write(id_file, run_id)
        return cls(uri=uri, run_id=run_id)

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log params; on a resumed run, values that changed go to a tag instead.

        MLflow forbids changing a logged param, and a resume may legitimately change some
        (e.g. policy.max_steps), so the new values are recorded in ``ray_dpo.resume_changes``.
        """
        from mlflow.entities import Param

        params = {k: redact(str(v))[:_MAX_PARAM_LENGTH] for k, v in params.items()}
        if self.resumed:
            logged = self.client.get_run(self.run_id).data.params
            changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
            if changed:
                self.set_tags({"ray_dpo.resume_changes": json.dumps(changed, sort_keys=True)})
            params = {k: v for k, v in params.items() if k not in logged}
        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        log_metrics(self.client, self.run_id, metrics, step)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact(text), artifact_file)

    def log_json(self, obj: object, artifact_file: str) -> None:
        self.log_text(json.dumps(obj, indent=2, sort_keys=True), artifact_file)

    def first_and_last(self, key: str) -> tuple[tuple[int, float], tuple[int, float]] | None:
        """((step, value) at the lowest step, (step, value) at the highest) of a metric, or
        None if it was never logged. A step logged twice (a resumed run) counts its last value."""
        history = self.client.get_metric_history(self.run_id, key)
        if not history:
            return None
        by_step = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}
        lo, hi = min(by_step), max(by_step)
        return (lo, by_step[lo]), (hi, by_step[hi])

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def log_metrics(client, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    """Log ``metrics`` at ``step`` (one timestamp), in batches MLflow accepts."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
    for i in range(0, len(items), _MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i : i + _MAX_METRICS_PER_BATCH])


def read_text(path: str | None) -> str | None:
    """The text of ``path`` (local or object store), None if it does not exist."""
    if not path:
        return None
    from pyarrow import fs as pafs

    from ray_dpo.faults import storage_fs

    fs, where = storage_fs(path)
    if fs.get_file_info(where).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(where) as f:
        return f.read().decode("utf-8").strip() or None


def _write(path: str, text: str) -> None:
    from ray_dpo.faults import storage_fs

    fs, where = storage_fs(path)
    fs.create_dir(where.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(where) as f:
        f.write(text.encode("utf-8"))
