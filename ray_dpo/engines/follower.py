"""PolicyFollower: generation engines that follow the policy, and the held-out evaluator on them.

Policy rank 0 calls it at every sync point (rounds.sync_points):

    sync_points() -> steps, probe() -> probe items, sync_spec() -> how rank 0 sends weights
    advance(step, [weights_ref] | None, expected_probe_logps) -> sync metrics
        weights -> every engine (online.weight_sync), probe re-scored by every engine:
            |engine - policy| > online.sync_tolerance  ->  WeightSyncError (the run stops)
    collective weight sync: begin_collective(step, ticket) (the engines join rank 0's
        group), rank 0 broadcasts, then advance(step, COLLECTIVE, expected); an engine that
        died meanwhile is restarted and advance returns {RETRY: 1}: rank 0 sends again
    needs_sync() -> None | RESEND | WEIGHTS, asked by rank 0 before each step's data:
        RESEND   this process restarted after the last sync: rank 0 sends it again
        WEIGHTS  (collective) an engine restarted between syncs waits for weights: rank 0
                 broadcasts its current ones, begin_collective then resync(step, expected)
        step is an eval point -> the held-out prompts are queued on the engines and scored
            in a thread (heldout.py): training goes on, eval/* are logged at that step
    finish() -> waits for the evals still running (the end of the run)

An offline run with eval.prompts_file runs one as its own actor (``start_follower``), so
its eval/judge_score and eval/kl compare with online runs'. The OnlineCoordinator is one
too, and also builds rounds from the engines' samples.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from ray_dpo.config import (DataConfig, EvalConfig, JudgeConfig, LoraSection, ModelConfig, OnlineConfig, RunConfig,
                            SamplingConfig)
from ray_dpo.config.derived import heldout_judge
from ray_dpo.engines.spec import EngineSpec, engine_spec, heldout_sampling
from ray_dpo.engines.weight_sync import random_probe
from ray_dpo.feeder import KeepsInitError
from ray_dpo.seams import ReferenceRows, RunLog, Scorer

logger = logging.getLogger("ray_dpo.engines")

PROBE_SIZE = 4
COLLECTIVE = "collective"
"""advance()'s weights when rank 0 has just broadcast them (begin_collective)."""
RETRY = "sync/retry"
"""In advance()'s answer: an engine died during the collective sync; rank 0 must send again."""
RESEND, WEIGHTS = "resend", "weights"
"""needs_sync's answers: send the last sync again (a restarted follower), or send the current
weights (an engine restarted between collective syncs waits for them)."""


@dataclass
class FollowerSpec:
    """The parts of a run's config the engines' side needs (sections, not the RunConfig)."""

    model: ModelConfig
    engines: EngineSpec  # backend, count, resources, weight sync, default sampling
    judge: JudgeConfig  # of the engines' samples: online.judge, or an offline run's held-out judge
    eval: EvalConfig
    eval_sampling: SamplingConfig  # the held-out prompts' (engines.spec.heldout_sampling)
    data: DataConfig  # prompt tokenization and length limits
    seed: int
    run_dir: str  # rounds and checkpoint weight syncs are written under it
    reference_batch_size: int
    max_restarts: int  # of each engine (policy.max_failures)
    eval_judge: JudgeConfig  # the held-out eval's (eval.judge, else online.judge)
    total_steps: Optional[int] = None  # the run's length (an online run computes its own)
    lora: LoraSection = field(default_factory=LoraSection)  # policy.lora: engines load adapters
    training_reference: str = "group"  # loss_rules.reference_source: who scores rounds' pairs
    eval_max_pairs: Optional[int] = None  # eval.max_pairs (an online run's data.eval_files pairs)
    max_steps: Optional[int] = None  # policy.max_steps: a cap on the online run, not on a round
    online: Optional[OnlineConfig] = None  # an online run's rounds (the coordinator's); None offline

    @classmethod
    def of(cls, cfg: RunConfig, *, total_steps: Optional[int] = None) -> "FollowerSpec":
        """An online run's (its round engines sample the held-out prompts too), or with
        total_steps an offline run's held-out evaluator (eval.backend, eval.judge)."""
        from ray_dpo.loss_rules import reference_source

        online = cfg.online if cfg.online.enabled else None
        return cls(model=cfg.model, engines=engine_spec(cfg), judge=online.judge if online else heldout_judge(cfg),
                   eval=cfg.eval, eval_sampling=heldout_sampling(cfg), data=cfg.data, seed=cfg.run.seed,
                   run_dir=cfg.run_dir, reference_batch_size=cfg.reference.batch_size,
                   max_restarts=cfg.policy.max_failures, eval_judge=heldout_judge(cfg), total_steps=total_steps,
                   lora=cfg.policy.lora, training_reference=reference_source(cfg),
                   eval_max_pairs=cfg.eval.max_pairs, max_steps=cfg.policy.max_steps, online=online)


