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

import logging
import math
import os
import sys
import threading
import time
from typing import Any, Optional

import numpy as np

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
                 tracking_uri: Optional[str], run_id: Optional[str], use_gpu: bool):
        from ray_dpo.data.chat_template import resolve_chat_template
        from ray_dpo.data.pipeline import load_tokenizer
        from ray_dpo.data.tokenize import PairTokenizer
        from ray_dpo.online.generation import ENGINES, GenerationGroup
        from ray_dpo.online.judges import build_judge

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
        else:
            self.rounds = None
            self._total = None  # eval-only: set by the driver through set_total_steps
        self.eval_prompts = self._load_eval_prompts()
        self._probe = self._make_probe()
        self.judge = build_judge(cfg.online.judge, use_ray=False, use_gpu=use_gpu, dtype=cfg.model.dtype)
        engine_options = {}
        if ENGINES.get(cfg.online.backend).takes_max_model_len:
            engine_options["max_model_len"] = cfg.data.max_length + cfg.online.sampling.max_new_tokens
        self.generation = GenerationGroup(
            model_path=cfg.model.name_or_path, config=cfg.online, use_gpu=use_gpu, dtype=cfg.model.dtype,
            seed=cfg.run.seed, engine_options=engine_options)
        self._tracking = (tracking_uri, run_id)
        self._client = None

        self._cond = threading.Condition()
        self._rounds: dict[int, _Round] = {}
        self._pending: set[int] = set()  # rounds being built in a background thread
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

    def set_total_steps(self, total: int) -> None:
        """Eval-only coordinators learn the run's length from the offline feeder."""
        if self.rounds is None:
            self._total = total

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
        """Make sure the round that ``step`` is in exists (or is being built); start the next
        one when overlapping."""
        r = self.rounds.round_of(step)
        with self._cond:
            have = r in self._rounds or r in self._pending
        if not have:
            self._produce_round(r, self._submit_round(r))
        if self.cfg.online.overlap and r + 1 < self.rounds.rounds_run:
            with self._cond:
                start = r + 1 not in self._rounds and r + 1 not in self._pending
            if start:
                self._start_background(r + 1)

    def _submit_round(self, r: int) -> tuple[list[int], list]:
        indices = rounds_lib.round_prompt_indices(len(self.store), per_round=self.cfg.online.prompts_per_round,
                                                  round_index=r, seed=self.cfg.run.seed)
        prompts = [self.store.row(i)["prompt_ids"] for i in indices]
        refs = self.generation.submit(prompts, seed=self.cfg.run.seed + 1_000_003 * (r + 1))
        return indices, refs

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
        """generate (already submitted) -> judge -> pairs -> rows -> round r's feeder."""
        from ray_dpo.online.pairs import PAIR_STRATEGIES, Candidate, group_samples, make_pairs

        indices, refs = submitted
        t0 = time.perf_counter()
        completions = self.generation.collect(refs)
        gen_seconds = time.perf_counter() - t0
        rows = [self.store.row(i) for i in indices]
        prompt_texts = [self._text(row["prompt_ids"]) for row in rows]
        flat = [c for comps in completions for c in comps]
        t1 = time.perf_counter()
        scores = self.judge.score([p for p, comps in zip(prompt_texts, completions) for _ in comps],
                                  self._texts(flat))
        chosen = None
        if PAIR_STRATEGIES.get(self.cfg.online.pair_strategy).needs_chosen:
            chosen_scores = self.judge.score(prompt_texts, [self._text(row["chosen_ids"]) for row in rows])
            chosen = [Candidate(row["chosen_ids"], s) for row, s in zip(rows, chosen_scores)]
        judge_seconds = time.perf_counter() - t1
        groups = group_samples([row["pair_id"] for row in rows], [row["prompt_ids"] for row in rows],
                               [[c.token_ids for c in comps] for comps in completions], scores, chosen=chosen)
        pairs, counters = make_pairs(groups, strategy=self.cfg.online.pair_strategy, id_prefix=f"online-r{r}:")
        bos = self.tokenizer.bos_token_id
        train_rows, fitted = rounds_lib.pair_rows(pairs, max_length=self.cfg.data.max_length,
                                                  max_prompt_length=self.cfg.data.max_prompt_length,
                                                  over_length=self.cfg.data.over_length, bos_id=bos)
        gen_tokens = sum(len(c.token_ids) for c in flat)
        metrics = {
            "online/round": float(r),
            "online/judge_score_mean": float(np.mean(scores)),
            "online/pairs_kept": float(len(train_rows)),
            "online/pairs_dropped_no_margin": float(counters["dropped_no_margin"]),
            "online/pairs_dropped_length": float(fitted["dropped_length"]),
            "online/pairs_truncated": float(fitted["truncated"]),
            "online/samples": float(len(flat)),
            "online/gen_tokens_per_s": gen_tokens / max(gen_seconds, 1e-9),
            "online/gen_seconds": gen_seconds,
            "online/judge_seconds": judge_seconds,
        }
        if chosen is not None:
            metrics["online/judge_score_chosen_mean"] = float(np.mean([c.score for c in chosen]))
        feeder = None
        if train_rows:
            feeder = BatchFeeder(train_rows, self.plan, reference=self.reference,
                                 ref_cache=dict(self._eval_ref_cache) or None, evaluation=self.evaluation,
                                 eval_max_pairs=self.cfg.eval.max_pairs)
        else:
            logger.warning("online round %d kept no pair (all %d prompts lacked a margin): its %d steps "
                           "train nothing", r, len(groups), self.rounds.steps_per_round)
        with self._cond:
            self._rounds[r] = _Round(feeder)
            self._retire(r)
            self._cond.notify_all()
        print(f"[ray_dpo] online round {r + 1}/{self.rounds.rounds_run}: {len(flat)} samples "
              f"({metrics['online/gen_tokens_per_s']:.0f} tok/s), judge mean {metrics['online/judge_score_mean']:.3f}, "
              f"{len(train_rows)} pairs kept, {counters['dropped_no_margin']} without margin, "
              f"{fitted['dropped_length']} over length", flush=True)
        self._log(metrics, self.rounds.round_start(r))

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
        from ray_dpo.tracking.mlflow_sink import _client, log_metrics

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


class _CoordinatorActor(KeepsInitError, OnlineCoordinator):
    """OnlineCoordinator as an actor whose constructor errors reach start_coordinator intact."""


def start_coordinator(cfg: RunConfig, *, train: Any, evaluation: Any, reference: Any,
                      tracking_uri: Optional[str] = None, run_id: Optional[str] = None,
                      use_gpu: bool = False, start_timeout_s: float = 900.0) -> Any:
    """Start the coordinator actor on this node and wait until its engines are up.

    num_cpus=0 (like the feeder: it must never wait for a CPU the workers hold); threaded
    so every rank can block in get_step while rank 0 syncs. Constructor errors (a bad
    judge spec, an engine that cannot load the model) are raised here.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    handle = ray.remote(_CoordinatorActor).options(
        num_cpus=0, max_concurrency=cfg.policy.num_workers + 4,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(),
                                                           soft=True),
    ).remote(cfg, train=train, evaluation=evaluation, reference=reference, tracking_uri=tracking_uri,
             run_id=run_id, use_gpu=use_gpu)
    try:
        ray.get(handle.ping.remote(), timeout=start_timeout_s)
    except ray.exceptions.RayTaskError as err:
        ray.kill(handle)
        raise err.cause from None
    print(f"[ray_dpo] generation: {cfg.online.num_engines} {cfg.online.backend} engine(s) ready", file=sys.stdout,
          flush=True)
    return handle
