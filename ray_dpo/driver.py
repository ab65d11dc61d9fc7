"""The driver: builds the DPO pipeline and reads top to bottom like its data flow.

    offline: config -> Ray -> MLflow run -> tokenized pairs (Ray Data) -> ReferenceGroup
             -> (optional) reference cache -> BatchFeeder -> TorchTrainer(DeepSpeed workers)
             -> final checkpoint + Hugging Face model -> MLflow run FINISHED
    online:  the same, with an OnlineCoordinator in the BatchFeeder's place: it owns the
             generation engines and the judge, and builds each round's pairs from the
             data set's prompts (ray_dpo/online/coordinator.py)

The driver never touches tensors. It runs on the head node: under ``ray job submit`` it is
the job's entrypoint and connects to the cluster through RAY_ADDRESS; on a laptop it starts
a local Ray cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import ray

from ray_dpo import compat, console, topology
from ray_dpo.config import RunConfig, flatten, join_path, local_cluster_cpus, to_yaml, with_absolute_paths
from ray_dpo.data.files import expand_files
from ray_dpo.data.pipeline import build_pair_data
from ray_dpo.data.report import data_metrics, data_report, format_report, kto_balance, kto_line
from ray_dpo.loss_rules import needs_reference_group, prompt_only_refusal, reference_source, trains_unpaired
from ray_dpo.tracking.metrics import CountProgress

logger = logging.getLogger("ray_dpo")

# Ray Train blocks ~2 s per report at its default health-check interval.
_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


REFERENCE_CACHE_TAG = "ray_dpo.reference_cache"  # "hit <key>" | "computed <key>": counts a sweep's passes

# Printed before -> after at the end of a run that sampled held-out prompts.
HELDOUT_METRICS = ("eval/judge_score", "eval/kl")


@dataclasses.dataclass
class TrainSummary:
    """What a finished run produced, printed by the CLI."""

    run_id: str
    tracking_uri: str
    experiment: str
    steps: int
    checkpoint_path: str | None
    hf_model_path: str | None
    adapter_path: str | None
    final_metrics: dict
    data_report: dict
    seconds: float
    heldout: dict = dataclasses.field(default_factory=dict)
    """{"eval/judge_score": ((step, value), (step, value)), "eval/kl": ...}: the held-out
    evaluation at its first and last step, for the metrics the run logged."""


def init_ray(cfg: RunConfig) -> None:
    """Join the cluster named by RAY_ADDRESS (ray job submit, KubeRay) or start a local one.

    The console then shows ray_dpo's lines only; Ray's output stays in its session logs,
    whose folder is printed once (ray_dpo/console.py; RAY_DPO_CONSOLE=all turns it off).
    """
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    quiet = console.filtering_enabled()
    runtime_env: dict = {"env_vars": {k: os.environ[k] for k in _ENV_DEFAULTS if k in os.environ}}
    if not quiet:
        runtime_env["env_vars"][console.ENV_CONSOLE] = os.environ[console.ENV_CONSOLE]
    # A job submitted with its own setup hook keeps it (Ray refuses two); ray_dpo's records
    # in workers then print without the prefix the console filter passes, and a SIGTERM
    # kills a policy worker at once (no checkpoint in policy.sigterm_grace_s).
    if "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR" not in os.environ:
        runtime_env["worker_process_setup_hook"] = console.SETUP_HOOK
    if quiet:
        console.quiet_driver_loggers()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, log_to_driver=True)
    else:
        # Logical CPUs are scheduling tokens, not cores: Ray Data tasks, the reference
        # actors and the engines must not starve behind the train workers (with as many
        # tokens as cores, two workers on two cores deadlock a Ray Data stage).
        num_cpus, why = local_cluster_cpus(cfg, cores=os.cpu_count() or 1)
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)
        print(f"[ray_dpo] local Ray cluster: {num_cpus} logical CPUs ({why})", flush=True)
    if quiet and console.install_console_filter():
        where = console.ray_log_dir()
        print(f"[ray_dpo] Ray's own output (workers, Ray Train, Ray Data) goes to its logs"
              f"{f' in {where}' if where else ''}, not here; RAY_DPO_CONSOLE=all shows it here",
              flush=True)


def storage_root(cfg: RunConfig) -> str:
    """run.storage_path as Ray Train wants it: absolute if local, an object-store URI as is."""
    path = cfg.run.storage_path
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def use_gpus(cfg: RunConfig) -> bool:
    if cfg.run.device == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return cfg.run.device == "cuda"


def run_dpo(cfg: RunConfig, *, tags: dict[str, str] | None = None) -> TrainSummary:
    """Run offline DPO, or online DPO when online.enabled, end to end; the MLflow run is
    FAILED if anything raises. ``tags`` go on the MLflow run (a sweep's trial: its parent
    run and overrides)."""
    with console.Recording() as recording:  # the console, kept in the MLflow run as console.log
        t0 = time.monotonic()
        cfg = with_absolute_paths(cfg)
        init_ray(cfg)
        tracker = _start_tracking(cfg, mode="online" if cfg.online.enabled else "offline", tags=tags)
        try:
            return _run(cfg, tracker, t0)
        finally:
            _log_console(tracker, recording)


def _run(cfg: RunConfig, tracker, t0: float) -> TrainSummary:
    """run_dpo once its MLflow run is open: data, roles, training, summary."""
    gpu = use_gpus(cfg)
    follower = None  # the engines that follow the policy: the online coordinator, or offline eval
    # Reference actors the run needs whatever the data holds load their models while Ray Data
    # tokenizes (start-up: the two overlap instead of adding up).
    early = _reference_group(cfg, gpu) if _needs_group_whatever_the_data(cfg) else None
    try:
        train, evaluation = _load_data(cfg)
        report = {**data_report(train, evaluation), "loss": _loss_facts(cfg, train)}
        print("[ray_dpo] data: " + format_report(report).replace("\n", "\n[ray_dpo] "), flush=True)
        tracker.log_json(report, "data_report.json")
        tracker.log_metrics(_data_metrics(train, evaluation, report), step=0)
        kto = report["loss"].get("kto")
        if kto and not kto["advised"]:
            logger.warning("%s: set loss.desirable_weight / loss.undesirable_weight to bring it inside",
                           kto_line(kto))
        _warn_local_storage(cfg)
        # What starts, from the one answer the local cluster's size and `ray-dpo k8s` use too.
        print("[ray_dpo] actors: " + ", ".join(r.describe() for r in topology.roles(cfg, use_gpu=gpu)), flush=True)
        watch: dict[str, list[str]] = {}  # role -> actor ids whose restarts MLflow counts
        roles = _start_roles(cfg, tracker, train, evaluation, gpu, watch, early=early)
        if roles.reference_cache:
            tracker.set_tags({REFERENCE_CACHE_TAG: roles.reference_cache})
        follower = roles.follower
        result = _fit_policy(cfg, roles.source, tracker, total_steps=roles.total_steps, gpu=gpu,
                             follower=follower, watch=watch, started_at=time.time() - (time.monotonic() - t0))
        if follower is not None:
            ray.get(follower.finish.remote())  # the last held-out eval, still being scored
        summary = _summarize(cfg, tracker, result, roles.total_steps, report, time.monotonic() - t0)
    except BaseException:
        if early is not None:
            early.shutdown()  # before anything held it (a data error), or with the run's other roles
        tracker.finish("FAILED")
        raise
    finally:
        if follower is not None:
            close_follower(follower)
    tracker.finish("FINISHED")
    return summary


def _needs_group_whatever_the_data(cfg: RunConfig) -> bool:
    """Whether the run starts reference actors before it knows its data: streamed reference
    log-probs, or a held-out KL to score. A precompute pass alone needs them only when the
    cache (keyed by the tokenized data) misses, so they start after tokenization then."""
    if cfg.online.enabled:
        return needs_reference_group(cfg)
    streamed = reference_source(cfg) == "group" and not cfg.reference.precompute
    return streamed or bool(cfg.eval.prompts_file)


def _warn_local_storage(cfg: RunConfig) -> None:
    """A multi-node cluster with run.storage_path on one node's disk: said before training."""
    from ray_dpo import faults
    from ray_dpo.capacity import live_nodes

    path, nodes = storage_root(cfg), sum(1 for n in live_nodes() if n.get("Alive"))
    warning = faults.storage_warning(path, spread=f"a {nodes}-node cluster" if nodes > 1 else None,
                                     fs_type=faults.mount_type(path))
    if warning:
        logger.warning(warning)