class PolicyFollower:
    """See the module docstring. reference: ReferenceGroup (the eval's KL). tracking_uri /
    run_id: the MLflow run to log to (None: no logging). probe_rows: [(prompt ids,
    continuation ids)] to check synced weights on (None: random tokens)."""

    def __init__(self, spec: FollowerSpec, *, reference: Any, tracking_uri: Optional[str], run_id: Optional[str],
                 use_gpu: bool, probe_rows: Optional[list] = None):
        from ray_dpo.data.chat_template import resolve_chat_template
        from ray_dpo.data.tokenizer_cache import load_tokenizer
        from ray_dpo.engines.engine_group import GenerationGroup
        from ray_dpo.engines.facts import ENGINES
        from ray_dpo.engines.judges import build_judge

        self.spec = spec
        self.reference = reference
        self.tokenizer = load_tokenizer(spec.model.tokenizer or spec.model.name_or_path,
                                        resolve_chat_template(spec.model.chat_template))
        self._total = spec.total_steps
        self._probe = probe_rows or random_probe(len(self.tokenizer), num_sequences=PROBE_SIZE, seed=spec.seed)
        self.judge = build_judge(spec.judge, use_gpu=use_gpu, dtype=spec.model.dtype)
        self.eval_judge = self.judge if spec.eval_judge == spec.judge else build_judge(
            spec.eval_judge, use_gpu=use_gpu, dtype=spec.model.dtype)
        self.judge_lock = threading.Lock()  # rounds and evals score in different threads
        engine_options = {}
        if spec.model.tokenizer:  # model.tokenizer: the model directory may hold none (the engines decode with it)
            engine_options["tokenizer"] = spec.model.tokenizer
        if ENGINES.get(spec.engines.backend).takes_max_model_len:
            new_tokens = max(spec.engines.sampling.max_new_tokens, spec.eval_sampling.max_new_tokens)
            engine_options["max_model_len"] = spec.data.max_length + new_tokens
        if spec.lora.enabled and spec.lora.sync == "adapter":
            engine_options["lora_rank"] = spec.lora.rank  # engines serve the base model + the policy's adapter
        self.generation = GenerationGroup(
            model_path=spec.model.name_or_path, spec=spec.engines, use_gpu=use_gpu, dtype=spec.model.dtype,
            seed=spec.seed, engine_options=engine_options, max_restarts=spec.max_restarts)
        self.evaluator = make_evaluator(self)
        self._tracking = (tracking_uri, run_id)
        self._client = None
        self._error: Optional[BaseException] = None
        self._pending = None  # a collective sync's engine calls (begin_collective -> advance)
        self._advanced = False  # an advance reached this process (after a restart: not yet)

    # ------------------------------------------------------------------ what rank 0 calls

    def ping(self) -> bool:
        return True

    def sync_points(self) -> list[int]:
        return self.evaluator.points(self._total)

    def probe(self) -> list:
        return self._probe

    def sync_spec(self) -> dict:
        """How rank 0 sends weights: online.weight_sync, and for the collective method the
        bucket size, the group's timeout and its size (rank 0 + the engines)."""
        engines = self.spec.engines
        return {"method": engines.weight_sync, "bucket_bytes": engines.bucket_bytes,
                "timeout_s": engines.sync_timeout_s, "world_size": 1 + self.generation.num_engines}

    def begin_collective(self, step: int, ticket: Any) -> None:
        """The first half of a collective sync at ``step``: every engine is asked to join the
        ticket's group; rank 0 broadcasts once this returns, then calls advance(step, COLLECTIVE)."""
        try:
            if self._error is not None:
                raise self._error
            self._pending = self.generation.start_sync(ticket, method=COLLECTIVE, version=step)
        except BaseException as err:
            self.fail(err)
            raise

    def collective_problem(self) -> Optional[str]:
        """While rank 0 waits for the engines to join a collective sync: why one never will
        (its load call already failed: the engine was dead when it was sent, or this process
        restarted and has no sync pending), or None."""
        import ray

        pending = self._pending
        if pending is None:
            return "the follower has no collective sync pending (it was restarted)"
        done, _ = ray.wait(pending.refs, num_returns=len(pending.refs), timeout=0)
        for ref in done:  # an engine's receive cannot end before rank 0 broadcasts: this one failed
            try:
                ray.get(ref)
            except Exception as err:  # noqa: BLE001 -- named in the line rank 0 prints
                from ray_dpo.engines.engine_restarts import error_line

                return f"generation engine {pending.refs.index(ref)} cannot join: {error_line(err)}"
        return None

    def engine_actor_ids(self) -> list[str]:
        """The generation engines' Ray actor ids, whose restarts MLflow counts."""
        return self.generation.actor_ids

    def needs_sync(self) -> Optional[str]:
        """What rank 0 must send before it goes on (None: nothing). RESEND: this process was
        restarted after the last sync, and what that sync started (the coordinator's rounds)
        died with the old process; answered once per process, since the caller sends it now.
        A held-out evaluator needs no resend: the next eval point brings the weights.
        WEIGHTS: an engine restarted between collective syncs waits for weights (engine_restarts)."""
        if self.RESTARTS_ROUNDS and not self._advanced:
            self._advanced = True
            return RESEND
        return WEIGHTS if self.generation.keeper.awaiting else None

    RESTARTS_ROUNDS = False
    """The coordinator: its rounds start at syncs, so a restart needs the last one again."""

    def advance(self, step: int, weights: Optional[list], expected: list[float]) -> dict[str, float]:
        """Step ``step`` reached: load the policy's weights (``[ObjectRef]``; None: the engines
        already hold them, e.g. at step 0), verify them on the probe, then start what this
        step starts (an eval; rounds in the coordinator). Returns (and logs) sync/*."""
        self._advanced = True
        try:
            if self._error is not None:
                raise self._error
            busy = self.evaluator.still_sampling()
            metrics = self._sync_weights(step, weights, expected)
            if RETRY in metrics:
                return metrics
            if busy:
                _warn_eval_behind(step, busy, metrics["sync/seconds"], self.spec.eval.every_steps)
            self.log(metrics, step)
            self._started(step)
            if step in self.evaluator.points(self._total):
                self.evaluator.start(step)
        except BaseException as err:
            self.fail(err)
            raise
        return metrics

    def resync(self, step: int, expected: list[float]) -> dict[str, float]:
        """The second half of a collective sync that only brings the engines to the policy's
        current weights (``step``: the steps they have trained), after needs_sync said WEIGHTS:
        no eval, no round, no metrics logged. {RETRY: 1} when an engine died during it."""
        try:
            if self._error is not None:
                raise self._error
            metrics = self._sync_weights(step, COLLECTIVE, expected)
            if RETRY not in metrics:
                print(f"[ray_dpo] step {step}: the restarted engine(s) got the policy's current weights; "
                      "their unfinished samples are generated from them", flush=True)
            return metrics
        except BaseException as err:
            self.fail(err)
            raise

    def finish(self, timeout_s: Optional[float] = None) -> None:
        """Wait for the evals still running; raise the first error the engines' side had."""
        self.evaluator.wait(timeout_s)
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        for judge in {id(j): j for j in (self.judge, self.eval_judge)}.values():
            judge.shutdown()
        self.generation.shutdown()

    # ------------------------------------------------------------------ for the parts

    def _started(self, step: int) -> None:
        """What else step ``step`` starts (the coordinator: rounds)."""

    def _sync_weights(self, step: int, weights: Optional[list], expected: list[float]) -> dict[str, float]:
        from ray_dpo.engines.facts import SYNC_METHODS

        from ray_dpo.engines.engine_group import SyncInterrupted

        t0, engines = time.perf_counter(), self.spec.engines
        if weights is None:
            diff = self.generation.verify(self._probe, expected)
            metrics = {"sync/seconds": time.perf_counter() - t0, "sync/max_logprob_diff": diff}
        elif weights == COLLECTIVE:
            pending, self._pending = self._pending, None
            if pending is None:  # this process restarted after begin_collective (Ray resent the call)
                return {RETRY: 1.0}
            try:
                metrics = self.generation.finish_sync(pending, probe=self._probe, expected=expected).metrics()
            except SyncInterrupted as err:
                print(f"[ray_dpo] step {step}: {err}", flush=True)
                return {RETRY: 1.0}
        else:
            options = {}
            if SYNC_METHODS.get(engines.weight_sync).needs_checkpoint_dir:
                options["checkpoint_dir"] = os.path.join(self.spec.run_dir, "weight_sync")
            metrics = self.generation.sync_weights(weights[0], probe=self._probe, expected=expected,
                                                   version=step, **options).metrics()
        print(f"[ray_dpo] step {step}: weights synced to {self.generation.num_engines} {engines.backend} "
              f"engine(s) in {metrics['sync/seconds']:.2f}s, max |log-prob diff| "
              f"{metrics['sync/max_logprob_diff']:.2e} (tolerance {engines.sync_tolerance:g})", flush=True)
        return metrics

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def fail(self, err: BaseException) -> None:
        if self._error is None:
            self._error = err

    def log(self, metrics: dict[str, float], step: int) -> None:
        run = self._run()
        if run is None or not metrics:
            return
        from ray_dpo.tracking.mlflow_sink import log_metrics

        log_metrics(run[0], run[1], {k: v for k, v in metrics.items() if math.isfinite(v)}, step)

    def log_artifact(self, text: str, path: str) -> None:
        """Write ``text`` as the file ``path`` of the run's artifacts (the held-out eval's
        per-sample records); nothing without tracking."""
        run = self._run()
        if run is not None:
            run[0].log_text(run[1], text, path)

    def _run(self) -> Optional[tuple[Any, str]]:
        """(MlflowClient, run id) of the run to log to, None without tracking."""
        uri, run_id = self._tracking
        if not uri or not run_id:
            return None
        if self._client is None:
            from ray_dpo.tracking.mlflow_sink import mlflow_client

            self._client = mlflow_client(uri)
        return self._client, run_id


