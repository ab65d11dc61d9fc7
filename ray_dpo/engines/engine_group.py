"""GenerationGroup: the generation engines as Ray actors, behind one ordered generate().

    GenerationGroup(*, model_path, spec: EngineSpec, use_gpu, max_restarts=0)
        .generate(prompts, n=, sampling=, seed=) -> list[list[Completion]]  (input order)
        .submit(...) -> [Chunk], .collect(chunks)                           (the same, split)
        .sync_weights(weights, method=, probe=, expected=) -> SyncReport    (see weight_sync)
        .start_sync(...) -> PendingSync, .finish_sync(pending, probe=, ...) (the same, split)
        .verify(probe, expected) -> max |log-prob diff|, .shutdown()

A dead engine (process killed, node lost) is restarted by Ray up to ``max_restarts`` times;
the group's EngineKeeper (engine_restarts.py) reloads the last synced weights into it and
checks them on the probe before the group sends it its unfinished chunks again (the same
prompts, n, sampling and seed), so a round's samples are complete. A chunk lost after a later
sync (online.overlap) is generated again from the weights it was first sent with, loaded
around it, so its samples are the ones the unkilled engine gives (engine_restarts.py says
when that cannot be done and the chunk's version says so).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ray_dpo import compat
from ray_dpo.batching.probe import Probe
from ray_dpo.capacity import Room, await_restart
from ray_dpo.config import SamplingConfig
from ray_dpo.engines.engine_restarts import EngineKeeper, EngineLostError, error_line
from ray_dpo.engines.facts import ENGINES, SYNC_METHODS
from ray_dpo.engines.generation import Completion, engine_actor_options
from ray_dpo.engines.spec import EngineSpec
from ray_dpo.engines.weight_sync import (
    SyncReport,
    WeightSyncError,
    check_diffs,
    check_loads,
    max_logprob_diffs,
    sync_method,
)

logger = logging.getLogger("ray_dpo.engines")


@dataclass
class Chunk:
    """One engine's share of a submit(): what it was asked, so a restarted engine is asked again."""

    engine: int
    prompts: list[list[int]]
    kwargs: dict  # n, sampling, seed
    ref: Any = None
    incarnation: str = ""  # the engine process it was sent to
    version: Optional[int] = None  # the policy step of the weights it is generated from (None: not said)
    back: Any = None  # sent again from earlier weights: the load of the current ones after it
    sends: int = 0  # how often it was sent (0: held back, its engine waits for weights)


@dataclass
class PendingSync:
    """A sync whose load calls are on their way to the engines (GenerationGroup.start_sync)."""

    method: str
    refs: list
    t0: float


class _Restarted:
    """An engine that died during a sync and is back (with its initial model)."""


class SyncInterrupted(WeightSyncError):
    """An engine died during a sync whose weights policy rank 0 sends itself (collective) and
    was restarted: the sync must be sent again, to every engine."""