def _log_console(tracker, recording) -> None:
    try:
        tracker.log_text(recording.text(), "console.log")
    except Exception as err:  # noqa: BLE001 - the run's outcome is decided; its console is a record
        logger.warning("could not keep the console in the MLflow run: %s", err)


def _data_metrics(train, evaluation, report: dict) -> dict[str, float]:
    """data/* of the train split, data/eval/* of the eval split, data/kto/* of a KTO run."""
    metrics = data_metrics(train.counters)
    if evaluation is not None:
        metrics.update(data_metrics(evaluation.counters, prefix="data/eval/"))
    kto = report["loss"].get("kto")
    if kto:
        metrics.update({"data/kto/desirable": kto["desirable"], "data/kto/undesirable": kto["undesirable"]})
        if kto["weighted_ratio"] is not None:
            metrics["data/kto/weighted_ratio"] = kto["weighted_ratio"]
    return metrics


# --------------------------------------------------------------------------- stages


def _start_tracking(cfg: RunConfig, *, mode: str, tags: dict[str, str] | None = None):
    from ray_dpo.tracking.mlflow_sink import MLflowRun, resolve_tracking_uri

    storage = storage_root(cfg)
    local = "://" not in storage
    tracker = MLflowRun.open(
        uri=resolve_tracking_uri(cfg.tracking.mlflow, storage),
        experiment=cfg.tracking.mlflow.experiment,
        run_name=cfg.tracking.mlflow.run_name or cfg.run.name,
        artifact_root=os.path.join(storage, "mlartifacts") if local else None,
        # Reopening the same MLflow run on resume (a rerun, a KubeRay retry) needs its id
        # next to the checkpoints, on a local path or the object store alike.
        id_file=run_id_file(cfg),
    )
    tracker.set_tags({**(tags or {}), "ray_dpo.mode": mode, "ray_dpo.run_name": cfg.run.name,
                      "ray_dpo.loss": cfg.loss.type, "ray_dpo.reference": _reference_mode(cfg),
                      **cfg.tracking.mlflow.tags})
    tracker.log_params(flatten(cfg))
    if cfg.policy.lora.enabled:
        tracker.log_params(_lora_counts(cfg))
    tracker.log_text(to_yaml(cfg), "config/resolved.yaml")
    print(f"[ray_dpo] MLflow run {tracker.run_id} in {tracker.uri}", flush=True)
    return tracker


