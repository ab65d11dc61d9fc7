"""ReferenceGroup: places ReferenceActors and streams batches through them, in order.

The group, not Ray, retries failed batches (actors run with max_task_retries=0): it then
knows which batch failed on which actor and can wait for the restart, resubmit, count
and log, and fail with a useful message once Ray's restart budget is spent.

Observed on Ray 2.60 (see tests/ray/test_reference.py):
- A restartable actor's in-flight tasks fail with ActorUnavailableError ("The actor was
  restarted"), not ActorDiedError, whether it was ray.kill()ed, SIGKILLed or crashed.
  ActorDiedError means Ray will not restart it (budget spent, or __init__ raised).
- ray.kill() returns before the actor is dead: a ping sent right after it may still be
  answered by the old process. So "the actor answers" does not prove it restarted; a
  per-process incarnation id does.
- With max_task_retries=0, a task sent while the actor restarts fails at once with
  ActorUnavailableError ("The actor is restarting"), so the group pings with backoff
  until the new process answers. A task sent after the restart runs on the new process:
  a restart while the actor was idle fails nothing and shows only as a new incarnation.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import ray
from ray.exceptions import ActorDiedError, RayActorError

from ray_dpo import compat
from ray_dpo.capacity import DEFAULT_WAIT_S, Room, await_restart
from ray_dpo.config import ReferenceConfig
from ray_dpo.reference.actor import ReferenceActor
from ray_dpo.resources import actor_options

logger = logging.getLogger("ray_dpo.reference")

REF_COLUMNS = ("ref_chosen_logp", "ref_rejected_logp")
_SENT_KEYS = ("pair_id", "prompt_ids", "chosen_ids", "rejected_ids")


class ReferenceActorLostError(RuntimeError):
    """A reference actor is gone for good (restarts spent, failed to start, or timed out)."""


@dataclass
class _Task:
    seq: int  # position of the batch in the input stream
    actor: int


@dataclass
class _Stream:
    """State of one score_batches call."""

    load: list[int]  # tasks running per actor
    inputs: dict[int, tuple[list, Any]] = field(default_factory=dict)  # taken, not yet yielded:
    # seq -> (rows, ObjectRef of the rows as sent)
    done: dict[int, list[dict]] = field(default_factory=dict)  # seq -> scored rows
    running: dict[Any, _Task] = field(default_factory=dict)  # ObjectRef -> task
    failures: dict[int, int] = field(default_factory=dict)  # seq -> failed attempts
    next_in: int = 0
    next_out: int = 0


class ReferenceGroup:
    """``config.num_actors`` reference actors behind one ordered, bounded stream.

    model_path: reference model directory. config: ReferenceConfig (num_actors,
    num_cpus_per_actor, num_gpus_per_actor, resources, batch_size, max_in_flight,
    max_restarts). dtype: "fp32" | "bf16" | "fp16". use_gpu: give each actor
    num_gpus_per_actor GPUs (1 if that is 0) and run it on cuda.
    Actors are named ``f"{name_prefix}-{i}"`` in the current namespace, or
    ``f"{name_prefix}-{random hex}-{i}"`` if an earlier group still holds those names
    (``.names``). batch_size is each actor's pairs-per-forward limit;
    a batch may be bigger (it is split inside the actor).
    restart_timeout_s: how long to wait for an actor to (re)start (model load included),
    not counting a wait for a node with room for it, which capacity_wait_s bounds
    (run.capacity_wait_s, ray_dpo/capacity.py).
    """

    def __init__(
        self,
        *,
        model_path: str,
        config: ReferenceConfig,
        dtype: str,
        use_gpu: bool,
        name_prefix: str = "ray_dpo-ref",
        restart_timeout_s: float = 600.0,
        capacity_wait_s: float = DEFAULT_WAIT_S,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
    ):
        if config.num_actors < 1 or config.max_in_flight < 1 or config.max_restarts < 0:
            raise ValueError(
                "reference.num_actors and reference.max_in_flight must be >= 1 and "
                f"reference.max_restarts >= 0; got {config.num_actors}, {config.max_in_flight}, "
                f"{config.max_restarts}"
            )
        self.config = config
        self.model_path = model_path
        self.restart_timeout_s = restart_timeout_s
        options = actor_options(num_cpus=config.num_cpus_per_actor, num_gpus=config.num_gpus_per_actor,
                                resources=config.resources, use_gpu=use_gpu)
        options.update({
            "max_restarts": config.max_restarts,
            "max_task_retries": 0,
            # Best-effort spread over nodes: one node's failure takes one actor, and
            # actors do not fight for the same node's memory bandwidth.
            "scheduling_strategy": "SPREAD",
        })
        remote_cls = ray.remote(ReferenceActor)
        self.names = free_actor_names(name_prefix, config.num_actors)
        self._room = Room.of(options, capacity_wait_s)  # what a node must have to hold one actor
        self._actors = [
            remote_cls.options(name=name, **options).remote(
                model_path, dtype=dtype, device="cuda" if use_gpu else "cpu",
                micro_batch_size=config.batch_size, trust_remote_code=trust_remote_code,
                attn_implementation=attn_implementation, layout=config.layout,
                max_tokens_per_row=config.max_tokens_per_row,
            )
            for name in self.names
        ]
        self._incarnations: list[set[str]] = [set() for _ in self.names]  # seen per actor
        self._dispatched = 0  # round-robin tie-break among equally loaded actors
        self.restarts_per_actor = [0] * config.num_actors
        self.num_retries = 0  # batches resubmitted after an actor failure
        self._lock = threading.Lock()  # counters, when several threads stream at once

    # ------------------------------------------------------------------ public

    @property
    def num_actors(self) -> int:
        return len(self._actors)

    @property
    def actor_ids(self) -> list[str]:
        """Ray actor ids (hex) of the actors, e.g. to read their restart counts."""
        return compat.actor_ids(self._actors)

    @property
    def num_restarts(self) -> int:
        """Actor restarts this group has observed (a failed task or a new incarnation)."""
        return sum(self.restarts_per_actor)

    def wait_ready(self) -> None:
        """Block until every actor has loaded its model; raises ReferenceActorLostError."""
        for i in range(self.num_actors):
            if not self._incarnations[i]:
                self._await_actor(i, cause=None)

    def score(self, rows: list[Mapping[str, Any]]) -> list[dict]:
        """One batch: ``rows`` with ref_chosen_logp and ref_rejected_logp added."""
        return next(iter(self.score_batches([rows])))

    def score_batches(self, batches: Iterable[list[Mapping[str, Any]]]) -> Iterator[list[dict]]:
        """Score a stream of batches; yields them in input order, each exactly once.

        Each yielded batch is a list of new dicts: the input rows plus ref_chosen_logp,
        ref_rejected_logp (floats). At most num_actors * max_in_flight batches are taken
        from ``batches`` and not yet yielded (per call: concurrent calls each get that
        window); each goes to the least-loaded actor. A batch whose actor dies is
        resubmitted once the actor is back (``num_retries``); ReferenceActorLostError if
        it cannot come back. Scoring runs ahead while the caller works on a yielded batch.
        """
        if not self._actors:
            raise RuntimeError("this ReferenceGroup was shut down; create a new one")
        self.wait_ready()
        window = self.num_actors * self.config.max_in_flight
        source = iter(batches)
        stream = _Stream(load=[0] * self.num_actors)
        exhausted = False
        while True:
            while not exhausted and len(stream.inputs) < window:
                rows = next(source, None)
                exhausted = rows is None
                if not exhausted:
                    self._take(stream, list(rows))
            if stream.next_out in stream.done:
                del stream.inputs[stream.next_out]
                stream.next_out += 1
                yield stream.done.pop(stream.next_out - 1)
            elif stream.running:
                self._collect_one(stream)
            else:
                return  # source exhausted and everything taken has been yielded

    def kill_actor(self, i: int) -> None:
        """Kill actor ``i`` the way a crash would: Ray restarts it if budget is left."""
        ray.kill(self._actors[i], no_restart=False)

    def shutdown(self) -> None:
        """Kill every actor for good and free its resources."""
        for handle in self._actors:
            ray.kill(handle, no_restart=True)
        self._actors = []

    def __getstate__(self) -> dict:
        # Picklable (e.g. handed to a feeder actor): actor handles travel, the lock does not.
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ internals

    def _take(self, stream: _Stream, rows: list) -> None:
        seq = stream.next_in
        stream.next_in += 1
        if not rows:
            stream.inputs[seq] = (rows, None)
            stream.done[seq] = []
            return
        # Pre-slice to what the actor reads and put it once: a retry reuses the object.
        slim = [{k: row[k] for k in _SENT_KEYS if k in row} for row in rows]
        stream.inputs[seq] = (rows, ray.put(slim))
        self._submit(stream, seq)

    def _submit(self, stream: _Stream, seq: int) -> None:
        n = self.num_actors
        # Least loaded; ties go round-robin so equal actors share the work.
        i = min(range(n), key=lambda a: (stream.load[a], (a - self._dispatched) % n))
        self._dispatched = i + 1
        stream.load[i] += 1
        ref = self._actors[i].log_probs_tagged.remote(stream.inputs[seq][1])
        stream.running[ref] = _Task(seq, i)

    def _collect_one(self, stream: _Stream) -> None:
        """Wait for one task; store its result, or get its actor back and resubmit."""
        [ref], _ = ray.wait(list(stream.running), num_returns=1)
        task = stream.running.pop(ref)
        stream.load[task.actor] -= 1
        try:
            incarnation, out = ray.get(ref)
        except RayActorError as err:  # ActorDiedError, ActorUnavailableError
            logger.warning("reference actor %d failed on batch %d: %s",
                           task.actor, task.seq, _first_line(err))
            self._await_actor(task.actor, cause=err)
            stream.failures[task.seq] = stream.failures.get(task.seq, 0) + 1
            if stream.failures[task.seq] > self.num_actors * (self.config.max_restarts + 1):
                # Every restart budget would be spent by now if the actors really died:
                # the actors answer pings but keep failing this batch's task.
                raise ReferenceActorLostError(
                    f"batch {task.seq} failed {stream.failures[task.seq]} times on reference actors "
                    f"that still answer; last error on actor {task.actor}: {_first_line(err)}"
                ) from err
            with self._lock:
                self.num_retries += 1
            self._submit(stream, task.seq)
            return
        self._observe(task.actor, incarnation)
        rows = stream.inputs[task.seq][0]
        stream.done[task.seq] = [
            {**row, REF_COLUMNS[0]: c, REF_COLUMNS[1]: r}
            for row, c, r in zip(rows, out[REF_COLUMNS[0]], out[REF_COLUMNS[1]], strict=True)
        ]

    def _await_actor(self, i: int, cause: BaseException | None) -> None:
        """Wait until actor ``i`` answers (capacity.await_restart); record its incarnation.
        ActorDiedError means Ray gave up on it."""
        def timed_out() -> ReferenceActorLostError:
            return ReferenceActorLostError(
                f"reference actor {i} ({self.names[i]}) did not answer within "
                f"{self.restart_timeout_s:.0f}s (restarts used: {self.restarts_per_actor[i]} of "
                f"reference.max_restarts={self.config.max_restarts}); last error: {_first_line(cause)}")

        info = await_restart(self._actors[i].info.remote, timeout_s=self.restart_timeout_s,
                             wait=self._room.wait(f"reference actor {i} ({self.names[i]})"),
                             died=lambda err: self._lost_error(i, err), timed_out=timed_out)
        self._observe(i, info["incarnation"])

    def _observe(self, i: int, incarnation: str) -> None:
        """Count a restart the first time a new incarnation of actor i answers.

        A set, not "the last one": a result from the old process can arrive after the
        new process has answered a ping, and must not count as another restart.
        """
        with self._lock:
            seen = self._incarnations[i]
            if incarnation in seen:
                return
            seen.add(incarnation)
            if len(seen) == 1:
                return  # the first process: a start, not a restart
            self.restarts_per_actor[i] += 1
            count = self.restarts_per_actor[i]
        logger.warning("reference actor %d (%s) was restarted (%d restart(s) seen, "
                       "reference.max_restarts=%d)", i, self.names[i], count, self.config.max_restarts)

    def _lost_error(self, i: int, err: ActorDiedError) -> ReferenceActorLostError:
        where = f"reference actor {i} ({self.names[i]})"
        if err.actor_init_failed:
            return ReferenceActorLostError(
                f"{where} failed to start (model {self.model_path!r}): {_last_line(err)}"
            )
        used = _ray_restart_count(self._actors[i])
        used = self.restarts_per_actor[i] if used is None else used
        return ReferenceActorLostError(
            f"{where} died and Ray will not restart it: {used} restart(s) used of "
            f"reference.max_restarts={self.config.max_restarts}. Raise reference.max_restarts, "
            f"or read the actor's log for why it died (out of memory?). Last error: {_first_line(err)}"
        )


def free_actor_names(prefix: str, n: int) -> list[str]:
    """prefix-0 .. prefix-(n-1), or with a random infix if one of them is taken."""
    names = [f"{prefix}-{i}" for i in range(n)]
    for name in names:
        try:
            ray.get_actor(name)
        except ValueError:
            continue  # free
        infix = uuid.uuid4().hex[:6]
        logger.info("actor name %s is taken (an earlier group still alive?); using %s-%s-*",
                    name, prefix, infix)
        return [f"{prefix}-{infix}-{i}" for i in range(n)]
    return names


def _first_line(err: BaseException | None) -> str:
    return str(err).strip().splitlines()[0] if err is not None and str(err).strip() else repr(err)


def _last_line(err: BaseException) -> str:
    """The exception line at the end of a remote traceback ("FileNotFoundError: ...")."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[-1].strip() if lines else repr(err)


def _ray_restart_count(handle: Any) -> int | None:
    """Ray's own restart count from the GCS actor table, or None (compat.actor_restarts).

    Used only for an error message, so if it is unknown the caller falls back to the
    restarts the group observed.
    """
    ids = compat.actor_ids([handle])
    return compat.actor_restarts(ids[0]) if ids else None