def _warn_eval_behind(step: int, busy: list[int], seconds: float, every: int) -> None:
    """The engines were still on an earlier held-out eval when step ``step``'s weights came:
    the sync (and so training) waited behind it. Say so once per sync, with the way out."""
    cost = f"an eval point takes the engine longer than {every} steps take" if every else "the eval was not done"
    logger.warning("step %d: the held-out eval of step %s was still running, so this weight sync waited behind "
                   "it on the engine (%.1f s, training waited too): %s. Raise eval.every_steps, lower "
                   "eval.num_prompts or eval.samples_per_prompt, or give the engine CPUs/GPUs of its own.",
                   step, ", ".join(map(str, busy)), seconds, cost)


def make_evaluator(follower: "PolicyFollower"):
    """The follower's HeldOutEvaluator: its engines, eval judge and logger (metrics and the
    per-sample records), eval.* prompts."""
    from ray_dpo.data.tokenize import PairTokenizer
    from ray_dpo.engines.evaluation import load_prompts, select_prompts
    from ray_dpo.engines.heldout import HeldOutEvaluator

    prompts, path = [], follower.spec.eval.prompts_file
    if path:
        encode = PairTokenizer(follower.tokenizer, follower.spec.data).encode_prompt
        chosen = select_prompts(load_prompts(path), num=follower.spec.eval.num_prompts, seed=follower.spec.seed)
        prompts = [(p.prompt, encode(p.prompt, source=path, line=i)) for i, p in enumerate(chosen, start=1)]
    spec = follower.spec
    return HeldOutEvaluator(spec.eval, prompts=prompts, generation=follower.generation,
                            scorer=Scorer(follower.eval_judge, follower.decode, follower.judge_lock),
                            reference=ReferenceRows(follower.reference, spec.reference_batch_size),
                            sampling=spec.eval_sampling, seed=spec.seed,
                            run=RunLog(follower.log, follower.fail, follower.log_artifact))