def _lora_counts(cfg: RunConfig) -> dict:
    """Trainable and total parameters of the LoRA policy (MLflow params), said on the console;
    counted on the model's architecture on the meta device, no weights read."""
    from ray_dpo import lora

    try:
        model = lora.wrap(lora.meta_model(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code),
                          cfg.policy.lora)
    except (OSError, ValueError) as err:  # e.g. a hub id this head node cannot reach: the workers may
        logger.warning("LoRA parameter counts unknown (the model's config did not load here: %s)", err)
        return {}
    trainable, total = lora.param_counts(model)
    print(f"[ray_dpo] LoRA rank {cfg.policy.lora.rank} on {', '.join(cfg.policy.lora.target_modules)}: "
          f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)", flush=True)
    return {"lora/trainable_params": trainable, "lora/total_params": total}


def _reference_mode(cfg: RunConfig) -> str:
    """The ray_dpo.reference tag: none (reference-free loss), adapters_off (LoRA: the policy's
    base model), precomputed or streamed."""
    source = reference_source(cfg)
    if source != "group":
        return source
    return "precomputed" if cfg.reference.precompute else "streamed"


def _loss_facts(cfg: RunConfig, train=None) -> dict:
    """The data report's "loss" entry: what the loss trains on and whether a reference runs;
    for KTO, the train split's desirable / undesirable balance (report.kto_balance)."""
    unpaired, reference = trains_unpaired(cfg), _reference_mode(cfg)
    rows = "unpaired examples" + (" (pairs unpaired: data.unpair)" if cfg.data.unpair else "") if unpaired \
        else "preference pairs"
    ref = {"none": "none: reference-free, no reference actors, no reference forward",
           "adapters_off": "the base model, scored by the policy workers with the LoRA adapters off "
                           "(no reference actors for training)"}.get(
        reference, f"{reference} by {cfg.reference.num_actors} reference actor(s)")
    facts = {"type": cfg.loss.type, "rows": "examples" if unpaired else "pairs", "reference": reference,
             "summary": f"loss.type={cfg.loss.type} on {rows}; reference: {ref}"}
    labels = (train.token_stats or {}).get("labels") if train is not None else None
    if unpaired and labels:
        facts["kto"] = kto_balance(labels, desirable_weight=_weight(cfg.loss.desirable_weight),
                                   undesirable_weight=_weight(cfg.loss.undesirable_weight))
    return facts


