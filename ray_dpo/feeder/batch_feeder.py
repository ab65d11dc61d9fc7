"""BatchFeeder: serves training steps (with reference log-probs) to the policy workers.

The step layout is ray_dpo.feeder's (see its docstring); this module is the server of it:
one object answering, for any optimizer step and rank, the micro-batches that rank trains
on, with a background thread that scores missing reference log-probs a few steps ahead of
the slowest rank. ray_dpo.feeder.actor runs it as a threaded Ray actor.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from typing import Any, Mapping, Optional

import numpy as np

from ray_dpo.feeder.plan import BatchPlan, Prefetch
from ray_dpo.feeder.store import PairStore, check_overlap, ref_array

logger = logging.getLogger("ray_dpo.feeder")

REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")


class FeederError(RuntimeError):
    """The feeder cannot serve a request (no reference log-probs, feeder closed)."""


class Gate:
    """A flag opened once, waking the feeders whose prefetch waits on it (BatchFeeder's
    ``prefetch_after``); e.g. another feeder's ``train_sent``."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open = False
        self._watchers: list[threading.Condition] = []

    def is_open(self) -> bool:
        return self._open

    def open(self) -> None:
        with self._lock:
            if self._open:
                return
            self._open = True
            watchers, self._watchers = self._watchers, []
        for cond in watchers:
            with cond:
                cond.notify_all()

    def watch(self, cond: threading.Condition) -> None:
        """notify_all ``cond`` when the gate opens (at once if it is open)."""
        with self._lock:
            if not self._open:
                self._watchers.append(cond)
                return
        with cond:
            cond.notify_all()


