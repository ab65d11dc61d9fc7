"""``ray-dpo sweep``: a sweep's trials run as Ray Tune trials, each a whole ray_dpo run.

    run_sweep(cfg, trials) -> SweepSummary
        parent MLflow run (reopened on a rerun) -> trials already finished or stopped are
        skipped -> one reference pass per group of offline trials that share it
        (driver.share_reference_pass) -> Tuner(trainable=_run_trial, one grid point per
        trial, a scheduler if sweep.scheduler) -> stopped trials marked -> summary

Ray Tune owns the scheduling: how many trials run at once (sweep.max_concurrent_trials,
else what the cluster holds), restarts of a failed trial (sweep.max_trial_failures; the
trial resumes from its checkpoints, as a rerun of ``ray-dpo train`` does) and early
stopping (ASHA or the median rule on a metric the trial's MLflow run logs). A trial is a
Tune function trainable that holds a sliver of a CPU itself: its run starts the policy workers,
reference actors and engines as ``ray-dpo train`` would, owned by the trial's process, so a
trial Tune stops takes them all down with it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import threading
import time
from typing import Any, Optional

from ray_dpo.config import RunConfig, local_cluster_cpus, local_cpus_needed, to_dict, to_yaml
from ray_dpo.sweep.trials import Trial, reference_share_key, sweep_name

SWEEP_TAG = "ray_dpo.sweep"  # the sweep's name, on the parent and on every trial
PARENT_TAG = "ray_dpo.sweep.parent"  # "1" on the parent run
OVERRIDES_TAG = "ray_dpo.sweep.overrides"  # a trial's overrides, a JSON object
STATUS_TAG = "ray_dpo.sweep.status"  # a trial's outcome: finished | stopped | failed | interrupted
PARENT_ID_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests the trials under the parent
STOPPED_AT_TAG = "ray_dpo.sweep.stopped_at_step"
_POLL_S = 0.5
TRIAL_CPU = 0.01  # what the trial's own Tune actor holds: it only waits on its run


@dataclasses.dataclass
class TrialOutcome:
    trial: Trial
    status: str  # finished | stopped | failed | interrupted | skipped (finished or stopped by an earlier invocation)
    run_id: Optional[str] = None
    metrics: dict = dataclasses.field(default_factory=dict)
    detail: str = ""


@dataclasses.dataclass
class SweepSummary:
    name: str
    parent_run_id: str
    tracking_uri: str
    experiment: str
    outcomes: list[TrialOutcome]
    reference_passes: int  # reference passes this invocation computed
    seconds: float

    @property
    def failed(self) -> list[TrialOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


# --------------------------------------------------------------------------- the trial (in a Tune actor)


def _run_trial(config: dict) -> None:
    """One trial, in its Tune actor: the ray_dpo run in a thread, and its metric (read from
    the trial's MLflow run as it is logged) reported to Tune for the scheduler."""
    from ray import tune

    from ray_dpo.config import from_dict
    from ray_dpo.driver import run_dpo
    from ray_dpo.tracking.mlflow_sink import mlflow_client, read_text

    spec = config["trial"]
    cfg = from_dict(spec["config"], source=f"sweep trial {spec['name']}", check_files=False)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["summary"] = run_dpo(cfg, tags=spec["tags"])
        except BaseException as err:  # noqa: BLE001 - raised again in the trial's own thread below
            outcome["error"] = err

    thread = threading.Thread(target=run, name=f"ray_dpo-{spec['name']}", daemon=True)
    thread.start()
    metric, client, run_id, seen = spec["metric"], None, None, -1
    while thread.is_alive() or "reported" not in outcome:
        if not thread.is_alive():
            outcome["reported"] = True  # one last look at the metric after the run ended
        thread.join(_POLL_S)
        if run_id is None:
            run_id = read_text(spec["id_file"])
            client = mlflow_client(spec["tracking_uri"]) if run_id else None
        if client is None or not metric:
            continue
        for point in sorted(client.get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp)):
            if point.step > seen and math.isfinite(point.value):
                seen = point.step
                # A scheduler's STOP ends this actor, and with it the run's actors (this
                # process owns them); the sweep's driver then marks the MLflow run.
                tune.report({metric: point.value, "step": point.step})
    if "error" in outcome:
        raise outcome["error"]


# --------------------------------------------------------------------------- the sweep (the driver)