def _weight(value: float | None) -> float:
    return 1.0 if value is None else value


def _load_data(cfg: RunConfig):

    tokenizer = cfg.model.tokenizer or cfg.model.name_or_path
    train_files = expand_files(cfg.data.train_files, key="data.train_files")
    unpaired = trains_unpaired(cfg)  # KTO: labelled examples, each with its KL completion
    train = build_pair_data(train_files, tokenizer_path=tokenizer, data=cfg.data,
                            chat_template=cfg.model.chat_template, name="train", unpaired=unpaired,
                            refuse_prompt_only=prompt_only_refusal(cfg.online))
    if train.num_pairs == 0:
        raise ValueError(f"data.train_files: no usable pair in {len(train_files)} file(s); "
                         f"counters: {train.counters.as_dict()}")
    evaluation = None
    if cfg.data.eval_files:
        eval_files = expand_files(cfg.data.eval_files, key="data.eval_files")
        evaluation = build_pair_data(eval_files, tokenizer_path=tokenizer, data=cfg.data,
                                     chat_template=cfg.model.chat_template, name="eval", unpaired=unpaired,
                                     refuse_prompt_only=prompt_only_refusal(cfg.online, key="data.eval_files"))
    return train, evaluation


def _run_dir(cfg: RunConfig) -> str:
    """<storage root>/<run.name>, absolute: checkpoints, the ledger, the MLflow run id."""
    return join_path(storage_root(cfg), cfg.run.name)


def run_id_file(cfg: RunConfig) -> str:
    """Where a run keeps its MLflow run id: a rerun (a resume, a sweep's rerun) reopens that run."""
    return join_path(_run_dir(cfg), "mlflow_run_id")


def reference_group_kwargs(cfg: RunConfig, gpu: bool) -> dict:
    """ReferenceGroup's arguments: the reference loads its model the way the policy does
    (dtype, remote code, attention implementation: config validation checks
    reference.layout against model.attn_implementation, so the actors must use it)."""
    return {"model_path": cfg.reference.model or cfg.model.name_or_path, "config": cfg.reference,
            "dtype": cfg.model.dtype, "use_gpu": gpu, "trust_remote_code": cfg.model.trust_remote_code,
            "attn_implementation": cfg.model.attn_implementation, "capacity_wait_s": cfg.run.capacity_wait_s}


