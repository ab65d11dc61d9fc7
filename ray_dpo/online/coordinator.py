"""OnlineCoordinator: the policy workers' feeder for online DPO, and their link to the engines.

One threaded Ray actor on the driver's node (``start_coordinator``). It owns the generation
engines (GenerationGroup) and the judge, and talks to the policy workers through two
interfaces:

  feeder     total_steps, steps_per_epoch, num_pairs_in_step, get_step, get_eval
             (BatchFeeder's; online runs only). Round r is served by its own BatchFeeder,
             built from that round's pairs, whose prefetch thread streams reference
             log-probs exactly as offline.
  sync       sync_points() -> steps, probe() -> probe items,
             sync(step, [weights_ref] | None, expected_probe_logps) -> metrics
             Rank 0 calls sync at every sync point (rounds.sync_points) with the full
             state dict in the object store and the policy's log-probs on the probe.

What sync(k) does, in order:

    weights -> every engine (online.weight_sync), probe re-scored by every engine:
        |engine - policy| > online.sync_tolerance  ->  WeightSyncError (the run stops)
    k is an eval point        -> sample the held-out prompts, judge, KL to the reference
    k starts round r          -> generate -> judge -> pairs -> round r's feeder
                                 (online.overlap: round r was generated during round r-1;
                                 round r+1 starts generating now, one round stale)

Offline runs with eval.prompts_file use the same actor without rounds (``train=None``):
only the sync interface, so eval/judge_score and eval/kl compare across modes.

The coordinator logs what it measures straight to the run's MLflow run, at step k:
sync/seconds, sync/max_logprob_diff, online/* of each round and the held-out eval/*.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import threading
import time
from typing import Any, Optional

from ray_dpo.config import RunConfig
from ray_dpo.feeder import BatchFeeder, BatchPlan, FeederError, KeepsInitError, PairStore
from ray_dpo.online import rounds as rounds_lib

logger = logging.getLogger("ray_dpo.online")

PROBE_SIZE = 4
EVAL_SEED_OFFSET = 7919  # every eval samples with the same seed: differences come from the policy


class _Round:
    """One round's pairs (feeder None: the round kept no pair)."""

    def __init__(self, feeder: Optional[BatchFeeder]):
        self.feeder = feeder

    def total_steps(self) -> int:
        return self.feeder.total_steps() if self.feeder is not None else 0