class BatchFeeder:
    """Serves optimizer steps and eval batches to policy workers (a threaded Ray actor).

    Args:
        train: PairData, a Ray Dataset of tokenized pair rows, or a list of row dicts.
        plan: BatchPlan.
        reference: ReferenceGroup (anything with ``score_batches``) for pairs missing from
            ``ref_cache``; None when the cache covers every pair, or for a reference-free loss.
        ref_cache: {pair_id: (ref_chosen_logp, ref_rejected_logp)} for train and eval.
        evaluation: eval pairs (same kinds as ``train``) or None.
        eval_max_pairs: use only the first this-many eval pairs.
        reference_free: the loss needs no reference (SimPO, ORPO): rows carry no ref_*
            columns, nothing is ever scored, and reference / ref_cache must be None.
        prefetch: Prefetch (steps ahead, pairs per reference call, the step it starts at).
        prefetch_after: a Gate (e.g. the previous online round's feeder's ``train_sent``):
            until it opens, the prefetch thread scores only what a caller waits for (a step
            asked for, the eval pairs), not the steps ahead; so the reference serves the
            feeder being trained first.

    ``train_sent`` (a Gate) opens once every train pair has gone to the reference (or
    there is nothing left to send: all scored, the feeder closed, scoring failed).

    Memory: see PairStore (≈ 4 bytes per token + 60 bytes per pair) + 16 bytes per pair
    of reference log-probs + 8 bytes per pair per cached epoch order (at most 3).
    Scored log-probs are kept, so later epochs never rescore a pair.
    """

    def __init__(
        self,
        train: Any,
        plan: BatchPlan,
        *,
        reference: Any = None,
        ref_cache: Optional[Mapping[str, Any]] = None,
        evaluation: Any = None,
        eval_max_pairs: Optional[int] = None,
        reference_free: bool = False,
        prefetch: Prefetch = Prefetch(),
        prefetch_after: Optional[Gate] = None,
    ):
        if reference_free and (reference is not None or ref_cache):
            raise ValueError("reference_free=True takes no reference group and no ref_cache")
        self.reference_free = reference_free
        self.plan = plan
        self._load_pairs(train, evaluation, eval_max_pairs, check_ids=bool(ref_cache))
        self.reference = reference
        self.prefetch_steps = prefetch.steps
        self.ref_batch_size = prefetch.batch_size or int(
            getattr(getattr(reference, "config", None), "batch_size", 0) or plan.micro_batch_size
        )
        missing = self._load_ref_cache(ref_cache)
        self._spe = plan.steps_per_epoch(len(self.train))
        self._total = plan.total_steps(len(self.train))

        self._cond = threading.Condition()
        self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._rank_pos = [min(max(prefetch.start_step, 0), self._total)] * plan.num_workers
        self._wanted: collections.Counter[int] = collections.Counter()  # step -> waiting callers
        self._eval_wanted = False
        self._error: Optional[BaseException] = None
        self._closed = False
        self._fetches: dict[int, int] = {}
        self._world = plan.num_workers  # ranks training now (fewer in a shrunk elastic group)
        self._stats = {"steps_served": 0, "get_step_calls": 0, "ref_batches_scored": 0,
                       "ref_pairs_scored": 0, "wait_seconds": 0.0, "max_wait_seconds": 0.0,
                       "eval_wait_seconds": 0.0}
        self._thread: Optional[threading.Thread] = None
        self.train_sent = Gate()
        self._after = prefetch_after
        if not np.isnan(self._ref[:, 0]).any():
            self.train_sent.open()
        if prefetch_after is not None:
            prefetch_after.watch(self._cond)
        if missing:
            self._thread = threading.Thread(target=self._produce, name="feeder-prefetch", daemon=True)
            self._thread.start()

    def _load_pairs(self, train: Any, evaluation: Any, eval_max_pairs: Optional[int], *, check_ids: bool) -> None:
        """self.train and self.eval as PairStores; with a ref_cache (keyed by pair id), an id
        in both splits must name the same pair."""
        self.train = PairStore.from_source(train)
        if len(self.train) == 0:
            raise ValueError("no training pairs: the feeder needs at least one tokenized pair")
        self.eval = PairStore.from_source(evaluation) if evaluation is not None else None
        if self.eval is not None and eval_max_pairs is not None:
            self.eval = self.eval.limit(eval_max_pairs)
        if check_ids and self.eval is not None:
            check_overlap(self.train, self.eval)

    def _load_ref_cache(self, ref_cache: Optional[Mapping[str, Any]]) -> int:
        """Fill the reference log-prob arrays from ``ref_cache``; returns how many pairs still
        need scoring (an error when there is no reference group to score them)."""
        self._ref = ref_array(self.train, ref_cache, self.reference_free)
        self._eval_ref = ref_array(self.eval, ref_cache, self.reference_free) if self.eval is not None else None
        missing = int(np.isnan(self._ref[:, 0]).sum())
        if self._eval_ref is not None:
            missing += int(np.isnan(self._eval_ref[:, 0]).sum())
        if missing and self.reference is None:
            raise ValueError(
                f"{missing} pair(s) have no reference log-probs in ref_cache and no reference "
                "group was given; pass reference=ReferenceGroup(...) or a complete cache"
            )
        return missing

    # ------------------------------------------------------------------ public

    def ping(self) -> bool:
        return True

    def total_steps(self) -> int:
        """Optimizer steps of the run: steps_per_epoch * num_epochs, capped by max_steps."""
        return self._total

    def steps_per_epoch(self) -> int:
        return self._spe

    def num_pairs(self) -> int:
        return len(self.train)

    def num_pairs_in_step(self, step: int) -> int:
        """Pairs of ``step`` over all ranks (G, or fewer on an epoch's last step)."""
        self._check_step(step)
        k = step % self._spe
        return min(self.plan.global_batch, len(self.train) - k * self.plan.global_batch)

    def step_pair_ids(self, step: int) -> list[str]:
        """Pair ids of ``step`` in order (all ranks), for ledgers and tests."""
        return [self.train.pair_id(int(i)) for i in self._step_indices(step)]

    def get_step(self, step: int, rank: int, world: Optional[int] = None) -> list[list[dict]]:
        """The micro-batches of ``rank`` for ``step``: plan.accumulation(world) of them.

        world: ranks training now (default plan.num_workers). An elastic run on fewer ranks
        gets the same step's pairs, spread over fewer ranks and more micro-batches.
        Each row is a tokenized pair dict plus ref_chosen_logp / ref_rejected_logp.
        Blocks until the reference log-probs are there; raises what the scoring raised.
        """
        self._check_step(step)
        world = self._check_rank(rank, world)
        indices = self._step_indices(step)
        with self._cond:
            self._serve_world(world)
            # The rank trains `step` next: prefetch covers step .. step + prefetch_steps.
            if self._rank_pos[rank] != step:
                self._rank_pos[rank] = step
                self._cond.notify_all()  # the window may have moved: wake the prefetcher
            waited = self._wait_for(lambda: self._scored(self._ref, indices), step)
            self._record_fetch(step, waited)
        mine = indices[np.arange(len(indices)) % world == rank]
        accumulation = self.plan.accumulation(world)
        ref = None if self.reference_free else self._ref
        return [self._rows(self.train, ref, mine[m::accumulation]) for m in range(accumulation)]

    def get_eval(self, rank: int, world: Optional[int] = None) -> list[list[dict]]:
        """Eval micro-batches of ``rank`` of ``world`` (micro_batch_size pairs, round-robin
        over ranks).

        Every rank gets the same number of micro-batches (trailing ones may be empty).
        Reference log-probs of all eval pairs are computed once, on the first call.
        """
        if self.eval is None:
            return []
        world = self._check_rank(rank, world)
        everything = np.arange(len(self.eval))
        with self._cond:
            self._eval_wanted = True
            t0 = time.monotonic()
            self._wait_for(lambda: self._scored(self._eval_ref, everything), None)
            self._stats["eval_wait_seconds"] += time.monotonic() - t0
        micro = self.plan.micro_batch_size
        count = math.ceil(math.ceil(len(self.eval) / world) / micro)
        mine = everything[rank::world]
        ref = None if self.reference_free else self._eval_ref
        return [self._rows(self.eval, ref, mine[m * micro:(m + 1) * micro]) for m in range(count)]

    def stats(self) -> dict:
        """Counters for perf metrics: steps_served (fetched by every rank), get_step_calls,
        ref_batches_scored, ref_pairs_scored, wait_seconds / max_wait_seconds (time get_step
        blocked on reference log-probs), eval_wait_seconds, store_bytes."""
        with self._cond:
            out = dict(self._stats)
        out["store_bytes"] = self.train.nbytes + (self.eval.nbytes if self.eval is not None else 0)
        return out

    def scored_ref_logps(self) -> tuple[list[str], list[float], list[float]]:
        """(pair_ids, chosen, rejected) of every train and eval pair with known log-probs,
        e.g. to save a reference cache after a streamed run."""
        ids: list[str] = []
        chosen: list[float] = []
        rejected: list[float] = []
        if self.reference_free:
            return ids, chosen, rejected
        with self._cond:
            for store, ref in ((self.train, self._ref), (self.eval, self._eval_ref)):
                if store is None:
                    continue
                for i in np.flatnonzero(~np.isnan(ref[:, 0])):
                    ids.append(store.pair_id(int(i)))
                    chosen.append(float(ref[i, 0]))
                    rejected.append(float(ref[i, 1]))
        return ids, chosen, rejected

    def close(self) -> None:
        """Stop the prefetch thread; later requests raise FeederError."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.train_sent.open()  # nothing more goes to the reference
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ order

    def _check_rank(self, rank: int, world: Optional[int]) -> int:
        """``world`` (plan.num_workers when None), checked with ``rank``."""
        world = self.plan.num_workers if world is None else world
        self.plan.accumulation(world)  # ValueError outside [1, num_workers]
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        return world

    def _serve_world(self, world: int) -> None:
        """Holding self._cond: ranks at and above ``world`` are gone (an elastic group that
        shrank), so the prefetch window follows only the ranks that train."""
        if world != self._world:
            self._world = world
            self._fetches.clear()
            self._cond.notify_all()

    def _check_step(self, step: int) -> None:
        if not isinstance(step, (int, np.integer)) or not 0 <= step < self._total:
            raise ValueError(f"step must be in [0, {self._total}), got {step!r}")

    def _order(self, epoch: int) -> np.ndarray:
        with self._cond:
            perm = self._perms.get(epoch)
            if perm is None:
                n = len(self.train)
                if self.plan.shuffle:
                    perm = np.random.default_rng([self.plan.seed, epoch]).permutation(n)
                else:
                    perm = np.arange(n)
                self._perms[epoch] = perm
                while len(self._perms) > 3:
                    self._perms.popitem(last=False)
            return perm

    def _step_indices(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self._spe)
        g = self.plan.global_batch
        return self._order(epoch)[k * g:(k + 1) * g]

    # ------------------------------------------------------------------ serving

    @staticmethod
    def _scored(ref: np.ndarray, indices: np.ndarray) -> bool:
        return not np.isnan(ref[indices, 0]).any()

    def _wait_for(self, ready, step: Optional[int]) -> float:
        """Wait (holding self._cond) until ready(); returns seconds waited."""
        if ready():
            return 0.0
        t0 = time.monotonic()
        if step is not None:
            self._wanted[step] += 1
        self._cond.notify_all()  # wake the producer: someone is waiting
        try:
            while not ready():
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise FeederError("the feeder was closed")
                if self._thread is None or not self._thread.is_alive():
                    raise FeederError("reference log-probs are missing and no prefetch thread runs")
                self._cond.wait(timeout=1.0)
        finally:
            if step is not None:
                self._wanted[step] -= 1
                if self._wanted[step] <= 0:
                    del self._wanted[step]
        return time.monotonic() - t0

    def _record_fetch(self, step: int, waited: float) -> None:
        self._stats["get_step_calls"] += 1
        self._stats["wait_seconds"] += waited
        self._stats["max_wait_seconds"] = max(self._stats["max_wait_seconds"], waited)
        self._fetches[step] = self._fetches.get(step, 0) + 1
        if self._fetches[step] >= self._world:
            del self._fetches[step]
            self._stats["steps_served"] += 1

    @staticmethod
    def _rows(store: PairStore, ref: Optional[np.ndarray], indices: np.ndarray) -> list[dict]:
        rows = []
        for i in indices:
            row = store.row(int(i))
            if ref is not None:
                row[REF_COLUMNS[0]] = float(ref[i, 0])
                row[REF_COLUMNS[1]] = float(ref[i, 1])
            rows.append(row)
        return rows

    # ------------------------------------------------------------------ prefetch thread

    def _produce(self) -> None:
        """Background thread: the only caller of reference.score_batches."""
        try:
            while True:
                with self._cond:
                    job = self._next_job()
                    while job is None and not self._closed:
                        self._cond.wait()
                        job = self._next_job()
                    if self._closed:
                        return
                store, ref, indices = job
                self._score(store, ref, indices)
        except BaseException as err:  # noqa: BLE001 - handed to every waiting caller
            logger.error("reference scoring failed: %s", err)
            with self._cond:
                self._error = err
                self._cond.notify_all()
        finally:
            self.train_sent.open()

    def _next_job(self) -> Optional[tuple[PairStore, np.ndarray, np.ndarray]]:
        """(store, ref array, row indices to score) or None; called holding self._cond.

        Priority: eval when asked for, then steps someone waits on, then the window: the
        slowest rank's current step and the prefetch_steps steps after it (the window only
        once ``prefetch_after`` is open).
        """
        if self._eval_wanted and self._eval_ref is not None:
            todo = np.flatnonzero(np.isnan(self._eval_ref[:, 0]))
            if len(todo):
                return self.eval, self._eval_ref, todo
        frontier = min(self._rank_pos[:self._world])
        window = range(frontier, min(frontier + self.prefetch_steps + 1, self._total))
        if self._after is not None and not self._after.is_open():
            window = range(0)  # held: another feeder's steps go to the reference first
        steps = sorted(self._wanted) + [s for s in window if s not in self._wanted]
        chunks = []
        for step in steps[: self.prefetch_steps + 1]:
            indices = self._step_indices(step)
            chunks.append(indices[np.isnan(self._ref[indices, 0])])
        todo = np.concatenate(chunks) if chunks else np.zeros(0, np.int64)
        if not len(todo):
            return None
        _, first = np.unique(todo, return_index=True)  # a pair may sit in two epochs' steps
        return self.train, self._ref, todo[np.sort(first)]

    def _score(self, store: PairStore, ref: np.ndarray, indices: np.ndarray) -> None:
        """Score rows ``indices`` of ``store`` through the reference, in batches; each
        batch's results are published as soon as it returns. When these are the last train
        pairs not scored, ``train_sent`` opens once the reference has taken the last batch:
        when it asks for the next one (a ReferenceGroup with room in its window), else when
        the last batch's results are in."""
        size = self.ref_batch_size
        groups = [indices[i:i + size] for i in range(0, len(indices), size)]
        with self._cond:
            last = store is self.train and int(np.isnan(ref[:, 0]).sum()) == len(indices)

        def batches():
            for group in groups:
                yield [store.row(int(i)) for i in group]
            if last:
                self.train_sent.open()

        for group, scored in zip(groups, self.reference.score_batches(batches())):
            if len(scored) != len(group):
                raise RuntimeError(f"reference returned {len(scored)} rows for a batch of {len(group)}")
            values = np.array([[r[REF_COLUMNS[0]], r[REF_COLUMNS[1]]] for r in scored], dtype=np.float64)
            if np.isnan(values).any():
                raise RuntimeError("reference returned NaN log-probs (check the reference model / dtype)")
            with self._cond:
                ref[group] = values
                self._stats["ref_batches_scored"] += 1
                self._stats["ref_pairs_scored"] += len(group)
                self._cond.notify_all()
        if last:
            self.train_sent.open()