def _reference_group(cfg: RunConfig, gpu: bool):
    from ray_dpo.reference import ReferenceGroup

    return ReferenceGroup(**reference_group_kwargs(cfg, gpu))


@dataclasses.dataclass
class Roles:
    """What _start_roles started. ``groups`` are the reference groups the driver holds until
    the run ends: a Ray actor lives while some process holds its handle, and the handles
    inside a restartable actor's constructor arguments do not count (Ray 2.60). A
    coordinator or feeder that was the last holder and is SIGKILLed would take the
    reference actors with it, and its restarted process would find them dead."""

    source: Any  # the workers' step source: BatchFeeder actor or OnlineCoordinator
    follower: Any  # the engines that follow the policy, or None
    total_steps: int
    groups: list = dataclasses.field(default_factory=list)
    reference_cache: str | None = None  # "hit <key>" | "computed <key>" with reference.precompute


def _start_roles(cfg: RunConfig, tracker, train, evaluation, gpu: bool, watch: dict, *, early=None) -> Roles:
    """The workers' step source, the engines that follow the policy, the run's steps.

    Online: the coordinator is both (rounds, engines, held-out eval). Offline: a BatchFeeder
    over the reference group or cache, and with eval.prompts_file a PolicyFollower for the
    held-out eval, so offline runs log eval/judge_score and eval/kl too. ``early``: the
    reference group, if the driver started it before tokenizing.
    """
    if cfg.online.enabled:
        return _start_online_roles(cfg, tracker, train, evaluation, gpu, watch, group=early)
    # One reference group at most, started when something first needs it: the stream, a
    # precompute pass the cache cannot answer, or the held-out eval's KL. A reference-free loss
    # (SimPO, ORPO) or a LoRA run scoring its base model itself (adapters_off) starts none for
    # training; a cache hit starts none for the pass.
    started: list = [early] if early is not None else []

    def group():
        if not started:
            started.append(_reference_group(cfg, gpu))
        return started[0]

    trains_with_group = reference_source(cfg) == "group"
    if trains_with_group and not cfg.reference.precompute:
        watch["reference"] = group().actor_ids
    total_steps = batch_plan(cfg).total_steps(train.num_pairs)
    follower = None
    if cfg.eval.prompts_file:
        from ray_dpo.engines.follower import launch_follower

        # Its engines load while the reference pass runs (start-up: the two overlap). The
        # held-out KL scores through the group that streams or precomputes, if any.
        follower = launch_follower(cfg, reference=group(), total_steps=total_steps, tracking_uri=tracker.uri,
                                   run_id=tracker.run_id, use_gpu=gpu)
    try:
        feeder, cache_status = _start_feeder(cfg, train, evaluation, group if trains_with_group else None)
        if cfg.reference.precompute and started and not cfg.eval.prompts_file:
            started.pop().shutdown()  # the pass is done: its resources go back to the cluster for training
        watch["feeder"] = compat.actor_ids([feeder])
        served = ray.get(feeder.total_steps.remote())
        if served != total_steps:  # the plan above and the feeder's count the same pairs
            raise RuntimeError(f"the feeder serves {served} steps where the plan has {total_steps}")
        if follower is not None:
            from ray_dpo.engines.follower import await_follower

            await_follower(follower, cfg)
            _watch_engines(watch, follower, role="eval")
    except BaseException:
        if follower is not None:
            close_follower(follower)
        raise
    return Roles(feeder, follower, total_steps, groups=started, reference_cache=cache_status)