class GenerationGroup:
    """``spec.num_engines`` long-lived engine actors behind one ordered generate().

    model_path: the policy's initial HF model directory. spec: EngineSpec (backend,
    num_engines, num_cpus_per_engine, num_gpus_per_engine, resources, samples_per_prompt,
    sampling, weight_sync, sync_tolerance). use_gpu: engines on cuda with num_gpus_per_engine
    GPUs each (1 if 0). dtype: engine weights' dtype. seed: base seed; call k of generate()
    without a seed uses seed + k * 1_000_003 so rounds differ but reruns repeat.
    engine_options: extra keyword arguments for the engine class (e.g. max_model_len).
    max_restarts: how often Ray restarts each engine (see the module docstring).
    """

    def __init__(self, *, model_path: str, spec: EngineSpec, use_gpu: bool, dtype: str = "fp32",
                 seed: int = 0, start_timeout_s: float = 600.0, engine_options: Optional[dict] = None,
                 max_restarts: int = 0):
        import ray

        ENGINES.get(spec.backend)  # ValueError naming the valid backends
        if spec.num_engines < 1:
            raise ValueError(f"online.num_engines must be >= 1, got {spec.num_engines}")
        self.spec = spec
        self.model_path = model_path
        self._seed = seed
        self._calls = 0
        device = "cuda" if use_gpu else "cpu"
        options = engine_actor_options(spec, use_gpu=use_gpu)
        # The group, not Ray, resends a dead engine's work: it must reload weights first.
        remote_cls = ray.remote(ENGINES[spec.backend].load()).options(**options, max_restarts=max_restarts,
                                                                 max_task_retries=0)
        self._actors = [
            remote_cls.remote(model_path, seed=seed, dtype=dtype, device=device, **(engine_options or {}))
            for _ in range(spec.num_engines)
        ]
        t0 = time.perf_counter()
        room = Room.of(options, spec.capacity_wait_s)
        # Their start waits for room as a restart does (a coordinator restarted after its
        # engines' node was lost starts new ones); a constructor error is raised as it is.
        incarnations = [
            await_restart(a.incarnation.remote, timeout_s=start_timeout_s, wait=room.wait(f"generation engine {i}"),
                          died=lambda err: err,
                          timed_out=lambda: EngineLostError(f"generation engine {i} did not start within "
                                                            f"{start_timeout_s:.0f}s"))
            for i, a in enumerate(self._actors)]
        # Adapter engines (lora_rank) cannot go back to serving no adapter: no initial reload.
        initial = None if (engine_options or {}).get("lora_rank") else model_path
        self.keeper = EngineKeeper(self._actors, incarnations, backend=spec.backend, max_restarts=max_restarts,
                                   timeout_s=start_timeout_s, verify=self._verify, initial=initial, room=room)
        self._unfinished: list[Chunk] = []  # sent, their completions not yet collected
        logger.info("%d %s generation engine(s) up in %.1fs", len(self._actors), spec.backend,
                    time.perf_counter() - t0)

    @property
    def num_engines(self) -> int:
        return len(self._actors)

    @property
    def actor_ids(self) -> list[str]:
        """The engines' Ray actor ids (hex), for counting their restarts."""
        return compat.actor_ids(self._actors)

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: Sequence[Sequence[int]], *, n: Optional[int] = None,
                 sampling: Optional[SamplingConfig] = None, seed: Optional[int] = None) -> list[list[Completion]]:
        """n completions for each prompt (token ids), in prompt order.

        Prompts are split into contiguous, near-equal chunks, one per engine.
        Defaults: n = spec.samples_per_prompt, sampling = spec.sampling.
        """
        return self.collect(self.submit(prompts, n=n, sampling=sampling, seed=seed))

    def submit(self, prompts: Sequence[Sequence[int]], *, n: Optional[int] = None,
               sampling: Optional[SamplingConfig] = None, seed: Optional[int] = None) -> list[Chunk]:
        """Start generate() on the engines and return at once (the chunks for ``collect``).

        Engines run calls in the order they were submitted, so a weight sync submitted
        after this never changes the weights these samples come from.
        """
        n = self.spec.samples_per_prompt if n is None else n
        sampling = self.spec.sampling if sampling is None else sampling
        if seed is None:
            seed = self._seed + self._calls * 1_000_003
        self._calls += 1
        chunks = [Chunk(i, [list(p) for p in prompts[lo:hi]], {"n": n, "sampling": sampling, "seed": seed + lo * n})
                  for i, (lo, hi) in enumerate(_chunks(len(prompts), self.num_engines)) if hi > lo]
        with self.keeper.lock:
            self._unfinished += chunks
        for chunk in chunks:
            self._send(chunk)
        return chunks

    def collect(self, chunks: list[Chunk]) -> list[list[Completion]]:
        """The completions of a ``submit``, in prompt order; a dead engine's chunk is sent
        again once the engine is back (module docstring)."""
        return [comps for chunk in chunks for comps in self._result(chunk)]

    def sampled_from(self, chunks: Sequence[Chunk]) -> Optional[int]:
        """The oldest policy step whose weights generated ``chunks`` (once collected), None if
        a sync did not say its step. A chunk sent again to a restarted engine after a sync is
        generated from the weights it was first sent with where the keeper could hold them
        (engine_restarts), else from the newer weights, and then says so."""
        versions = [c.version for c in chunks]
        return min(versions) if versions and None not in versions else None

    def _send(self, chunk: Chunk) -> None:
        # Under the keeper's lock: no sync is queueing loads meanwhile, so the engine runs this
        # chunk on the weights of the last sync queued before it (the keeper's restore), or,
        # sent again after a sync, on the earlier weights it first went with, loaded around it.
        import ray

        with self.keeper.lock:
            if chunk.engine in self.keeper.awaiting:  # restarted, no weights yet: _result sends it later
                chunk.ref = None
                return
            first, restore = chunk.sends == 0, self.keeper.restore
            chunk.sends += 1
            earlier = None if first or chunk.version == restore.version else self.keeper.earlier.get(chunk.version)
            chunk.incarnation = self.keeper.incarnations[chunk.engine]
            chunk.back = None
            if earlier is not None:
                # Waited for: a checkpoint load must read its directory before the load
                # back rewrites it. A failure here is the engine's, handled like the chunk's.
                check_loads([ray.get(self.keeper.load(chunk.engine, earlier))], backend=self.spec.backend)
                if earlier.probe is not None and earlier.expected is not None:
                    self._verify(earlier.probe, earlier.expected, None, "regenerate", engines=[chunk.engine])
            else:
                chunk.version = restore.version
            chunk.ref = self._actors[chunk.engine].tagged.remote("generate", chunk.prompts, **chunk.kwargs)
            if earlier is not None:
                chunk.back = self.keeper.load(chunk.engine)

    def _result(self, chunk: Chunk) -> list[list[Completion]]:
        """A chunk's completions from the engine process that holds the synced weights.

        Bounded: each repeat needs a new engine process, and Ray makes at most
        max_restarts of them. An engine restarted while idle answers the next call from
        its initial model without failing it, hence the incarnation tag on every answer.
        """
        import ray
        from ray.exceptions import RayActorError

        resend = chunk.ref is None  # held back at submit: its engine waited for weights
        while True:
            try:
                if resend:
                    self.keeper.wait_for_weights(chunk.engine)
                    self._send(chunk)
                    if chunk.ref is None:  # restarted again meanwhile
                        continue
                incarnation, out = ray.get(chunk.ref)
                if chunk.back is not None:  # the current weights, loaded again after the earlier ones
                    check_loads([ray.get(chunk.back)], backend=self.spec.backend)
            except RayActorError as err:
                logger.warning("generation engine %d failed on %d prompt(s): %s", chunk.engine,
                               len(chunk.prompts), error_line(err))
                self.keeper.recover(chunk.engine, cause=err)
            else:
                if incarnation == chunk.incarnation:
                    self._finished(chunk)
                    return out
                # Another process than the one it was sent to (restarted while idle): its
                # weights may be the initial ones. Recover (if nobody did) and ask again.
                self.keeper.recover(chunk.engine, cause=None)
            resend = True

    def _finished(self, chunk: Chunk) -> None:
        with self.keeper.lock:
            self._unfinished = [c for c in self._unfinished if c is not chunk]
            self.keeper.forget_earlier({c.version for c in self._unfinished})

    # ------------------------------------------------------------------ weights

    def sync_weights(self, weights: Any, *, method: Optional[str] = None, probe: Optional[Probe] = None,
                     expected: Optional[Sequence[float]] = None, tolerance: Optional[float] = None,
                     version: Optional[int] = None, **options: Any) -> SyncReport:
        """Push new weights to every engine, then (with a probe) verify them.

        weights: state dict name -> tensor (HF names, full under ZeRO-3), an ObjectRef to
        one, AdapterWeights, (method="checkpoint") a safetensors directory, or
        (method="collective") the SyncTicket of the sender, who broadcasts after
        ``start_sync``. method: object_store | checkpoint | collective (default
        online.weight_sync). probe + expected: the fixed probe and the policy's summed
        log-probs on it (batching.probe.torch_probe_logps). version: the policy step of these
        weights (None: not said). options: checkpoint_dir=.
        Raises WeightSyncError when an engine fails to load, misses tensors, or disagrees;
        SyncInterrupted when an engine died during a collective sync (send it again).
        An engine that died during another method's sync is restarted and loaded by ``recover``.
        """
        return self.finish_sync(self.start_sync(weights, method=method, version=version, **options), probe=probe,
                                expected=expected, tolerance=tolerance)

    def start_sync(self, weights: Any, *, method: Optional[str] = None, version: Optional[int] = None,
                   **options: Any) -> PendingSync:
        """The first half of ``sync_weights``: the engines' load calls are on their way.
        version: the policy step of these weights (what ``sampled_from`` reports)."""
        method = method or self.spec.weight_sync
        t0 = time.perf_counter()
        with self.keeper.lock:
            # What a restarted engine loads from now on (also one that dies during this sync),
            # holding the weights before it while chunks sent with them are not collected.
            previous = self.keeper.restore.version
            self.keeper.remember(method, weights, options, version,
                                 keep_previous=any(c.version == previous for c in self._unfinished))
            refs = sync_method(method)(self._actors, weights, **options)
        return PendingSync(method, refs, t0)

    def finish_sync(self, pending: PendingSync, *, probe: Optional[Probe] = None,
                    expected: Optional[Sequence[float]] = None, tolerance: Optional[float] = None) -> SyncReport:
        """The second half of ``sync_weights``: every engine's load, then the probe."""
        method = pending.method
        outcomes = [self._load_result(i, ref, method) for i, ref in enumerate(pending.refs)]  # none unread
        restarted = [i for i, out in enumerate(outcomes) if isinstance(out, _Restarted)]
        if restarted:
            raise SyncInterrupted(
                f"generation engine(s) {restarted} died during a {method} weight sync and were restarted; "
                "the sync must be sent again")
        failed = [(i, out) for i, out in enumerate(outcomes) if isinstance(out, BaseException)]
        if failed:
            i, err = failed[0]
            raise WeightSyncError(
                f"generation engine {i} ({self.spec.backend}) failed to load the weights "
                f"(method={method}; {len(failed)} of {len(outcomes)} engines failed): {error_line(err)}. "
                "Its weights may now be partly updated: fix the state dict (names and shapes as in "
                "the HF checkpoint) and sync again."
            ) from err
        loads = outcomes
        for i, report in enumerate(loads):
            report.engine = i
            if report.incarnation:
                self.keeper.adopt(i, report.incarnation)
        result = SyncReport(method=method, seconds=time.perf_counter() - pending.t0, loads=loads)
        check_loads(loads, backend=self.spec.backend)
        if probe is not None:
            if expected is None:
                raise ValueError("verify needs the policy's log-probs on the probe: pass expected=")
            self.keeper.remember_probe(probe, expected)
            with self.keeper.lock:  # never between a resent chunk's earlier weights and their load back
                result.engine_diffs = self._verify(probe, expected, tolerance, method)
        return result

    def _load_result(self, i: int, ref: Any, method: str):
        """Engine i's LoadReport of a sync, or the task's error. An engine that died
        meanwhile is recovered, which loads these weights; under a method whose weights
        policy rank 0 sends (collective) it is only brought back (_Restarted): the sender
        must send again."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(ref)
        except RayTaskError as err:
            return err
        except RayActorError as err:
            if SYNC_METHODS.get(method).sent_by_policy:
                self.keeper.recover(i, cause=err, reload=False)
                return _Restarted()
            report = self.keeper.recover(i, cause=err)
            return report if report is not None else ray.get(self.keeper.load(i))

    def verify(self, probe: Probe, expected: Sequence[float], *, tolerance: Optional[float] = None) -> float:
        """Max |engine - policy| summed log-prob over engines and probe items; raises
        WeightSyncError above ``tolerance`` (default online.sync_tolerance). The probe and
        expected values become what a restarted engine is checked against."""
        self.keeper.remember_probe(probe, expected)
        with self.keeper.lock:  # as in finish_sync
            return max(self._verify(probe, expected, tolerance, method="verify"))

    def shutdown(self) -> None:
        import ray

        for a in self._actors:
            ray.kill(a)
        self._actors = []

    def _verify(self, probe, expected, tolerance, method, engines: Optional[list[int]] = None) -> list[float]:
        import ray

        tolerance = self.spec.sync_tolerance if tolerance is None else tolerance
        engines = list(range(self.num_engines)) if engines is None else engines
        items = [(list(p), list(c)) for p, c in probe]
        engine_logps = ray.get([self._actors[i].probe_logps.remote(items) for i in engines])
        diffs = max_logprob_diffs(engine_logps, list(expected))
        check_diffs(diffs, engine_logps, list(expected), tolerance=tolerance, backend=self.spec.backend,
                    method=method)
        return diffs

def _chunks(total: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) bounds of ``parts`` contiguous chunks whose sizes differ by at most one."""
    base, extra = divmod(total, parts)
    bounds, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds
