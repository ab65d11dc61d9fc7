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

A chunk sent before a sync and lost with its engine after it (online.overlap submits a round
before the next sync) is generated again from the weights it was first sent with, so the
round is the one an unkilled run makes: the keeper holds an earlier sync's weights while
chunks sent with them are unfinished (``earlier``; object_store: one more reference to
that sync's object, dropped when they finish), and the group loads them, generates, and
loads the current weights back. Weights policy rank 0 sends itself (collective) cannot be
held, nor can an adapter engine go back to no adapter: such a chunk comes from the
current weights, and its version says so.

Under such a method a restarted engine has nothing to reload between syncs: the keeper
marks it ``awaiting`` and its chunks wait (``wait_for_weights``) until policy rank 0, told
by the follower's needs_sync, sends the weights again; a sync that loads it clears the mark.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ray_dpo.batching.probe import Probe
from ray_dpo.capacity import Room, await_restart
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
                 verify: Callable[..., list[float]], initial: Optional[str] = None, room: Optional[Room] = None):
        """initial: the HF directory the engines started from, which an engine reloads to
        regenerate a chunk of the initial model (None: cannot, e.g. adapter engines).
        room: what a node must have to hold one engine; a restart waits at most room.limit_s
        for such a node while there is none (ray_dpo/capacity.py), and that wait does not
        count against timeout_s."""
        self.actors, self.incarnations = actors, list(incarnations)
        self.backend, self.max_restarts, self.timeout_s = backend, max_restarts, timeout_s
        self.room = room or Room({})
        self._verify = verify
        self.initial = initial
        self.lock = threading.Lock()
        self._loaded = threading.Condition(self.lock)  # notified when awaiting engines are loaded
        self.awaiting: set[int] = set()  # restarted engines that wait for the policy to send weights
        self.restore = Restore()
        self.earlier: dict[Optional[int], Restore] = {}  # version -> an earlier sync chunks still need
        self.restarts = 0  # engine restarts seen and recovered from

    def remember(self, method: str, weights: Any, options: dict, version: Optional[int] = None, *,
                 keep_previous: bool = False) -> None:
        """A sync: what a restarted engine loads from now on (hold ``lock``), and the policy
        step it is (``version``). Its probe comes with ``remember_probe`` once the sync is
        verified; until then the old probe's values would not match, so there is none.
        keep_previous: unfinished chunks were sent with the previous sync's weights; hold
        them so a lost chunk is generated again from them, if both those and these can be
        loaded at any time (not under collective, whose weights only rank 0 sends)."""
        new = Restore(method, weights, dict(options), version=version)
        # Going back needs both: the earlier weights loaded, and these loaded again after it.
        if keep_previous and self.reloadable(self.restore) and self.reloadable(new):
            self.earlier[self.restore.version] = self.restore
        self.restore = new

    def reloadable(self, restore: Restore) -> bool:
        """Whether an engine can be loaded with ``restore`` at any time (not only at a sync)."""
        from ray_dpo.engines.facts import SYNC_METHODS

        if restore.method is None:
            return self.initial is not None
        return not SYNC_METHODS.get(restore.method).sent_by_policy

    def forget_earlier(self, needed: set) -> None:
        """Drop the earlier syncs no unfinished chunk was sent with (hold ``lock``)."""
        for version in [v for v in self.earlier if v not in needed]:
            del self.earlier[version]

    def remember_probe(self, probe: Probe, expected: Sequence[float]) -> None:
        """A verify without new weights: the check a restarted engine must pass."""
        with self.lock:
            self.restore.probe, self.restore.expected = list(probe), list(expected)

    def adopt(self, i: int, incarnation: str) -> None:
        """Engine i's process ``incarnation`` has just loaded a sync: a process Ray restarted
        while idle took it like any other, so it holds the synced weights (no reload later)."""
        with self.lock:
            if i in self.awaiting and incarnation == self.incarnations[i]:
                self.awaiting.discard(i)
                self._loaded.notify_all()
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
            # Between syncs of weights only policy rank 0 holds, there is nothing to reload.
            between_syncs = reload and restore.method is not None and not self.reloadable(restore)
            if reload and not between_syncs:
                if restore.method is not None:
                    report = ray.get(self.load(i))
                    check_loads([report], backend=self.backend)
                if restore.probe is not None and restore.expected is not None:
                    diff = max(self._verify(restore.probe, restore.expected, None, "restart", engines=[i]))
            self.incarnations[i] = incarnation
            self.restarts += 1
            if between_syncs or not reload:  # its initial model until a sync from rank 0 loads it
                self.awaiting.add(i)
        if between_syncs or not reload:
            when = "between" if between_syncs else "during a"
            then = ("it waits for policy rank 0 to send the weights again (only rank 0 holds them)" if between_syncs
                    else "the sync is sent again")
            print(f"[ray_dpo] generation engine {i} restarted ({self.restarts} restart(s) so far) {when} "
                  f"{restore.method} weight sync{'s' if between_syncs else ''}: {then}", flush=True)
            return None
        weights = ("started from the initial model, which no sync has replaced yet" if restore.method is None
                   else f"reloaded the last synced weights ({restore.method})")
        check = "no probe yet" if diff is None else f"probe max |log-prob diff| {diff:.2e}"
        print(f"[ray_dpo] generation engine {i} restarted ({self.restarts} restart(s) so far): {weights} "
              f"in {time.perf_counter() - t0:.1f}s, {check}; its unfinished work is sent again", flush=True)
        return report

    def wait_for_weights(self, i: int) -> None:
        """Block until engine i holds synced weights again (a no-op unless ``awaiting``)."""
        deadline = time.monotonic() + self.timeout_s
        with self.lock:
            while i in self.awaiting:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise EngineLostError(
                        f"generation engine {i} was restarted between weight syncs and no sync reached it "
                        f"within {self.timeout_s:.0f}s (with online.weight_sync={self.restore.method} only policy "
                        "rank 0 holds the weights); run the same command again to resume from the last checkpoint")
                self._loaded.wait(timeout=min(left, 5.0))

    def load(self, i: int, restore: Optional[Restore] = None):
        """Send engine i the weights of the last sync, or of ``restore`` (a ref to its LoadReport)."""
        from ray_dpo.engines.facts import SYNC_METHODS

        restore = restore or self.restore
        if restore.method is None:  # the initial model, from the directory the engines started with
            [ref] = sync_method("checkpoint")([self.actors[i]], self.initial)
            return ref
        if SYNC_METHODS.get(restore.method).sent_by_policy:  # callers ask reloadable() first
            raise ValueError(f"online.weight_sync={restore.method}: only policy rank 0 can send these weights")
        [ref] = sync_method(restore.method)([self.actors[i]], restore.weights, **restore.options)
        return ref

    def _await(self, i: int, cause: Optional[BaseException]) -> str:
        """Engine i's incarnation id once it answers again (capacity.await_restart).
        ActorDiedError: Ray will not restart it (restarts spent, or its start failed)."""
        def died(err: BaseException) -> EngineLostError:
            return EngineLostError(
                f"generation engine {i} ({self.backend}) died and Ray will not restart it "
                f"({self.restarts} restart(s) recovered, at most {self.max_restarts} per engine: "
                f"policy.max_failures). Read its log for why (out of memory?); run the same command "
                f"again to resume from the last checkpoint. Last error: {error_line(err)}")

        def timed_out() -> EngineLostError:
            return EngineLostError(f"generation engine {i} did not come back within {self.timeout_s:.0f}s; "
                                   f"last error: {error_line(cause) if cause else '-'}")

        return await_restart(self.actors[i].incarnation.remote, timeout_s=self.timeout_s,
                             wait=self.room.wait(f"generation engine {i} ({self.backend})"),
                             died=died, timed_out=timed_out)


def error_line(err: BaseException) -> str:
    """The last line of an error's cause: what to print of a Ray error."""
    cause = getattr(err, "cause", None) or err
    text = f"{type(cause).__name__}: {cause}"
    return text.strip().splitlines()[-1] if "\n" in text else text
