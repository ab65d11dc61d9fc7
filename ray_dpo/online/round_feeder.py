"""RoundFeeder: the policy workers' step source in an online run.

The same interface as the offline BatchFeeder (total_steps, steps_per_epoch,
num_pairs_in_step, get_step, get_eval), over rounds: round r's steps are served by a
BatchFeeder built from round r's pairs, whose prefetch thread streams reference log-probs
exactly as offline. A step whose round is not there yet waits for it; a round that was
built before a restart is read back from the round store first.

With online.overlap, round r+1 is installed while round r trains, and both rounds' feeders
score on the same reference actors. Round r goes first: round r+1's feeder prefetches only
once round r's has sent its last pair to the reference (BatchFeeder's ``prefetch_after`` on
round r's ``train_sent``); before that it scores only a step a rank waits for.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from ray_dpo.feeder import BatchFeeder, FeederError, Gate
from ray_dpo.online.round_store import RoundStore
from ray_dpo.online.rounds import RoundPlan

logger = logging.getLogger("ray_dpo.online")


class RoundFeeder:
    """Rounds' pair rows -> optimizer steps.

    plan: the RoundPlan (steps per round, rounds run). store: where rounds are kept.
    make_feeder(rows, after) -> BatchFeeder for one round's rows, its prefetch held until the
    Gate ``after`` opens (the previous round's ``train_sent``; None: the previous round is
    not here or kept no pair). accumulation(world): micro-batches per rank and step when
    ``world`` ranks train (None: all) (BatchPlan.accumulation; an empty step past a round's
    pairs is that many empty lists). on_retire(feeder): called before an old round's feeder
    closes (to keep what it scored).
    """

    def __init__(self, plan: RoundPlan, *, store: RoundStore,
                 make_feeder: Callable[[list[dict], Optional[Gate]], BatchFeeder],
                 accumulation: Callable[[int], int], on_retire: Callable[[BatchFeeder], None] = lambda feeder: None):
        self.plan = plan
        self.store = store
        self._make_feeder, self._on_retire = make_feeder, on_retire
        self._accumulation = accumulation
        self._cond = threading.Condition()
        self._rounds: dict[int, Optional[BatchFeeder]] = {}  # None: the round kept no pair
        self._busy: set[int] = set()  # rounds being built or read back
        self._error: Optional[BaseException] = None
        self._closed = False

    # ------------------------------------------------------------------ step source

    def total_steps(self) -> int:
        return self.plan.total_steps

    def steps_per_epoch(self) -> int:
        """Steps per round: the reported "epoch" counts rounds."""
        return self.plan.steps_per_round

    def num_pairs_in_step(self, step: int) -> int:
        feeder, local = self._round_for(step)
        return feeder.num_pairs_in_step(local) if feeder is not None and local < feeder.total_steps() else 0

    def get_step(self, step: int, rank: int, world: Optional[int] = None) -> list[list[dict]]:
        """Round r's step (BatchFeeder.get_step); an empty step past the pairs the round kept."""
        feeder, local = self._round_for(step)
        if feeder is not None and local < feeder.total_steps():
            return feeder.get_step(local, rank, world)
        return [[] for _ in range(self._accumulation(world))]

    def get_eval(self, rank: int, world: Optional[int] = None) -> list[list[dict]]:
        """data.eval_files pairs, from the newest round's feeder."""
        with self._cond:
            feeders = [self._rounds[r] for r in sorted(self._rounds, reverse=True) if self._rounds[r] is not None]
        return feeders[0].get_eval(rank, world) if feeders else []

    # ------------------------------------------------------------------ rounds

    def claim(self, r: int) -> bool:
        """True: round r is neither here nor being made, and the caller now makes it (then
        ``install`` or ``release``). A round in the store is read back here instead."""
        with self._cond:
            while r in self._busy and r not in self._rounds:
                self._cond.wait(timeout=1.0)
            if r in self._rounds:
                return False
            self._busy.add(r)
        try:
            saved = self.store.load(r)
        except BaseException:
            self.release(r)
            raise
        if saved is None:
            return True
        self.install(r, saved.rows)
        print(f"[ray_dpo] online round {r + 1}/{self.plan.rounds_run}: {len(saved.rows)} pairs read back from "
              f"{saved.path} (built before the restart, not generated again)", flush=True)
        return False

    def is_claimed(self, r: int) -> bool:
        """Round r is here or being made."""
        with self._cond:
            return r in self._rounds or r in self._busy

    def install(self, r: int, rows: list[dict]) -> None:
        """Serve round r's pair rows (none: its steps train nothing); release its claim.
        Round r's prefetch waits for round r-1's, when round r-1 is here (a retired or
        closed feeder has sent all it will)."""
        with self._cond:
            before = self._rounds.get(r - 1)
        feeder = self._make_feeder(rows, before.train_sent if before is not None else None) if rows else None
        with self._cond:
            self._rounds[r] = feeder
            self._busy.discard(r)
            self._retire(r)
            self._cond.notify_all()

    def release(self, r: int) -> None:
        """Give up a claim (the round was not made)."""
        with self._cond:
            self._busy.discard(r)
            self._cond.notify_all()

    def fail(self, err: BaseException) -> None:
        """Hand ``err`` to every rank waiting for a round."""
        with self._cond:
            if self._error is None:
                self._error = err
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            feeders = [f for f in self._rounds.values() if f is not None]
            self._cond.notify_all()
        for feeder in feeders:
            feeder.close()

    def _round_for(self, step: int) -> tuple[Optional[BatchFeeder], int]:
        if not 0 <= step < self.plan.total_steps:
            raise ValueError(f"step must be in [0, {self.plan.total_steps}), got {step!r}")
        r = self.plan.round_of(step)
        if not self.is_claimed(r) and self.claim(r):
            self.release(r)  # not in the store either: the sync that starts round r builds it
        with self._cond:
            # A failed coordinator (a sync that failed its probe) serves no more steps, even
            # of a round made before (online.overlap): the run is ending with that error.
            while self._error is not None or r not in self._rounds:
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise FeederError("the online coordinator was closed")
                self._cond.wait(timeout=1.0)
            return self._rounds[r], step - self.plan.round_start(r)

    def _retire(self, newest: int) -> None:
        """Close feeders two rounds back (holding self._cond); a rerun of their steps reads them back."""
        for r in [r for r in self._rounds if r < newest - 1]:
            feeder = self._rounds.pop(r)
            if feeder is not None:
                self._on_retire(feeder)
                feeder.close()