class _FollowerActor(KeepsInitError, PolicyFollower):
    """PolicyFollower as an actor whose constructor errors reach start_actor intact."""


def start_actor(actor_cls: type, *args: Any, max_concurrency: int, max_restarts: int,
                start_timeout_s: float = 900.0, **kwargs: Any) -> Any:
    """``actor_cls`` as a threaded actor on this node (num_cpus=0: it must never wait for a CPU the
    workers hold), restarted by Ray up to ``max_restarts`` times with the calls in flight
    sent again; returns once it is up. Constructor errors (a bad judge spec, an engine that
    cannot load the model) are raised here."""
    handle = launch_actor(actor_cls, *args, max_concurrency=max_concurrency, max_restarts=max_restarts, **kwargs)
    return await_actor(handle, start_timeout_s)


def launch_actor(actor_cls: type, *args: Any, max_concurrency: int, max_restarts: int, **kwargs: Any) -> Any:
    """start_actor without the wait: the actor's constructor runs while the caller goes on;
    ``await_actor`` waits for it and raises its errors."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ray_dpo.console import RESTART_ARGS_NOTICE, without_native_lines

    with without_native_lines(RESTART_ARGS_NOTICE):
        return ray.remote(actor_cls).options(
            num_cpus=0, max_concurrency=max_concurrency, max_restarts=max_restarts,
            max_task_retries=-1 if max_restarts else 0,
            # Hard affinity: Ray 2.60 places a num_cpus=0 actor with soft affinity on any node,
            # and a lost node would then take the coordinator with the role it lost.
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(),
                                                               soft=False),
        ).remote(*args, **kwargs)


def await_actor(handle: Any, start_timeout_s: float = 900.0) -> Any:
    """``handle`` once its constructor has returned; its error (the actor is killed) if it raised."""
    import ray

    try:
        ray.get(handle.ping.remote(), timeout=start_timeout_s)
    except ray.exceptions.RayTaskError as err:
        ray.kill(handle)
        raise err.cause from None
    return handle


def start_follower(cfg: RunConfig, *, reference: Any, total_steps: int, tracking_uri: Optional[str] = None,
                   run_id: Optional[str] = None, use_gpu: bool = False) -> Any:
    """The held-out evaluator of an offline run, as an actor the policy workers sync."""
    return await_follower(launch_follower(cfg, reference=reference, total_steps=total_steps,
                                          tracking_uri=tracking_uri, run_id=run_id, use_gpu=use_gpu), cfg)


def launch_follower(cfg: RunConfig, *, reference: Any, total_steps: int, tracking_uri: Optional[str] = None,
                    run_id: Optional[str] = None, use_gpu: bool = False) -> Any:
    """start_follower without the wait: its engines load while the caller goes on (the
    driver's reference pass); ``await_follower`` before the workers use it."""
    return launch_actor(_FollowerActor, FollowerSpec.of(cfg, total_steps=total_steps), reference=reference,
                        tracking_uri=tracking_uri, run_id=run_id, use_gpu=use_gpu,
                        max_concurrency=4, max_restarts=cfg.policy.max_failures)


def await_follower(handle: Any, cfg: RunConfig) -> Any:
    """The launched follower once its engines are up (their load errors raised here)."""
    await_actor(handle)
    engines = engine_spec(cfg)
    print(f"[ray_dpo] held-out eval: {engines.num_engines} {engines.backend} engine(s) ready", file=sys.stdout,
          flush=True)
    return handle

