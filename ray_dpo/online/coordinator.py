"""OnlineCoordinator: the engines' side of an online DPO run, as one threaded Ray actor.

It is a PolicyFollower (follower.py: weights -> engines, probe check, held-out eval at
eval points, never stalling training) that also makes the rounds:

    the policy workers' step source   total_steps, steps_per_epoch, num_pairs_in_step,
                                      get_step, get_eval  (round_feeder.RoundFeeder)
    advance(k) at a round's start     round r's prompts go to the engines; a thread judges,
                                      pairs and tokenizes them (round_builder.RoundProducer)
                                      and keeps them in the round store; the ranks wait in
                                      get_step until round r is there
    online.overlap                    round r+1 is submitted at round r's start, from the
                                      weights just synced (one round stale:
                                      online/sample_staleness_steps)

Its parts log to the run's MLflow run at step k: sync/*, online/* of each round, eval/*.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Optional

from ray_dpo.config import RunConfig
from ray_dpo.feeder import BatchFeeder, BatchPlan, Gate, KeepsInitError, PairStore
from ray_dpo.online import rounds as rounds_lib
from ray_dpo.engines.follower import PROBE_SIZE, FollowerSpec, PolicyFollower, start_actor
from ray_dpo.seams import Scorer


class OnlineCoordinator(PolicyFollower):
    """See the module docstring. spec: FollowerSpec; plan: BatchPlan (how pairs become
    steps); train: PairData whose prompts (and chosen responses, for regenerate_rejected)
    rounds sample from; evaluation: data.eval_files pairs for the DPO eval metrics, or None
    (at most spec.eval_max_pairs of them)."""

    RESTARTS_ROUNDS = True  # a restarted coordinator asks rank 0 for its last sync again (needs_sync)

    def __init__(self, spec: FollowerSpec, plan: BatchPlan, *, train: Any, evaluation: Any, reference: Any,
                 tracking_uri: Optional[str], run_id: Optional[str], use_gpu: bool):

        from ray_dpo.online.round_builder import RoundProducer
        from ray_dpo.online.round_feeder import RoundFeeder
        from ray_dpo.online.round_store import RoundStore
        from ray_dpo.engines.weight_sync import row_probe

        store = PairStore.from_source(train)
        probe = row_probe([store.row(i) for i in range(min(PROBE_SIZE, len(store)))])
        online = spec.online
        round_plan = rounds_lib.plan_rounds(num_rounds=online.rounds, prompts_per_round=online.prompts_per_round,
                                            global_batch=plan.global_batch, num_epochs=plan.num_epochs,
                                            max_steps=spec.max_steps)
        super().__init__(dataclasses.replace(spec, total_steps=round_plan.total_steps), reference=reference,
                         tracking_uri=tracking_uri, run_id=run_id, use_gpu=use_gpu, probe_rows=probe)
        self.plan = plan
        self.evaluation = PairStore.from_source(evaluation) if evaluation is not None else None
        self.eval_max_pairs = spec.eval_max_pairs
        self._eval_ref_cache: dict[str, tuple[float, float]] = {}
        fingerprint = round_fingerprint(spec, plan, getattr(train, "fingerprint", ""))
        self.rounds = RoundFeeder(round_plan, store=RoundStore(spec.run_dir, fingerprint),
                                  make_feeder=self._make_feeder, accumulation=plan.accumulation,
                                  on_retire=self._keep_eval_logps)
        self.producer = RoundProducer(rounds=self.rounds, prompt_rows=store, generation=self.generation,
                                      scorer=Scorer(self.judge, self.decode, self.judge_lock), spec=self.spec,
                                      bos_id=self.tokenizer.bos_token_id, log=self.log)

    # ------------------------------------------------------------------ step source

    def total_steps(self) -> int:
        return self.rounds.total_steps()

    def steps_per_epoch(self) -> int:
        return self.rounds.steps_per_epoch()

    def num_pairs_in_step(self, step: int) -> int:
        return self.rounds.num_pairs_in_step(step)

    def get_step(self, step: int, rank: int, world: Optional[int] = None) -> list[list[dict]]:
        return self.rounds.get_step(step, rank, world)

    def get_eval(self, rank: int, world: Optional[int] = None) -> list[list[dict]]:
        return self.rounds.get_eval(rank, world)

    # ------------------------------------------------------------------ sync side

    def sync_points(self) -> list[int]:
        plan = self.rounds.plan
        return rounds_lib.sync_points(total_steps=plan.total_steps, steps_per_round=plan.steps_per_round,
                                      eval_every=self.spec.eval.every_steps, eval_sampling=bool(self.evaluator.prompts))

    def _started(self, step: int) -> None:
        """The round ``step`` is in (and with online.overlap the next one) is there or on its way."""
        plan = self.rounds.plan
        if step >= plan.total_steps:
            return
        r = plan.round_of(step)
        self.producer.ensure(r, step=step)
        if self.spec.online.overlap and r + 1 < plan.rounds_run:
            self.producer.ensure(r + 1, step=step)

    def fail(self, err: BaseException) -> None:
        super().fail(err)
        self.rounds.fail(err)

    def close(self) -> None:
        self.rounds.close()
        super().close()

    def _make_feeder(self, rows: list[dict], after: Optional[Gate]) -> BatchFeeder:
        """A round's feeder; ``after``: the previous round's train_sent (RoundFeeder.install),
        so the round being trained gets the reference first."""
        if self.spec.training_reference != "group":  # LoRA adapters_off: the policy scores its base itself
            return BatchFeeder(rows, self.plan, reference_free=True, evaluation=self.evaluation,
                               eval_max_pairs=self.eval_max_pairs)
        return BatchFeeder(rows, self.plan, reference=self.reference, ref_cache=dict(self._eval_ref_cache) or None,
                           evaluation=self.evaluation, eval_max_pairs=self.eval_max_pairs, prefetch_after=after)

    def _keep_eval_logps(self, feeder: BatchFeeder) -> None:
        """Keep a retired round's reference log-probs of the eval pairs: later rounds reuse them."""
        if self.evaluation is None or len(self._eval_ref_cache) >= len(self.evaluation):
            return
        eval_ids = {self.evaluation.pair_id(i) for i in range(len(self.evaluation))}
        for pid, c, rj in zip(*feeder.scored_ref_logps()):
            if pid in eval_ids:
                self._eval_ref_cache[pid] = (c, rj)