def concurrency(cfg: RunConfig, trials: list[Trial], *, local: bool) -> tuple[int, str]:
    """(trials at once, why): sweep.max_concurrent_trials, else one on a local cluster
    (sized for one run), else as many as the cluster's CPUs and GPUs hold."""
    if cfg.sweep.max_concurrent_trials:
        return cfg.sweep.max_concurrent_trials, "sweep.max_concurrent_trials"
    if local:
        return 1, "a local cluster is sized for one run (set sweep.max_concurrent_trials for more)"
    import ray

    from ray_dpo.driver import use_gpus

    have = ray.cluster_resources()
    need_cpu = max(local_cpus_needed(t.config) for t in trials)
    fits = int(have.get("CPU", 0) // max(need_cpu, 1))
    why = f"the cluster's {have.get('CPU', 0):g} CPUs / {need_cpu} per trial"
    if use_gpus(cfg):
        need_gpu = max(_gpus_needed(t.config) for t in trials)
        if need_gpu:
            fits = min(fits, int(have.get("GPU", 0) // need_gpu))
            why += f", {have.get('GPU', 0):g} GPUs / {need_gpu:g} per trial"
    return max(1, min(fits, len(trials))), why


def _gpus_needed(cfg: RunConfig) -> float:
    from ray_dpo.loss_rules import needs_reference_group
    from ray_dpo.resources import gpus_per_actor

    n = cfg.policy.num_workers * gpus_per_actor(cfg.policy.num_gpus_per_worker, use_gpu=True)
    if needs_reference_group(cfg):
        n += cfg.reference.num_actors * gpus_per_actor(cfg.reference.num_gpus_per_actor, use_gpu=True)
    if cfg.online.enabled or cfg.eval.prompts_file:
        n += cfg.online.num_engines * gpus_per_actor(cfg.online.num_gpus_per_engine, use_gpu=True)
    return n


def _open_parent(cfg: RunConfig, trials: list[Trial]):
    from ray_dpo.config import join_path
    from ray_dpo.driver import storage_root
    from ray_dpo.tracking.mlflow_sink import MLflowRun, resolve_tracking_uri

    storage, name = storage_root(cfg), sweep_name(cfg)
    parent = MLflowRun.open(
        uri=resolve_tracking_uri(cfg.tracking.mlflow, storage), experiment=cfg.tracking.mlflow.experiment,
        run_name=name, artifact_root=os.path.join(storage, "mlartifacts") if "://" not in storage else None,
        id_file=join_path(storage, name, "mlflow_run_id"))
    parent.set_tags({SWEEP_TAG: name, PARENT_TAG: "1", "ray_dpo.mode": "sweep", **cfg.tracking.mlflow.tags})
    parent.log_params({"sweep.trials": len(trials), "sweep.grid": json.dumps(cfg.sweep.grid),
                       "sweep.sample": json.dumps(cfg.sweep.sample), "sweep.num_samples": cfg.sweep.num_samples,
                       "sweep.scheduler": cfg.sweep.scheduler, "sweep.metric": cfg.sweep.metric,
                       "sweep.mode": cfg.sweep.mode})
    parent.log_text(to_yaml(cfg), "config/resolved.yaml")
    parent.log_json([{"name": t.name, "overrides": t.overrides} for t in trials], "sweep/trials.json")
    return parent


def _trial_run(trial: Trial, client):
    """The trial's MLflow run (the id its run keeps next to its checkpoints), or None: not
    started yet, or deleted from the store (then the trial runs again)."""
    from ray_dpo.driver import run_id_file
    from ray_dpo.tracking.mlflow_sink import read_text

    run_id = read_text(run_id_file(trial.config))
    try:
        return client.get_run(run_id) if run_id else None
    except Exception:  # noqa: BLE001 - a deleted run
        return None


def _earlier_outcome(trial: Trial, client) -> Optional[TrialOutcome]:
    """A trial an earlier invocation of this sweep finished, or stopped early: not run again."""
    run = _trial_run(trial, client)
    if run is None:
        return None
    run_id, status = run.info.run_id, run.data.tags.get(STATUS_TAG)
    if run.info.status == "FINISHED" or status == "stopped":
        return TrialOutcome(trial, "skipped", run_id, dict(run.data.metrics),
                            detail="stopped early before" if status == "stopped" else "finished before")
    return None


def _share_reference(pending: list[Trial], parent) -> int:
    """One reference pass per group of offline trials that read the same one (before any
    trial starts: no two trials ever score it at once); returns the passes computed. The
    parent run's tag ray_dpo.sweep.reference says which passes and who shares them."""
    from ray_dpo.driver import share_reference_pass

    groups: dict[str, list[Trial]] = {}
    for trial in pending:
        key = reference_share_key(trial.config)
        if key is not None:
            groups.setdefault(key, []).append(trial)
    computed, said = 0, []
    for members in groups.values():
        status = share_reference_pass(members[0].config)
        computed += status.startswith("computed")
        said.append(f"{status} shared by {len(members)} offline trial(s)")
        print(f"[ray_dpo] sweep: reference pass {status.split()[0]} ({status.split()[1]}), shared by "
              f"{len(members)} offline trial(s)", flush=True)
    if said:
        parent.set_tags({"ray_dpo.sweep.reference": "; ".join(said)})
    online = sum(t.config.online.enabled for t in pending)
    if online:
        print(f"[ray_dpo] sweep: {online} online trial(s) score their own samples with their reference actors "
              "(nothing to share)", flush=True)
    return computed


def _scheduler(cfg: RunConfig, trials: list[Trial], stopped: set[str]):
    """sweep.scheduler's Tune scheduler (None: none); every trial it decides to stop goes
    into ``stopped`` (by name): a trial cut short otherwise (Ctrl-C, a killed driver) was
    interrupted, not stopped, and a rerun resumes it."""
    s = cfg.sweep
    if s.scheduler == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, TrialScheduler

    if s.scheduler == "asha":
        max_t = max((t.config.policy.max_steps or 10**6) for t in trials)
        scheduler = ASHAScheduler(time_attr="step", max_t=max(max_t, s.grace_period + 1),
                                  grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    else:
        scheduler = MedianStoppingRule(time_attr="step", grace_period=s.grace_period, min_samples_required=2)
    decide = scheduler.on_trial_result

    def on_trial_result(tune_controller, trial, result):
        decision = decide(tune_controller, trial, result)
        if decision == TrialScheduler.STOP:
            stopped.add(trial.config["trial"]["name"])
        return decision

    scheduler.on_trial_result = on_trial_result
    return scheduler


def _run_finished(spec: dict) -> bool:
    """Whether a trial's MLflow run is FINISHED (its run got to the end)."""
    from ray_dpo.tracking.mlflow_sink import mlflow_client, read_text

    run_id = read_text(spec["id_file"])
    return bool(run_id) and mlflow_client(spec["tracking_uri"]).get_run(run_id).info.status == "FINISHED"


def trial_kind(config: dict) -> str:
    """What a trial's duration depends on most: online trials generate, judge and sync every
    round and take about twice as long as offline ones of the same steps."""
    return "online" if (config.get("online") or {}).get("enabled") else "offline"


def sweep_eta(left: list[str], took: dict[str, list[float]], *, at_once: int = 1) -> str:
    """The ETA of the trials ``left`` (their kinds), ``at_once`` at a time, from the mean time
    of the trials of each kind that ended; "ETA after the first <kind> trial" while a kind
    left has no ended trial to go by (a mean of the other kind would be wrong by ~2x)."""
    unknown = sorted({k for k in left if not took.get(k)})
    if unknown:
        return f"ETA after the first {' and '.join(unknown)} trial"
    seconds = sum(sum(took[k]) / len(took[k]) for k in left) / max(1, min(at_once, len(left)))
    return f"ETA {seconds / 60:.1f} min"


def _console_callback(total: int, skipped: int, at_once: int, stopped: set[str]):
    from ray import tune

    class SweepConsole(tune.Callback):
        """The sweep's own lines: a trial started, ended (how), trials left and an ETA."""

        def __init__(self):
            self.t0, self.ended = time.monotonic(), 0
            self.started: dict[str, float] = {}
            self.took: dict[str, list[float]] = {}  # seconds of the trials ended, by kind

        def _name(self, trial) -> str:
            return trial.config["trial"]["label"] or trial.config["trial"]["name"]

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.monotonic()
            print(f"[ray_dpo] sweep: trial {self._name(trial)} started", flush=True)

        def _ended(self, trial, how: str, trials) -> None:
            self.ended += 1
            done = self.ended + skipped
            self.took.setdefault(trial_kind(trial.config["trial"]["config"]), []).append(
                time.monotonic() - self.started.get(trial.trial_id, self.t0))
            left = [trial_kind(t.config["trial"]["config"]) for t in trials
                    if t is not trial and t.status not in ("TERMINATED", "ERROR")]
            eta = f", {sweep_eta(left, self.took, at_once=at_once)}" if left else ""
            print(f"[ray_dpo] sweep: trial {self._name(trial)} {how} ({done}/{total} trials done{eta})", flush=True)

        def on_trial_complete(self, iteration, trials, trial, **info):
            if _run_finished(trial.config["trial"]):
                self._ended(trial, "finished", trials)
            elif trial.config["trial"]["name"] in stopped:  # Tune ended it before its run did: the scheduler
                self._ended(trial, f"stopped early by the scheduler at step {(trial.last_result or {}).get('step')}",
                            trials)
            else:
                self._ended(trial, "interrupted (the same command resumes it)", trials)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._ended(trial, "FAILED", trials)

    return SweepConsole()


def run_sweep(cfg: RunConfig, trials: list[Trial]) -> SweepSummary:
    """Run (or resume) the sweep: see the module docstring."""
    from ray_dpo.config import join_path, with_absolute_paths
    from ray_dpo.driver import init_ray, storage_root

    t0 = time.monotonic()
    # Tune starts each trial in its own working directory: every path must be absolute.
    cfg = with_absolute_paths(cfg)
    trials = [dataclasses.replace(t, config=with_absolute_paths(t.config)) for t in trials]
    local = not os.environ.get("RAY_ADDRESS")
    widest = max(trials, key=lambda t: local_cpus_needed(t.config)).config
    at_once_wanted = cfg.sweep.max_concurrent_trials or 1
    if local and not widest.run.local_num_cpus:
        cpus, _ = local_cluster_cpus(widest, cores=os.cpu_count() or 1)
        # + 1: the trials' own Tune actors hold a sliver each (TRIAL_CPU)
        widest = dataclasses.replace(widest, run=dataclasses.replace(
            widest.run, local_num_cpus=max(cpus, at_once_wanted * local_cpus_needed(widest) + 1)))
    init_ray(widest)
    parent = _open_parent(cfg, trials)
    name = sweep_name(cfg)
    outcomes: dict[str, TrialOutcome] = {}
    for trial in trials:
        earlier = _earlier_outcome(trial, parent.client)
        if earlier is not None:
            outcomes[trial.name] = earlier
    pending = [t for t in trials if t.name not in outcomes]
    print(f"[ray_dpo] sweep {name!r}: {len(trials)} trial(s)"
          + (f", {len(trials) - len(pending)} already done by an earlier run of this sweep" if outcomes else "")
          + f"; MLflow parent run {parent.run_id} in {parent.uri}", flush=True)
    computed = 0
    try:
        if pending:
            computed = _share_reference(pending, parent)
            at_once, why = concurrency(cfg, pending, local=local)
            print(f"[ray_dpo] sweep: {len(pending)} trial(s) to run, {at_once} at a time ({why})", flush=True)
            results, stopped = _tune(cfg, pending, parent, at_once, len(trials), len(trials) - len(pending),
                                     storage=join_path(storage_root(cfg), name))
            for trial in pending:
                outcomes[trial.name] = _outcome(trial, results.get(trial.name), parent.client,
                                                stopped=trial.name in stopped)
        failed = [o for o in outcomes.values() if o.status == "failed"]
        parent.log_metrics({"sweep/trials": len(trials), "sweep/reference_passes": computed,
                            **{f"sweep/{s}": sum(o.status == s for o in outcomes.values())
                               for s in ("finished", "stopped", "failed", "interrupted", "skipped")}}, step=0)
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish("FAILED" if failed else "FINISHED")
    return SweepSummary(name=name, parent_run_id=parent.run_id, tracking_uri=parent.uri,
                        experiment=cfg.tracking.mlflow.experiment, outcomes=[outcomes[t.name] for t in trials],
                        reference_passes=computed, seconds=time.monotonic() - t0)


def _tune(cfg: RunConfig, pending: list[Trial], parent, at_once: int, total: int, skipped: int, *,
          storage: str) -> tuple[dict[str, Any], set[str]]:
    """Run ``pending`` through a Tuner; ({trial name: its Tune Result}, the names of the
    trials the scheduler stopped)."""
    from ray import tune

    from ray_dpo.driver import run_id_file

    tags = {PARENT_ID_TAG: parent.run_id, SWEEP_TAG: sweep_name(cfg)}
    specs = [{"name": t.name, "label": t.label, "config": to_dict(t.config), "metric": cfg.sweep.metric,
              "tracking_uri": parent.uri, "id_file": run_id_file(t.config),
              "tags": {**tags, OVERRIDES_TAG: json.dumps(t.overrides, sort_keys=False)}} for t in pending]
    stopped: set[str] = set()  # the trials the scheduler stopped
    scheduler = _scheduler(cfg, pending, stopped)
    tuner = tune.Tuner(
        # Tune wants some resource per trial: a sliver of a CPU, the run itself asks for the rest.
        tune.with_resources(_run_trial, {"CPU": TRIAL_CPU}),
        param_space={"trial": tune.grid_search(specs)},
        tune_config=tune.TuneConfig(
            metric=cfg.sweep.metric if scheduler else None, mode=cfg.sweep.mode if scheduler else None,
            scheduler=scheduler, max_concurrent_trials=at_once, reuse_actors=False,
            trial_name_creator=lambda trial: trial.config["trial"]["name"],
            trial_dirname_creator=lambda trial: trial.config["trial"]["name"]),
        run_config=tune.RunConfig(
            name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=storage, verbose=0,
            failure_config=tune.FailureConfig(max_failures=cfg.sweep.max_trial_failures),
            callbacks=[_console_callback(total, skipped, at_once, stopped)]),
    )
    from ray_dpo import console

    stdout = sys.stdout
    if console.filtering_enabled():
        sys.stdout = console.OwnLinesOnly(stdout)  # Tune's banners and trial tables stay off the console
    try:
        grid = tuner.fit()
    finally:
        sys.stdout = stdout
    return {result.config["trial"]["name"]: result for result in grid}, stopped


def _outcome(trial: Trial, result, client, *, stopped: bool) -> TrialOutcome:
    """How a trial Tune ran ended: finished (its MLflow run FINISHED), failed (an error after
    its restarts), stopped by the scheduler (its run was cut off: marked KILLED, tagged), or
    interrupted (the sweep was: Ctrl-C; tagged, resumed by a rerun)."""
    run = _trial_run(trial, client)
    run_id = run.info.run_id if run else None
    metrics = dict(run.data.metrics) if run else {}
    if result is not None and result.error is not None:
        if run is not None:
            client.set_tag(run_id, STATUS_TAG, "failed")
        return TrialOutcome(trial, "failed", run_id, metrics, detail=f"{type(result.error).__name__}: "
                                                                     f"{str(result.error).splitlines()[0][:300]}")
    if run is not None and run.info.status == "FINISHED":  # its run got to the end
        client.set_tag(run_id, STATUS_TAG, "finished")
        return TrialOutcome(trial, "finished", run_id, metrics)
    if not stopped:
        if run is not None:
            client.set_tag(run_id, STATUS_TAG, "interrupted")
        return TrialOutcome(trial, "interrupted", run_id, metrics, detail="the same command resumes it")
    stopped_at = (result.metrics or {}).get("step") if result is not None else None
    if run is not None:
        client.set_tag(run_id, STATUS_TAG, "stopped")
        client.set_tag(run_id, STOPPED_AT_TAG, str(stopped_at))
        client.set_terminated(run_id, status="KILLED")
    return TrialOutcome(trial, "stopped", run_id, metrics,
                        detail=f"stopped early by the scheduler at step {stopped_at}")


def format_outcomes(summary: SweepSummary, metrics: tuple[str, ...]) -> str:
    """A table: a trial per row, its overrides, status and final metrics."""
    rows = [["trial", "status", *metrics]]
    for o in summary.outcomes:
        rows.append([o.trial.label or o.trial.name, o.status + (f" ({o.detail})" if o.detail else ""),
                     *[f"{o.metrics[m]:.4f}" if m in o.metrics else "-" for m in metrics]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def print_summary(summary: SweepSummary, metric: str) -> None:
    shown = tuple(dict.fromkeys((metric, "eval/judge_score", "eval/kl", "eval/rewards/accuracies")))
    shown = tuple(m for m in shown if any(m in o.metrics for o in summary.outcomes))
    print(f"[ray_dpo] sweep {summary.name!r} done in {summary.seconds / 60:.1f} min: "
          + ", ".join(f"{sum(o.status == s for o in summary.outcomes)} {s}"
                      for s in ("finished", "stopped", "failed", "interrupted", "skipped")
                      if s != "interrupted" or any(o.status == s for o in summary.outcomes)), flush=True)
    for line in format_outcomes(summary, shown).splitlines():
        print(f"[ray_dpo]   {line}")
    print(f"[ray_dpo] reference passes computed by this invocation: {summary.reference_passes}", flush=True)
    print(f"[ray_dpo] MLflow parent run id: {summary.parent_run_id} (experiment {summary.experiment!r})")
    print(f"[ray_dpo] compare the trials: ray-dpo compare --experiment {summary.experiment} "
          f"--tracking-uri {summary.tracking_uri}", file=sys.stdout, flush=True)
