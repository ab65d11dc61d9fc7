"""EngineKeeper: brings a GenerationGroup's dead engines back before they generate again.

Ray restarts a dead engine actor (it loads the model it started with). The keeper notices
it on the first call that fails, or on an answer from a process it has not seen (every
engine answer carries its ``incarnation`` id: an engine restarted while idle fails no call),
then:

    waits until the new process answers
    loads the last synced weights into it (the same method, weights and options as that sync)
    verifies it on the last sync's probe (|engine - policy| <= online.sync_tolerance)

and the group sends the engine its unfinished work again. One recovery at a time (``lock``;
a sync holds it too, so a recovery never loads weights a sync is replacing).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ray_dpo.batching.probe import Probe
from ray_dpo.engines.weight_sync import check_loads, sync_method


class EngineLostError(RuntimeError):
    """A generation engine died and could not be brought back (restarts spent, start failed)."""


@dataclass
class Restore:
    """How to bring a restarted engine to the current weights: the last sync, and its check."""

    method: Optional[str] = None  # None: the engines still hold the model they started with
    weights: Any = None  # object_store keeps this ref alive: one copy of the policy (docs/fault-tolerance.md)
    options: dict = field(default_factory=dict)
    probe: Optional[list] = None
    expected: Optional[list[float]] = None
    version: Optional[int] = 0  # the policy step of these weights (0: the initial model; None: not said)


class EngineKeeper:
    """actors: the group's engine handles; incarnations: their first processes' ids.
    verify(probe, expected, tolerance, method, engines=[i]) -> diffs, raising above tolerance."""

    def __init__(self, actors: list, incarnations: list[str], *, backend: str, max_restarts: int, timeout_s: float,
                 verify: Callable[..., list[float]]):
        self.actors, self.incarnations = actors, list(incarnations)
        self.backend, self.max_restarts, self.timeout_s = backend, max_restarts, timeout_s
        self._verify = verify
        self.lock = threading.Lock()
        self.restore = Restore()
        self.restarts = 0  # engine restarts seen and recovered from

    def remember(self, method: str, weights: Any, options: dict, version: Optional[int] = None) -> None:
        """A sync: what a restarted engine loads from now on (hold ``lock``), and the policy
        step it is (``version``). Its probe comes with ``remember_probe`` once the sync is
        verified; until then the old probe's values would not match, so there is none."""
        self.restore = Restore(method, weights, dict(options), version=version)

    def remember_probe(self, probe: Probe, expected: Sequence[float]) -> None:
        """A verify without new weights: the check a restarted engine must pass."""
        with self.lock:
            self.restore.probe, self.restore.expected = list(probe), list(expected)

    def adopt(self, i: int, incarnation: str) -> None:
        """Engine i's process ``incarnation`` has just loaded a sync: a process Ray restarted
        while idle took it like any other, so it holds the synced weights (no reload later)."""
        with self.lock:
            if incarnation != self.incarnations[i]:
                self.incarnations[i] = incarnation
                self.restarts += 1
                print(f"[ray_dpo] generation engine {i} was restarted before this weight sync "
                      f"({self.restarts} restart(s) so far) and loaded it", flush=True)

    def recover(self, i: int, *, cause: Optional[BaseException], reload: bool = True) -> Optional[Any]:
        """Bring engine i back: wait for Ray's restart, load the last synced weights, verify
        them on the probe. Returns the LoadReport of that load; None when the engine answers
        with the incarnation already known (another thread recovered it, or it never
        restarted) or had nothing to load. reload=False: only wait for it (it died during
        a sync that its sender will send again, to every engine)."""
        import ray

        with self.lock:
            incarnation = self._await(i, cause)
            if incarnation == self.incarnations[i]:
                return None
            t0 = time.perf_counter()
            restore, report, diff = self.restore, None, None
            if reload and restore.method is not None:
                report = ray.get(self.load(i))
                check_loads([report], backend=self.backend)
            if reload and restore.probe is not None and restore.expected is not None:
                diff = max(self._verify(restore.probe, restore.expected, None, "restart", engines=[i]))
            self.incarnations[i] = incarnation
            self.restarts += 1
        if not reload:
            print(f"[ray_dpo] generation engine {i} restarted ({self.restarts} restart(s) so far) during a "
                  f"{restore.method} weight sync: the sync is sent again", flush=True)
            return None
        weights = "its initial model" if restore.method is None else f"the last synced weights ({restore.method})"
        check = "no probe yet" if diff is None else f"probe max |log-prob diff| {diff:.2e}"
        print(f"[ray_dpo] generation engine {i} restarted ({self.restarts} restart(s) so far): reloaded "
              f"{weights} in {time.perf_counter() - t0:.1f}s, {check}; its unfinished work is sent again",
              flush=True)
        return report

    def load(self, i: int):
        """Send engine i the weights of the last sync (a ref to its LoadReport)."""
        from ray_dpo.engines.facts import SYNC_METHODS

        restore = self.restore
        if SYNC_METHODS.get(restore.method).sent_by_policy:
            raise EngineLostError(
                f"generation engine {i} was restarted between weight syncs, but with "
                f"online.weight_sync={restore.method} only policy rank 0 holds the weights and it sends them "
                "at sync points only; run the same command again to resume from the last checkpoint (or use "
                "online.weight_sync=object_store, whose engines reload from the object store at any time)")
        [ref] = sync_method(restore.method)([self.actors[i]], restore.weights, **restore.options)
        return ref

    def _await(self, i: int, cause: Optional[BaseException]) -> str:
        """Ping engine i until it answers (with backoff); its incarnation id. ActorDiedError:
        Ray will not restart it (restarts spent, or its start failed)."""
        import ray
        from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

        deadline = time.monotonic() + self.timeout_s
        delay, pending = 0.05, None
        while True:
            pending = pending or self.actors[i].incarnation.remote()
            try:
                return ray.get(pending, timeout=max(0.1, min(10.0, deadline - time.monotonic())))
            except ActorDiedError as err:
                raise EngineLostError(
                    f"generation engine {i} ({self.backend}) died and Ray will not restart it "
                    f"({self.restarts} restart(s) recovered, at most {self.max_restarts} per engine: "
                    f"policy.max_failures). Read its log for why (out of memory?); run the same command "
                    f"again to resume from the last checkpoint. Last error: {error_line(err)}") from cause
            except GetTimeoutError:
                pass  # the same ping runs as soon as the engine is up
            except RayActorError:  # unavailable: this ping died with the old process
                pending = None
            if time.monotonic() >= deadline:
                raise EngineLostError(f"generation engine {i} did not come back within {self.timeout_s:.0f}s; "
                                      f"last error: {error_line(cause) if cause else '-'}") from cause
            time.sleep(delay)
            delay = min(2 * delay, 2.0)


def error_line(err: BaseException) -> str:
    """The last line of an error's cause: what to print of a Ray error."""
    cause = getattr(err, "cause", None) or err
    text = f"{type(cause).__name__}: {cause}"
    return text.strip().splitlines()[-1] if "\n" in text else text