def round_fingerprint(spec: FollowerSpec, plan: BatchPlan, data_fingerprint: str) -> dict:
    """What a saved round must match to be reused (round_store): the same prompts in the same
    order, sampled from the same model with the same settings, paired the same way."""
    online = spec.online
    return {"seed": spec.seed, "model": spec.model.name_or_path, "data": data_fingerprint,
            "rounds": online.rounds, "prompts_per_round": online.prompts_per_round,
            "samples_per_prompt": online.samples_per_prompt, "pair_strategy": online.pair_strategy,
            "sampling": dataclasses.asdict(online.sampling), "judge": dataclasses.asdict(online.judge),
            "max_length": spec.data.max_length, "max_prompt_length": spec.data.max_prompt_length,
            "global_batch": plan.global_batch}


class _CoordinatorActor(KeepsInitError, OnlineCoordinator):
    """OnlineCoordinator as an actor whose constructor errors reach start_coordinator intact."""


def start_coordinator(cfg: RunConfig, *, train: Any, evaluation: Any, reference: Any,
                      tracking_uri: Optional[str] = None, run_id: Optional[str] = None,
                      use_gpu: bool = False) -> Any:
    """Start the coordinator actor on this node and wait until its engines are up.

    Threaded so every rank can block in get_step while rank 0 advances. A coordinator that
    dies is restarted by Ray (up to policy.max_failures times) with the same arguments, and
    the calls in flight are sent to the new process: an advance runs again (weights, probe,
    eval, the round it starts), a get_step reads its round back from the round store. Its
    engines, children of the old process, start anew with it.
    """
    plan = BatchPlan(num_workers=cfg.policy.num_workers, micro_batch_size=cfg.policy.micro_batch_size,
                     gradient_accumulation_steps=cfg.policy.gradient_accumulation_steps,
                     num_epochs=cfg.policy.num_epochs, seed=cfg.run.seed, shuffle=cfg.data.shuffle)
    handle = start_actor(_CoordinatorActor, FollowerSpec.of(cfg), plan, train=train, evaluation=evaluation,
                         reference=reference, tracking_uri=tracking_uri, run_id=run_id, use_gpu=use_gpu,
                         max_concurrency=cfg.policy.num_workers + 4, max_restarts=cfg.policy.max_failures)
    print(f"[ray_dpo] generation: {cfg.online.num_engines} {cfg.online.backend} engine(s) ready", file=sys.stdout,
          flush=True)
    return handle