def _start_online_roles(cfg: RunConfig, tracker, train, evaluation, gpu: bool, watch: dict, *, group) -> Roles:
    """Online: the coordinator is the step source and the follower (rounds, engines, held-out
    eval). ``group``: the reference group, or None (a LoRA run with adapters_off scores the
    rounds' pairs in the policy workers: reference actors only for the held-out eval/kl, if any)."""
    from ray_dpo.online.coordinator import start_coordinator

    if group is not None:
        watch["reference"] = group.actor_ids
    coordinator = start_coordinator(cfg, train=train, evaluation=evaluation, reference=group,
                                    tracking_uri=tracker.uri, run_id=tracker.run_id, use_gpu=gpu)
    _watch_engines(watch, coordinator, role="coordinator")
    return Roles(coordinator, coordinator, ray.get(coordinator.total_steps.remote()),
                 groups=[group] if group is not None else [])


def _watch_engines(watch: dict, follower, *, role: str) -> None:
    """Count the restarts of the actor and of its generation engines in MLflow."""
    watch[role] = compat.actor_ids([follower])
    watch["engine"] = ray.get(follower.engine_actor_ids.remote())


def close_follower(follower) -> None:
    """Stop the engines, judges and feeders the coordinator or eval actor owns (best effort:
    the run's outcome is already decided)."""
    try:
        ray.get(follower.close.remote(), timeout=60)
    except Exception as err:  # noqa: BLE001
        logger.warning("closing the generation engines' actor failed: %s", err)
    ray.kill(follower)


def _start_feeder(cfg: RunConfig, train, evaluation, group):
    """The BatchFeeder actor, and how its reference log-probs were found ("hit <key>" or
    "computed <key>"; None when streamed). They come from the cache, a precompute pass, or
    are streamed through ``group()`` (None: a run that trains without reference actors)."""
    from ray_dpo.feeder import start_feeder

    ref_cache, status, reference = None, None, None
    if cfg.reference.precompute:
        ref_cache, status = _precomputed_reference(cfg, group, train, evaluation)
    elif group is not None:
        reference = group()
    feeder = start_feeder(train=train, plan=batch_plan(cfg), reference=reference, ref_cache=ref_cache,
                          evaluation=evaluation, eval_max_pairs=cfg.eval.max_pairs,
                          reference_free=reference_source(cfg) != "group", max_restarts=cfg.policy.max_failures)
    return feeder, status


def batch_plan(cfg: RunConfig):
    """The offline run's step layout (ray_dpo.feeder.BatchPlan): which pairs each step trains."""
    from ray_dpo.feeder import BatchPlan

    return BatchPlan(num_workers=cfg.policy.num_workers, micro_batch_size=cfg.policy.micro_batch_size,
                     gradient_accumulation_steps=cfg.policy.gradient_accumulation_steps,
                     num_epochs=cfg.policy.num_epochs, max_steps=cfg.policy.max_steps, seed=cfg.run.seed,
                     shuffle=cfg.data.shuffle)


def _precomputed_reference(cfg: RunConfig, reference_group, train, evaluation) -> tuple[dict, str]:
    """(reference log-probs by pair id, "hit <key>" | "computed <key>"): read from the cache,
    else scored by ``reference_group()`` and cached."""
    from ray_dpo.reference import cache

    cache_dir = cfg.reference.cache_dir or os.path.join(cfg.run.storage_path, "reference_cache")
    fingerprint = train.fingerprint + (evaluation.fingerprint if evaluation else "")
    key = cache.cache_key(data_fingerprint=fingerprint, model_path=cfg.reference.model or cfg.model.name_or_path,
                          dtype=cfg.model.dtype, extra={"format": cfg.data.format})
    found = cache.load(cache_dir, key)
    if found is not None:
        print(f"[ray_dpo] reference log-probs: cache hit {key[:12]} ({len(found)} pairs)", flush=True)
        return found, f"hit {key[:12]}"
    t0 = time.monotonic()
    datasets = [d for d in (train, evaluation) if d is not None]
    progress = CountProgress("[ray_dpo] reference log-probs", sum(d.num_pairs for d in datasets), unit="pairs")
    scored = cache.score_datasets(reference_group(), datasets, batch_size=cfg.reference.batch_size,
                                  progress=progress.update)
    cache.save(cache_dir, key, *scored)
    print(f"[ray_dpo] reference log-probs: computed {len(scored[0])} pairs in "
          f"{time.monotonic() - t0:.1f}s, cached as {key[:12]} under {cache_dir}", flush=True)
    return cache.load(cache_dir, key), f"computed {key[:12]}"