class OnlineCoordinator:
    """See the module docstring.

    cfg: the run's RunConfig (absolute paths). train: PairData whose prompts (and chosen
    responses, for regenerate_rejected) rounds sample from; None for eval-only (offline).
    evaluation: data.eval_files pairs for the DPO eval metrics, or None. reference:
    ReferenceGroup. tracking_uri / run_id: the MLflow run to log to (None: no logging).
    use_gpu: engines and reward-model judges on GPUs.
    """

    def __init__(self, cfg: RunConfig, *, train: Any, evaluation: Any, reference: Any,
                 tracking_uri: Optional[str], run_id: Optional[str], use_gpu: bool,
                 total_steps: Optional[int] = None):
        from ray_dpo.data.chat_template import resolve_chat_template
        from ray_dpo.data.tokenizer_cache import load_tokenizer
        from ray_dpo.data.tokenize import PairTokenizer
        from ray_dpo.online.engine_group import GenerationGroup
        from ray_dpo.online.generation import ENGINES
        from ray_dpo.online.judges import build_judge
        from ray_dpo.online.round_store import RoundStore

        self.cfg = cfg
        self.reference = reference
        self.tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                                        resolve_chat_template(cfg.model.chat_template))
        self._prompt_tokenizer = PairTokenizer(self.tokenizer, cfg.data)
        self.plan = BatchPlan(
            num_workers=cfg.policy.num_workers, micro_batch_size=cfg.policy.micro_batch_size,
            gradient_accumulation_steps=cfg.policy.gradient_accumulation_steps,
            num_epochs=cfg.policy.num_epochs, seed=cfg.run.seed, shuffle=cfg.data.shuffle,
        )
        self.store = PairStore.from_source(train) if train is not None else None
        self.evaluation = PairStore.from_source(evaluation) if evaluation is not None else None
        if self.store is not None:
            self.rounds = rounds_lib.plan_rounds(
                num_rounds=cfg.online.rounds, prompts_per_round=cfg.online.prompts_per_round,
                global_batch=self.plan.global_batch, num_epochs=cfg.policy.num_epochs,
                max_steps=cfg.policy.max_steps)
            self._total = self.rounds.total_steps
            self.round_store = RoundStore(cfg.run_dir, round_fingerprint(cfg, getattr(train, "fingerprint", "")))
        else:
            self.rounds = None
            self._total = total_steps  # eval-only: the offline feeder's
        self.eval_prompts = self._load_eval_prompts()
        self._probe = self._make_probe()
        self.judge = build_judge(cfg.online.judge, use_ray=False, use_gpu=use_gpu, dtype=cfg.model.dtype)
        engine_options = {}
        if ENGINES.get(cfg.online.backend).takes_max_model_len:
            engine_options["max_model_len"] = cfg.data.max_length + cfg.online.sampling.max_new_tokens
        self.generation = GenerationGroup(
            model_path=cfg.model.name_or_path, config=cfg.online, use_gpu=use_gpu, dtype=cfg.model.dtype,
            seed=cfg.run.seed, engine_options=engine_options, max_restarts=cfg.policy.max_failures)
        self._tracking = (tracking_uri, run_id)
        self._client = None

        self._cond = threading.Condition()
        self._rounds: dict[int, _Round] = {}
        self._pending: set[int] = set()  # rounds being built in a background thread
        self._loading: set[int] = set()  # rounds being read back from the round store
        self._eval_ref_cache: dict[str, tuple[float, float]] = {}
        self._error: Optional[BaseException] = None
        self._closed = False

    # ------------------------------------------------------------------ setup

    def _load_eval_prompts(self) -> list[tuple[Any, list[int]]]:
        """[(prompt as the judge sees it, prompt token ids)] of the held-out set, or []."""
        from ray_dpo.online.evaluation import load_prompts, select_prompts

        path = self.cfg.eval.prompts_file
        if not path:
            return []
        prompts = select_prompts(load_prompts(path), num=self.cfg.eval.num_prompts, seed=self.cfg.run.seed)
        return [(p.prompt, self._prompt_tokenizer.encode_prompt(p.prompt, source=path, line=i))
                for i, p in enumerate(prompts, start=1)]

    def _make_probe(self) -> list[tuple[list[int], list[int]]]:
        """A fixed probe: the first train pairs' prompt + chosen; random tokens when eval-only."""
        if self.store is not None:
            rows = [self.store.row(i) for i in range(min(PROBE_SIZE, len(self.store)))]
            return [(r["prompt_ids"], r["chosen_ids"]) for r in rows]
        from ray_dpo.online.weight_sync import random_probe

        return random_probe(len(self.tokenizer), num_sequences=PROBE_SIZE, seed=self.cfg.run.seed)

    # ------------------------------------------------------------------ sync interface

    def ping(self) -> bool:
        return True

    def engine_actor_ids(self) -> list[str]:
        """The generation engines' Ray actor ids, whose restarts MLflow counts."""
        return self.generation.actor_ids

    def sync_points(self) -> list[int]:
        return rounds_lib.sync_points(
            total_steps=self._total, steps_per_round=self.rounds.steps_per_round if self.rounds else None,
            eval_every=self.cfg.eval.every_steps, eval_sampling=bool(self.eval_prompts))

    def probe(self) -> list[tuple[list[int], list[int]]]:
        return self._probe

    def sync(self, step: int, weights: Optional[list], expected: list[float]) -> dict[str, float]:
        """Load the policy's weights (``[ObjectRef]``; None: the engines already hold them,
        e.g. at step 0), verify them on the probe, then evaluate and/or start a round.
        Returns (and logs) the sync/ and held-out eval/ metrics; a round logs its own."""
        try:
            metrics = self._sync_weights(step, weights, expected)
            if step in self._eval_points():
                metrics.update(self._evaluate())
            self._log(metrics, step)
            if self.rounds is not None and step < self._total:
                self._start_round_at(step)
        except BaseException as err:
            self._fail(err)
            raise
        return metrics

    def _eval_points(self) -> set[int]:
        if not self.eval_prompts:
            return set()
        return set(rounds_lib.sync_points(total_steps=self._total, steps_per_round=None,
                                          eval_every=self.cfg.eval.every_steps, eval_sampling=True))

    def _sync_weights(self, step: int, weights: Optional[list], expected: list[float]) -> dict[str, float]:
        from ray_dpo.online.weight_sync import SYNC_METHODS

        t0 = time.perf_counter()
        if weights is None:
            diff = self.generation.verify(self._probe, expected)
            metrics = {"sync/seconds": time.perf_counter() - t0, "sync/max_logprob_diff": diff}
        else:
            options = {}
            if SYNC_METHODS.get(self.cfg.online.weight_sync).needs_checkpoint_dir:
                options["checkpoint_dir"] = os.path.join(self.cfg.run.storage_path, self.cfg.run.name,
                                                         "weight_sync")
            report = self.generation.sync_weights(weights[0], probe=self._probe, expected=expected, **options)
            metrics = report.metrics()
        print(f"[ray_dpo] step {step}: weights synced to {self.generation.num_engines} "
              f"{self.cfg.online.backend} engine(s) in {metrics['sync/seconds']:.2f}s, max |log-prob diff| "
              f"{metrics['sync/max_logprob_diff']:.2e} (tolerance {self.cfg.online.sync_tolerance:g})", flush=True)
        return metrics

    # ------------------------------------------------------------------ rounds

    def _start_round_at(self, step: int) -> None:
        """Make sure the round that ``step`` is in exists (built, or read back from the round
        store); start building the next one when overlapping."""
        r = self.rounds.round_of(step)
        with self._cond:
            building = r in self._pending
        if not building and not self._load_round(r):
            self._produce_round(r, self._submit_round(r))
        if self.cfg.online.overlap and r + 1 < self.rounds.rounds_run:
            with self._cond:
                start = r + 1 not in self._rounds and r + 1 not in self._pending
            if start and not self._load_round(r + 1):
                self._start_background(r + 1)

    def _load_round(self, r: int) -> bool:
        """Round r is here, or was read back from the round store (a resumed run, restarted
        workers, a restarted coordinator): True. False: it must be generated."""
        with self._cond:
            while r in self._loading:
                self._cond.wait(timeout=1.0)
            if r in self._rounds:
                return True
            self._loading.add(r)
        try:
            saved = self.round_store.load(r)
            if saved is not None:
                self._install_round(r, saved.rows)
                print(f"[ray_dpo] online round {r + 1}/{self.rounds.rounds_run}: {len(saved.rows)} pairs read back "
                      f"from {saved.path} (built before the restart, not generated again)", flush=True)
            return saved is not None
        finally:
            with self._cond:
                self._loading.discard(r)
                self._cond.notify_all()

    def _submit_round(self, r: int) -> tuple[list[int], list]:
        indices = rounds_lib.round_prompt_indices(len(self.store), per_round=self.cfg.online.prompts_per_round,
                                                  round_index=r, seed=self.cfg.run.seed)
        prompts = [self.store.row(i)["prompt_ids"] for i in indices]
        chunks = self.generation.submit(prompts, seed=self.cfg.run.seed + 1_000_003 * (r + 1))
        return indices, chunks

    def _start_background(self, r: int) -> None:
        submitted = self._submit_round(r)  # submitted now: these samples come from the weights just synced

        def work():
            try:
                self._produce_round(r, submitted)
            except BaseException as err:  # noqa: BLE001 - handed to the workers waiting for round r
                self._fail(err)
            finally:
                with self._cond:
                    self._pending.discard(r)
                    self._cond.notify_all()

        with self._cond:
            self._pending.add(r)
        threading.Thread(target=work, name=f"online-round-{r}", daemon=True).start()

    def _produce_round(self, r: int, submitted: tuple[list[int], list]) -> None:
        """generate (already submitted) -> judge -> pairs -> rows -> the round store -> round r's feeder."""
        from ray_dpo.online.round_builder import build_round

        indices, chunks = submitted
        t0 = time.perf_counter()
        completions = self.generation.collect(chunks)
        built = build_round(r, rows=[self.store.row(i) for i in indices], completions=completions, judge=self.judge,
                            decode=self._text, online=self.cfg.online, data=self.cfg.data,
                            bos_id=self.tokenizer.bos_token_id, gen_seconds=time.perf_counter() - t0,
                            rounds_run=self.rounds.rounds_run)
        self.round_store.save(r, built.rows, built.metrics)
        self._install_round(r, built.rows)
        print(f"[ray_dpo] {built.summary}", flush=True)
        self._log(built.metrics, self.rounds.round_start(r))

    def _install_round(self, r: int, rows: list[dict]) -> None:
        """Serve round r's pair rows (none: its steps train nothing) through a BatchFeeder."""
        feeder = None
        if rows:
            feeder = BatchFeeder(rows, self.plan, reference=self.reference,
                                 ref_cache=dict(self._eval_ref_cache) or None, evaluation=self.evaluation,
                                 eval_max_pairs=self.cfg.eval.max_pairs)
        with self._cond:
            self._rounds[r] = _Round(feeder)
            self._retire(r)
            self._cond.notify_all()

    def _retire(self, newest: int) -> None:
        """Close feeders two rounds back (holding self._cond); keep their eval log-probs."""
        for r in [r for r in self._rounds if r < newest - 1]:
            old = self._rounds.pop(r)
            if old.feeder is not None:
                self._keep_eval_logps(old.feeder)
                old.feeder.close()

    def _keep_eval_logps(self, feeder: BatchFeeder) -> None:
        if self.evaluation is None or len(self._eval_ref_cache) >= len(self.evaluation):
            return
        eval_ids = {self.evaluation.pair_id(i) for i in range(len(self.evaluation))}
        for pid, c, rj in zip(*feeder.scored_ref_logps()):
            if pid in eval_ids:
                self._eval_ref_cache[pid] = (c, rj)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _texts(self, completions: list) -> list[str]:
        """What the judge reads: each completion's text (decoded here if the engine had no tokenizer)."""
        return [c.text if c.text is not None else self._text(c.token_ids) for c in completions]

    # ------------------------------------------------------------------ held-out eval

    def _evaluate(self) -> dict[str, float]:
        """Sample the held-out prompts from the (synced) policy; judge score and KL."""
        from ray_dpo.online.evaluation import as_pair_rows, eval_metrics, eval_sampling

        ids = [p_ids for _, p_ids in self.eval_prompts]
        n = self.cfg.eval.samples_per_prompt
        completions = self.generation.generate(ids, n=n, sampling=eval_sampling(self.cfg.online.sampling),
                                               seed=self.cfg.run.seed + EVAL_SEED_OFFSET)
        flat = [c for comps in completions for c in comps]
        prompts = [p for p, _ in self.eval_prompts for _ in range(n)]
        scores = self.judge.score(prompts, self._texts(flat))
        rows = as_pair_rows([p for p in ids for _ in range(n)], [c.token_ids for c in flat])
        size = self.cfg.reference.batch_size
        scored = [r for batch in self.reference.score_batches(rows[i:i + size] for i in range(0, len(rows), size))
                  for r in batch]
        return eval_metrics(scores=scores, policy_logps=[c.logprob_sum for c in flat],
                            ref_logps=[r["ref_chosen_logp"] for r in scored],
                            response_lengths=[len(c.token_ids) for c in flat])

    # ------------------------------------------------------------------ feeder interface

    def total_steps(self) -> int:
        return self._total

    def steps_per_epoch(self) -> int:
        """Steps per round: the reported "epoch" counts rounds."""
        return self.rounds.steps_per_round

    def num_pairs_in_step(self, step: int) -> int:
        rnd, local = self._round_for(step)
        return rnd.feeder.num_pairs_in_step(local) if local < rnd.total_steps() else 0

    def get_step(self, step: int, rank: int) -> list[list[dict]]:
        """Round r's step (BatchFeeder.get_step); an empty step past the pairs the round kept."""
        rnd, local = self._round_for(step)
        if local < rnd.total_steps():
            return rnd.feeder.get_step(local, rank)
        return [[] for _ in range(self.plan.gradient_accumulation_steps)]

    def get_eval(self, rank: int) -> list[list[dict]]:
        with self._cond:
            feeders = [self._rounds[r].feeder for r in sorted(self._rounds, reverse=True)
                       if self._rounds[r].feeder is not None]
        return feeders[0].get_eval(rank) if feeders else []

    def _round_for(self, step: int) -> tuple[_Round, int]:
        if self.rounds is None:
            raise FeederError("this coordinator serves no training steps (eval-only)")
        if not 0 <= step < self._total:
            raise ValueError(f"step must be in [0, {self._total}), got {step!r}")
        r = self.rounds.round_of(step)
        with self._cond:
            ready = r in self._rounds or r in self._pending
        if not ready:
            self._load_round(r)  # a round built before a restart; else the sync that builds it comes
        with self._cond:
            while r not in self._rounds:
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise FeederError("the coordinator was closed")
                self._cond.wait(timeout=1.0)
            return self._rounds[r], step - self.rounds.round_start(r)

    # ------------------------------------------------------------------ plumbing

    def _fail(self, err: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = err
            self._cond.notify_all()

    def _log(self, metrics: dict[str, float], step: int) -> None:
        uri, run_id = self._tracking
        if not uri or not run_id or not metrics:
            return
        from ray_dpo.tracking.mlflow_sink import log_metrics, mlflow_client as _client

        if self._client is None:
            self._client = _client(uri)
        log_metrics(self._client, run_id, {k: v for k, v in metrics.items() if math.isfinite(v)}, step)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            feeders = [r.feeder for r in self._rounds.values() if r.feeder is not None]
            self._cond.notify_all()
        for feeder in feeders:
            feeder.close()
        self.judge.shutdown()
        self.generation.shutdown()


def round_fingerprint(cfg: RunConfig, data_fingerprint: str) -> dict:
    """What a saved round must match to be reused (round_store): the same prompts in the same
    order, sampled from the same model with the same settings, paired the same way."""
    online = cfg.online
    return {"seed": cfg.run.seed, "model": cfg.model.name_or_path, "data": data_fingerprint,
            "rounds": online.rounds, "prompts_per_round": online.prompts_per_round,
            "samples_per_prompt": online.samples_per_prompt, "pair_strategy": online.pair_strategy,
            "sampling": dataclasses.asdict(online.sampling), "judge": dataclasses.asdict(online.judge),
            "max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length,
            "global_batch": cfg.policy.num_workers * cfg.policy.micro_batch_size
            * cfg.policy.gradient_accumulation_steps}


class _CoordinatorActor(KeepsInitError, OnlineCoordinator):
    """OnlineCoordinator as an actor whose constructor errors reach start_coordinator intact."""


def start_coordinator(cfg: RunConfig, *, train: Any, evaluation: Any, reference: Any,
                      tracking_uri: Optional[str] = None, run_id: Optional[str] = None,
                      use_gpu: bool = False, total_steps: Optional[int] = None,
                      start_timeout_s: float = 900.0) -> Any:
    """Start the coordinator actor on this node and wait until its engines are up.

    num_cpus=0 (like the feeder: it must never wait for a CPU the workers hold); threaded
    so every rank can block in get_step while rank 0 syncs. Constructor errors (a bad
    judge spec, an engine that cannot load the model) are raised here. total_steps: the
    run's length, for an eval-only coordinator (offline runs).

    A coordinator that dies is restarted by Ray (up to policy.max_failures times) with the
    same arguments, and the calls in flight are sent to the new process: a sync runs again
    (weights, probe, eval, the round it starts), a get_step reads its round back from the
    round store. Its engines, children of the old process, start anew with it.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    handle = ray.remote(_CoordinatorActor).options(
        num_cpus=0, max_concurrency=cfg.policy.num_workers + 4,
        max_restarts=cfg.policy.max_failures, max_task_retries=-1 if cfg.policy.max_failures else 0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(),
                                                           soft=True),
    ).remote(cfg, train=train, evaluation=evaluation, reference=reference, tracking_uri=tracking_uri,
             run_id=run_id, use_gpu=use_gpu, total_steps=total_steps)
    try:
        ray.get(handle.ping.remote(), timeout=start_timeout_s)
    except ray.exceptions.RayTaskError as err:
        ray.kill(handle)
        raise err.cause from None
    print(f"[ray_dpo] generation: {cfg.online.num_engines} {cfg.online.backend} engine(s) ready", file=sys.stdout,
          flush=True)
    return handle
