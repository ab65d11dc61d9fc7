"""BatchFeeder: serves training steps (with reference log-probs) to the policy workers.

One threaded Ray actor on the driver's node (``start_feeder``). It loads the tokenized
pairs once into compact numpy storage and answers, for any optimizer step and rank, the
micro-batches that rank trains on. Reference log-probs come from a cache dict when given,
otherwise from a ReferenceGroup, scored by a background thread a few steps ahead of the
slowest rank, so training does not wait for the reference when the group keeps up.

Step layout (deterministic, so resuming = asking from the checkpoint's step):

    G   = num_workers * micro_batch_size * gradient_accumulation_steps   (global batch)
    spe = ceil(N / G)                                                     (steps per epoch)
    step s is epoch e = s // spe, covering order_e[(s % spe) * G : (s % spe + 1) * G]
    order_e = seeded permutation (seed, e) when shuffle, else file order

The last step of an epoch may be partial: no pair is ever dropped. A step's n rows go
round-robin: row j to rank j % W, then to micro-batch (j // W) % gas, so micro-batch
sizes differ by at most one and trailing micro-batches may be EMPTY (every rank still
gets exactly gradient_accumulation_steps micro-batches, so collectives stay in step).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import numpy as np

logger = logging.getLogger("ray_dpo.feeder")

REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
_ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class BatchPlan:
    """How pairs are cut into optimizer steps.

    num_workers: data-parallel ranks. micro_batch_size: pairs per rank per forward.
    gradient_accumulation_steps: micro-batches per rank per optimizer step.
    num_epochs: passes over the data. max_steps: cap on optimizer steps (None: no cap).
    seed, shuffle: the per-epoch order is a permutation seeded by (seed, epoch) when
    shuffle, else file order.
    """

    num_workers: int
    micro_batch_size: int
    gradient_accumulation_steps: int = 1
    num_epochs: int = 1
    max_steps: Optional[int] = None
    seed: int = 0
    shuffle: bool = True

    def __post_init__(self):
        problems = [
            f"{name}={getattr(self, name)!r} (must be an integer >= 1)"
            for name in ("num_workers", "micro_batch_size", "gradient_accumulation_steps", "num_epochs")
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1
        ]
        if self.max_steps is not None and (not isinstance(self.max_steps, int) or self.max_steps < 1):
            problems.append(f"max_steps={self.max_steps!r} (must be None or an integer >= 1)")
        if problems:
            raise ValueError("invalid BatchPlan: " + "; ".join(problems))

    @property
    def global_batch(self) -> int:
        """Pairs per optimizer step over all ranks."""
        return self.num_workers * self.micro_batch_size * self.gradient_accumulation_steps

    def steps_per_epoch(self, num_pairs: int) -> int:
        return math.ceil(num_pairs / self.global_batch)

    def total_steps(self, num_pairs: int) -> int:
        total = self.steps_per_epoch(num_pairs) * self.num_epochs
        return min(total, self.max_steps) if self.max_steps is not None else total


# --------------------------------------------------------------------------- storage


class PairStore:
    """Tokenized pairs in flat numpy arrays, in their original (file) order.

    Memory per pair: 4 bytes per token (prompt + chosen + rejected, one int32 buffer)
    + 24 bytes of offsets (three int64 arrays of N + 1) + the pair id (fixed-width bytes:
    the longest id's UTF-8 length) + 1 byte (truncated) + 1 byte (label, unpaired rows only).
    Roughly 4 * tokens + 60 bytes, versus ~100 bytes per token as Python lists of ints.
    Unpaired rows (KTO) carry a "label" (True = desirable); pair rows have no labels.
    """

    def __init__(self, tokens: np.ndarray, offsets: dict[str, np.ndarray], pair_ids: np.ndarray,
                 truncated: np.ndarray, labels: Optional[np.ndarray] = None):
        self.tokens = tokens
        self.offsets = offsets  # column -> int64 [N + 1], positions in self.tokens
        self.pair_ids = pair_ids  # bytes, dtype "S<width>"
        self.truncated = truncated
        self.labels = labels  # bool [N] or None

    def __len__(self) -> int:
        return len(self.pair_ids)

    @property
    def nbytes(self) -> int:
        return (self.tokens.nbytes + sum(o.nbytes for o in self.offsets.values())
                + self.pair_ids.nbytes + self.truncated.nbytes + (0 if self.labels is None else self.labels.nbytes))

    def pair_id(self, i: int) -> str:
        return self.pair_ids[i].decode("utf-8")

    def row(self, i: int) -> dict:
        out: dict[str, Any] = {"pair_id": self.pair_id(i)}
        for column in _ID_COLUMNS:
            start, end = self.offsets[column][i], self.offsets[column][i + 1]
            out[column] = self.tokens[start:end].tolist()
        out["truncated"] = bool(self.truncated[i])
        if self.labels is not None:
            out["label"] = bool(self.labels[i])
        return out

    def limit(self, n: int) -> "PairStore":
        """The first n pairs (views, no copy of the token buffer)."""
        n = min(n, len(self))
        return PairStore(self.tokens, {k: v[: n + 1] for k, v in self.offsets.items()},
                         self.pair_ids[:n], self.truncated[:n], None if self.labels is None else self.labels[:n])

    @classmethod
    def from_source(cls, source: Any) -> "PairStore":
        """From PairData (``.dataset``), a Ray Dataset, an iterable of pair row dicts, or a
        PairStore (returned as is: stores are read-only)."""
        if isinstance(source, PairStore):
            return source
        dataset = getattr(source, "dataset", source)
        if hasattr(dataset, "iter_batches"):
            return cls._from_arrow(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
        return cls._from_rows(dataset)

    @classmethod
    def _from_arrow(cls, tables: Iterable[Any]) -> "PairStore":
        import pyarrow.compute as pc

        parts: dict[str, list[np.ndarray]] = {c: [] for c in _ID_COLUMNS}
        lengths: dict[str, list[np.ndarray]] = {c: [] for c in _ID_COLUMNS}
        ids: list[str] = []
        truncated: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        for table in tables:
            if table.num_rows == 0:
                continue
            if "label" in table.column_names:
                labels.append(table.column("label").to_numpy(zero_copy_only=False).astype(bool))
            for column in _ID_COLUMNS:
                col = table.column(column)
                parts[column].append(pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.int32))
                lengths[column].append(pc.list_value_length(col).to_numpy(zero_copy_only=False))
            ids += table.column("pair_id").to_pylist()
            truncated.append(table.column("truncated").to_numpy(zero_copy_only=False).astype(bool))
        return cls._assemble(parts, lengths, ids, truncated, labels)

    @classmethod
    def _from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> "PairStore":
        parts: dict[str, list[np.ndarray]] = {c: [] for c in _ID_COLUMNS}
        lengths: dict[str, list[np.ndarray]] = {c: [] for c in _ID_COLUMNS}
        ids: list[str] = []
        truncated: list[bool] = []
        labels: list[bool] = []
        for row in rows:
            if "label" in row:
                labels.append(bool(row["label"]))
            for column in _ID_COLUMNS:
                values = np.asarray(row[column], dtype=np.int32)
                parts[column].append(values)
                lengths[column].append(np.array([len(values)]))
            ids.append(row["pair_id"])
            truncated.append(bool(row.get("truncated", False)))
        return cls._assemble(parts, lengths, ids, [np.asarray(truncated, dtype=bool)],
                             [np.asarray(labels, dtype=bool)] if labels else [])

    @classmethod
    def _assemble(cls, parts, lengths, ids, truncated, labels=()) -> "PairStore":
        flat = {c: np.concatenate(parts[c]) if parts[c] else np.zeros(0, np.int32) for c in _ID_COLUMNS}
        tokens = np.concatenate([flat[c] for c in _ID_COLUMNS])
        offsets, base = {}, 0
        for column in _ID_COLUMNS:
            sizes = np.concatenate(lengths[column]) if lengths[column] else np.zeros(0, np.int64)
            offsets[column] = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]) + base
            base += len(flat[column])
        pair_ids = np.array([i.encode("utf-8") for i in ids], dtype="S") if ids else np.zeros(0, "S1")
        trunc = np.concatenate(truncated) if truncated else np.zeros(0, bool)
        label = np.concatenate(labels) if labels else None
        if label is not None and len(label) != len(trunc):
            raise ValueError(f"{len(label)} of {len(trunc)} rows have a label; unpaired rows all need one")
        return cls(tokens, offsets, pair_ids, trunc, label)


def _ref_array(store: PairStore, ref_cache: Optional[Mapping[str, Any]], reference_free: bool = False) -> np.ndarray:
    """[N, 2] float64 reference log-probs (chosen, rejected); NaN where unknown; 0 (never
    scored, never served) for a reference-free loss."""
    ref = np.full((len(store), 2), 0.0 if reference_free else np.nan, dtype=np.float64)
    if ref_cache:
        for i in range(len(store)):
            value = ref_cache.get(store.pair_id(i))
            if value is not None:
                ref[i] = value
    return ref


def _check_overlap(train: PairStore, evaluation: PairStore) -> None:
    """One ref_cache dict serves both splits, keyed by pair id: an id in both splits must
    be the same pair, else one of them would get the other's reference log-probs."""
    common, ti, ei = np.intersect1d(train.pair_ids, evaluation.pair_ids, return_indices=True)
    for k in range(len(common)):
        a, b = train.row(int(ti[k])), evaluation.row(int(ei[k]))
        if any(a[c] != b[c] for c in _ID_COLUMNS):
            raise ValueError(
                f"pair id {a['pair_id']!r} names different pairs in train and eval data (two files "
                "with the same name?); reference log-probs are keyed by pair id. Rename one of "
                "the files"
            )


# --------------------------------------------------------------------------- feeder


class FeederError(RuntimeError):
    """The feeder cannot serve a request (no reference log-probs, feeder closed)."""


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
        prefetch_steps: score at most this many steps ahead of the slowest rank.
        ref_batch_size: pairs per reference call (default: reference.config.batch_size,
            else micro_batch_size).
        start_step: where prefetching starts (the resume step, when known).
        reference_free: the loss needs no reference (SimPO, ORPO): rows carry no ref_*
            columns, nothing is ever scored, and reference / ref_cache must be None.

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
        prefetch_steps: int = 2,
        ref_batch_size: Optional[int] = None,
        start_step: int = 0,
        reference_free: bool = False,
    ):
        if reference_free and (reference is not None or ref_cache):
            raise ValueError("reference_free=True takes no reference group and no ref_cache")
        self.reference_free = reference_free
        if prefetch_steps < 0:
            raise ValueError(f"prefetch_steps must be >= 0, got {prefetch_steps}")
        self.plan = plan
        self.train = PairStore.from_source(train)
        if len(self.train) == 0:
            raise ValueError("no training pairs: the feeder needs at least one tokenized pair")
        self.eval = PairStore.from_source(evaluation) if evaluation is not None else None
        if self.eval is not None and eval_max_pairs is not None:
            self.eval = self.eval.limit(eval_max_pairs)
        if ref_cache and self.eval is not None:
            _check_overlap(self.train, self.eval)
        self.reference = reference
        self.prefetch_steps = prefetch_steps
        self.ref_batch_size = ref_batch_size or int(
            getattr(getattr(reference, "config", None), "batch_size", 0) or plan.micro_batch_size
        )
        self._ref = _ref_array(self.train, ref_cache, reference_free)
        self._eval_ref = _ref_array(self.eval, ref_cache, reference_free) if self.eval is not None else None
        missing = int(np.isnan(self._ref[:, 0]).sum())
        if self._eval_ref is not None:
            missing += int(np.isnan(self._eval_ref[:, 0]).sum())
        if missing and reference is None:
            raise ValueError(
                f"{missing} pair(s) have no reference log-probs in ref_cache and no reference "
                "group was given; pass reference=ReferenceGroup(...) or a complete cache"
            )
        self._spe = plan.steps_per_epoch(len(self.train))
        self._total = plan.total_steps(len(self.train))

        self._cond = threading.Condition()
        self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._rank_pos = [min(max(start_step, 0), self._total)] * plan.num_workers
        self._wanted: collections.Counter[int] = collections.Counter()  # step -> waiting callers
        self._eval_wanted = False
        self._error: Optional[BaseException] = None
        self._closed = False
        self._fetches: dict[int, int] = {}
        self._stats = {"steps_served": 0, "get_step_calls": 0, "ref_batches_scored": 0,
                       "ref_pairs_scored": 0, "wait_seconds": 0.0, "max_wait_seconds": 0.0,
                       "eval_wait_seconds": 0.0}
        self._thread: Optional[threading.Thread] = None
        if missing:
            self._thread = threading.Thread(target=self._produce, name="feeder-prefetch", daemon=True)
            self._thread.start()

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

    def get_step(self, step: int, rank: int) -> list[list[dict]]:
        """gradient_accumulation_steps micro-batches of ``rank`` for ``step``.

        Each row is a tokenized pair dict plus ref_chosen_logp / ref_rejected_logp.
        Blocks until the reference log-probs are there; raises what the scoring raised.
        """
        self._check_step(step)
        if not 0 <= rank < self.plan.num_workers:
            raise ValueError(f"rank must be in [0, {self.plan.num_workers}), got {rank}")
        indices = self._step_indices(step)
        with self._cond:
            # The rank trains `step` next: prefetch covers step .. step + prefetch_steps.
            if self._rank_pos[rank] != step:
                self._rank_pos[rank] = step
                self._cond.notify_all()  # the window may have moved: wake the prefetcher
            waited = self._wait_for(lambda: self._scored(self._ref, indices), step)
            self._record_fetch(step, waited)
        mine = indices[np.arange(len(indices)) % self.plan.num_workers == rank]
        gas = self.plan.gradient_accumulation_steps
        return [self._rows(self.train, None if self.reference_free else self._ref, mine[m::gas]) for m in range(gas)]

    def get_eval(self, rank: int) -> list[list[dict]]:
        """Eval micro-batches of ``rank`` (micro_batch_size pairs, round-robin over ranks).

        Every rank gets the same number of micro-batches (trailing ones may be empty).
        Reference log-probs of all eval pairs are computed once, on the first call.
        """
        if self.eval is None:
            return []
        if not 0 <= rank < self.plan.num_workers:
            raise ValueError(f"rank must be in [0, {self.plan.num_workers}), got {rank}")
        everything = np.arange(len(self.eval))
        with self._cond:
            self._eval_wanted = True
            t0 = time.monotonic()
            self._wait_for(lambda: self._scored(self._eval_ref, everything), None)
            self._stats["eval_wait_seconds"] += time.monotonic() - t0
        w, mbs = self.plan.num_workers, self.plan.micro_batch_size
        count = math.ceil(math.ceil(len(self.eval) / w) / mbs)
        mine = everything[rank::w]
        ref = None if self.reference_free else self._eval_ref
        return [self._rows(self.eval, ref, mine[m * mbs:(m + 1) * mbs]) for m in range(count)]

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
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------ order

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
        if self._fetches[step] >= self.plan.num_workers:
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

    def _next_job(self) -> Optional[tuple[PairStore, np.ndarray, np.ndarray]]:
        """(store, ref array, row indices to score) or None; called holding self._cond.

        Priority: eval when asked for, then steps someone waits on, then the window: the
        slowest rank's current step and the prefetch_steps steps after it.
        """
        if self._eval_wanted and self._eval_ref is not None:
            todo = np.flatnonzero(np.isnan(self._eval_ref[:, 0]))
            if len(todo):
                return self.eval, self._eval_ref, todo
        frontier = min(self._rank_pos)
        window = range(frontier, min(frontier + self.prefetch_steps + 1, self._total))
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
        batch's results are published as soon as it returns."""
        size = self.ref_batch_size
        groups = [indices[i:i + size] for i in range(0, len(indices), size)]
        batches = ([store.row(int(i)) for i in group] for group in groups)
        for group, scored in zip(groups, self.reference.score_batches(batches)):
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