def share_reference_pass(cfg: RunConfig) -> str:
    """Make sure the reference cache ``cfg`` reads exists (a sweep runs this once, before its
    trials, so no two trials ever score the same pass): "hit <key>" or "computed <key>".
    The reference actors start only on a miss, and stop before this returns."""
    cfg = with_absolute_paths(cfg)
    train, evaluation = _load_data(cfg)
    groups = []

    def group():
        groups.append(_reference_group(cfg, use_gpus(cfg)))
        return groups[-1]

    try:
        return _precomputed_reference(cfg, group, train, evaluation)[1]
    finally:
        for g in groups:
            g.shutdown()


def _fit_policy(cfg: RunConfig, feeder, tracker, *, total_steps: int, gpu: bool, follower=None,
                watch: dict | None = None, started_at: float | None = None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train import TrainingFailedError
    from ray.train.torch import TorchTrainer

    from ray_dpo.policy.loop_spec import TrainLoopSpec

    if not gpu:
        # The worker module imports DeepSpeed here too, whose accelerator detection warns
        # "Setting accelerator to CPU. If you have GPU..." when it finds none: a CPU run says so.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from ray_dpo.policy.worker import train_loop_per_worker
    from ray_dpo.tracking.callback import FailFastOnLostRoles, TrackingCallback, WaitForWorkerCapacity

    storage = storage_root(cfg)
    resources = {"CPU": cfg.policy.num_cpus_per_worker, **cfg.policy.resources}
    if gpu:
        resources["GPU"] = cfg.policy.num_gpus_per_worker
    callback = TrackingCallback(
        tracking_uri=tracker.uri, run_id=tracker.run_id, total_steps=total_steps,
        log_every=cfg.tracking.log_every_steps, progress=cfg.tracking.progress,
        ledger_path=join_path(_run_dir(cfg), "ledger.jsonl") if "://" not in storage else None,
        max_failures=cfg.policy.max_failures, watch=watch, started_at=started_at,
        num_workers=cfg.policy.num_workers, eval_every=cfg.eval.every_steps,
    )
    spec = TrainLoopSpec(model=cfg.model, policy=cfg.policy, loss=cfg.loss, eval_every=cfg.eval.every_steps,
                         feeder=feeder, follower=follower, device="cuda" if gpu else "cpu", run_dir=_run_dir(cfg),
                         seed=cfg.run.seed)
    low = elastic_min_workers(cfg)
    # Elastic: Ray Train starts as many workers as fit, from min_workers up, and grows the
    # group when nodes return (checked every policy.resize_check_s).
    elastic = {"elastic_resize_monitor_interval_s": cfg.policy.resize_check_s} if low else {}
    scaling = ScalingConfig(num_workers=(low, cfg.policy.num_workers) if low else cfg.policy.num_workers,
                            use_gpu=gpu, resources_per_worker=resources, **elastic)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec.as_config(),
        scaling_config=scaling,
        run_config=TrainRunConfig(
            name=cfg.run.name, storage_path=storage,
            callbacks=[callback, FailFastOnLostRoles(), WaitForWorkerCapacity(
                request={k: v for k, v in resources.items() if v}, limit_s=cfg.run.capacity_wait_s,
                tracking_uri=tracker.uri, run_id=tracker.run_id,
                min_workers=low, resize_check_s=cfg.policy.resize_check_s)],
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.policy.num_checkpoints_to_keep),
            # A dead worker restarts the group from the latest complete checkpoint (faults.py).
            failure_config=FailureConfig(max_failures=cfg.policy.max_failures),
            # Ray Train's INFO lines (one "Reporting training result" dict per step and
            # worker, with the pair ids) stay in its logs/train files, off the console.
            logging_config=LoggingConfig(log_level="WARNING" if console.filtering_enabled() else "INFO"),
        ),
    )
    workers = f"{low}-{cfg.policy.num_workers} workers (elastic)" if low else f"{cfg.policy.num_workers} worker(s)"
    print(f"[ray_dpo] training: {total_steps} steps on {workers}, "
          f"ZeRO-{cfg.policy.zero_stage}, {'GPU' if gpu else 'CPU'}", flush=True)
    from ray_dpo.tracking.callback import FAILURE_TAG

    tracker.set_tags({FAILURE_TAG: ""})  # a failure of an earlier invocation is not this one's
    try:
        result = trainer.fit()  # raises TrainingFailedError once policy.max_failures are spent
    except TrainingFailedError as err:
        raise _run_failed(cfg, tracker, err) from err
    return result