# --------------------------------------------------------------------------- actor


class KeepsInitError:
    """Mixin for actor classes (list it first): a constructor error is kept for ``ping``
    to raise.

    An exception in an actor's __init__ reaches the caller as ActorDiedError with the
    original error flattened into text; raised from a method it arrives as
    RayTaskError, whose ``cause`` is the original exception.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self._init_error: Optional[BaseException] = None
        try:
            super().__init__(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - re-raised by ping()
            self._init_error = err

    def ping(self) -> bool:
        if self._init_error is not None:
            raise self._init_error
        return True


class _FeederActor(KeepsInitError, BatchFeeder):
    """BatchFeeder as an actor whose constructor errors reach start_feeder intact."""


def start_feeder(
    *,
    train: Any,
    plan: BatchPlan,
    reference: Any = None,
    ref_cache: Optional[Mapping[str, Any]] = None,
    evaluation: Any = None,
    eval_max_pairs: Optional[int] = None,
    prefetch_steps: int = 2,
    start_step: int = 0,
    name: Optional[str] = None,
    reference_free: bool = False,
    max_restarts: int = 0,
) -> Any:
    """Start a BatchFeeder actor on this (the driver's) node and wait until it is ready.

    Threaded (max_concurrency = num_workers + 4: every rank can block in get_step while
    stats calls still get through), num_cpus=0 (it must never wait for a CPU that the
    train workers hold). Soft node affinity: the driver's node if it can, else anywhere.
    Constructor errors (e.g. an incomplete cache) are raised here.

    max_restarts: times Ray restarts the actor when its process dies. A restarted feeder is
    built again from the same arguments (Ray keeps them): steps are a function of the plan's
    seed, epoch and step, so it serves the same rows; reference log-probs scored so far are
    scored again. Calls in flight when it died are retried (max_task_retries=-1; every
    method is idempotent), so the policy workers only wait.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    options: dict[str, Any] = {
        "num_cpus": 0,
        "max_concurrency": plan.num_workers + 4,
        "max_restarts": max_restarts,
        "max_task_retries": -1 if max_restarts else 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=True
        ),
    }
    if name is not None:
        options["name"] = name
    handle = ray.remote(_FeederActor).options(**options).remote(
        train, plan, reference=reference, ref_cache=ref_cache, evaluation=evaluation,
        eval_max_pairs=eval_max_pairs, prefetch_steps=prefetch_steps, start_step=start_step,
        reference_free=reference_free,
    )
    try:
        ray.get(handle.ping.remote())
    except ray.exceptions.RayTaskError as err:
        ray.kill(handle)
        raise err.cause from None  # the constructor's own exception, message intact
    return handle