def elastic_min_workers(cfg: RunConfig) -> int | None:
    """policy.min_workers when the group may shrink below policy.num_workers, else None."""
    low = cfg.policy.min_workers
    return low if low is not None and low < cfg.policy.num_workers else None


def _log_exported_model(cfg: RunConfig, tracker, exported: dict) -> None:
    """Copy the exported model's files into the MLflow run (model/<adapter|hf_model>/) when
    they fit tracking.mlflow.log_model_max_mb; else the tags are the link, and the console says so."""
    limit = cfg.tracking.mlflow.log_model_max_mb * 1e6
    for name, path in exported.items():
        if not path or "://" in path:
            continue
        size = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
        if size <= limit:
            tracker.client.log_artifacts(tracker.run_id, path, artifact_path=f"model/{name}")
        else:
            print(f"[ray_dpo] {name}/ ({size / 1e6:.0f} MB) is linked from the MLflow run (tag ray_dpo.{name}), "
                  f"not copied into it: tracking.mlflow.log_model_max_mb is {cfg.tracking.mlflow.log_model_max_mb:g}",
                  flush=True)


def _run_failed(cfg: RunConfig, tracker, error: BaseException) -> BaseException:
    """The one-line error of a run whose worker failures are exhausted (faults.failure_line),
    from what the callback recorded in MLflow."""
    from ray_dpo import faults
    from ray_dpo.tracking.callback import FAILURE_TAG

    try:
        failure = faults.Failure.from_json(tracker.client.get_run(tracker.run_id).data.tags.get(FAILURE_TAG))
    except Exception:  # noqa: BLE001 - the message is then less precise, nothing more
        failure = None
    return faults.RunFailedError(faults.failure_line(failure, max_failures=cfg.policy.max_failures,
                                                     error=error))


def _summarize(cfg: RunConfig, tracker, result, total_steps: int, report: dict, seconds: float) -> TrainSummary:
    ckpt = result.checkpoint.path if result.checkpoint is not None else None
    hf, adapter = (os.path.join(ckpt, name) if ckpt and os.path.isdir(os.path.join(ckpt, name)) else None
                   for name in ("hf_model", "adapter"))
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    tracker.set_tags({key: path for key, path in (("ray_dpo.hf_model", hf), ("ray_dpo.adapter", adapter)) if path})
    _log_exported_model(cfg, tracker, {"adapter": adapter, "hf_model": hf})
    heldout = {key: span for key in HELDOUT_METRICS if (span := tracker.first_and_last(key))}
    return TrainSummary(run_id=tracker.run_id, tracking_uri=tracker.uri,
                        experiment=cfg.tracking.mlflow.experiment, steps=total_steps,
                        checkpoint_path=ckpt, hf_model_path=hf, adapter_path=adapter, final_metrics=metrics,
                        data_report=report, seconds=seconds, heldout=heldout)
