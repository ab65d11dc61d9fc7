"""Waiting for a lost node's capacity to come back, for at most run.capacity_wait_s.

A node that disappears (a spot instance reclaimed, a pod evicted) takes every actor on it.
Ray restarts them, within their restart budgets, as soon as some live node has room: on a
cluster that is when a replacement node joins, minutes later or never. Each role's wait
holds one CapacityWait: the reference group's and the engine keeper's loops that wait for
a restarted actor, and the Ray Train controller before it starts a new worker group.

While no live node can hold what the role asks for, the wait says so in one console line
(which role, what it needs, which node was lost, how long it will wait); once that has
lasted ``limit_s`` it gives up with CapacityLostError, whose message names the same. The
error is one of faults.LOST_FOR_GOOD: the run ends with the line that says how to resume.

"No live node can hold it" compares a node's total resources with one actor's request
(``room``): what other roles use at the moment is Ray's scheduling, not a lost node. On an
autoscaling cluster the pending actor or placement group is what asks for a new node, so
the wait never withdraws it; it only bounds how long the run keeps asking.

Pure except ``live_nodes`` (ray.nodes(), Ray's public node table).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

DEFAULT_WAIT_S = 600.0


class CapacityLostError(RuntimeError):
    """A role's node was lost and no node that can hold it came back within run.capacity_wait_s."""


def request_of(options: Mapping[str, Any]) -> dict[str, float]:
    """{resource: amount} one actor asks for, from its ``.options()`` (resources.actor_options)."""
    request = {"CPU": float(options.get("num_cpus") or 0), "GPU": float(options.get("num_gpus") or 0),
               **{k: float(v) for k, v in (options.get("resources") or {}).items()}}
    return {k: v for k, v in request.items() if v > 0}


def slots(request: Mapping[str, float], total: Mapping[str, float]) -> int:
    """How many actors asking ``request`` a node with ``total`` resources can hold."""
    fits = [int(total.get(k, 0.0) / v + 1e-9) for k, v in request.items() if v > 0]
    return min(fits) if fits else 1 << 30


def room(request: Mapping[str, float], nodes: list[dict]) -> int:
    """Actors asking ``request`` the live ``nodes`` (ray.nodes() entries) can hold in all."""
    return sum(slots(request, n.get("Resources") or {}) for n in nodes if n.get("Alive"))


def node_name(node: Mapping[str, Any]) -> str:
    """A node as a user finds it: its address and the start of its id (nodes on one machine
    share the address)."""
    return f"{node.get('NodeManagerAddress', '?')} (id {str(node.get('NodeID', ''))[:8]})"


# Ray's DeathReason of a node lost unexpectedly or preempted (not scaled down when idle).
_LOST = (2, 3)


def lost_nodes(nodes: list[dict], before: frozenset = frozenset()) -> list[str]:
    """The nodes Ray saw die unexpectedly or preempted, except those in ``before`` (lost
    before the role started), with Ray's reason. A dead node lists no resources, so which
    role was on it is not in the node table."""
    return [f"{node_name(n)}: {n.get('DeathReasonMessage') or 'lost'}" for n in nodes
            if not n.get("Alive") and n.get("DeathReason") in _LOST and n.get("NodeID") not in before]


def dead_node_ids() -> frozenset:
    """Ids of the nodes that are dead now: a role that starts takes this, so that its wait
    later names only the nodes lost since."""
    return frozenset(n.get("NodeID") for n in live_nodes() if not n.get("Alive"))


def describe(request: Mapping[str, float]) -> str:
    """{CPU: 1, reference_node: 1}: a request as the config spells its resources."""
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in request.items()) + "}"


def live_nodes() -> list[dict]:
    """Ray's node table (live and dead nodes), [] when it cannot be read."""
    import ray

    try:
        return ray.nodes()
    except Exception:  # noqa: BLE001 - unknown this time: treated as "no lost node"
        return []


@dataclass(frozen=True)
class Room:
    """What a node must have to hold one actor of a role (``request``), how long a restart
    waits for such a node (run.capacity_wait_s) and the nodes already dead when the role
    started (``before``: not the ones it lost)."""

    request: dict
    limit_s: float = DEFAULT_WAIT_S
    before: frozenset = frozenset()

    @classmethod
    def of(cls, options: Mapping[str, Any], limit_s: float) -> "Room":
        """From the role's actor ``.options()``, with Ray's node table as it is now."""
        return cls(request_of(options), limit_s, dead_node_ids())

    def wait(self, role: str) -> "CapacityWait":
        return CapacityWait(role, self.request, limit_s=self.limit_s, before=self.before)


class CapacityWait:
    """One role's wait for room on a live node.

    role: what the user reads ("reference actor 0 (ray_dpo-ref-0)", "2 policy workers").
    request: what each of its ``count`` actors asks for. limit_s: run.capacity_wait_s.
    before: dead_node_ids() when the role started (those are not its lost nodes).
    nodes/clock/say: Ray's node table, time and the console, replaceable in tests.
    """

    def __init__(self, role: str, request: Mapping[str, float], *, limit_s: float, count: int = 1,
                 before: frozenset = frozenset(),
                 nodes: Callable[[], list[dict]] = live_nodes, clock: Callable[[], float] = time.monotonic,
                 say: Callable[[str], None] = lambda line: print(line, flush=True)):
        self.role, self.request, self.count, self.limit_s = role, dict(request), count, float(limit_s)
        self._nodes, self._clock, self._say = nodes, clock, say
        self.before = before
        self.since: Optional[float] = None  # when the current wait began
        self.lost: list[str] = []

    def check(self) -> Optional[float]:
        """None when live nodes have room for the role; else the seconds of the wait left,
        saying the wait's line when it begins. CapacityLostError once ``limit_s`` is over."""
        nodes = self._nodes()
        if not nodes or room(self.request, nodes) >= self.count:
            self.since = None
            return None
        now = self._clock()
        if self.since is None:
            self.since = now
            self.lost = lost_nodes(nodes, self.before)
            self._say(f"[ray_dpo] waiting up to {self.limit_s:.0f}s (run.capacity_wait_s) for a node with room "
                      f"for {self.role}: {self._needs()}; {self._why()}")
        left = self.limit_s - (now - self.since)
        if left <= 0:
            raise CapacityLostError(self.gave_up())
        return left

    def gave_up(self) -> str:
        return (f"{self.role} lost: {self._why()}, and no node with room ({self._needs()}) "
                f"came back within run.capacity_wait_s={self.limit_s:.0f}s")

    def _needs(self) -> str:
        each = " each" if self.count > 1 else ""
        return f"{describe(self.request)}{each}"

    def _why(self) -> str:
        if self.lost:
            return f"lost node{'s' if len(self.lost) > 1 else ''} {'; '.join(self.lost[-2:])}"
        return "no live node has these resources"


def await_restart(ping: Callable[[], Any], *, timeout_s: float, wait: CapacityWait,
                  died: Callable[[BaseException], BaseException],
                  timed_out: Callable[[], BaseException]) -> Any:
    """What ``ping()`` (a fresh call to an actor Ray restarts: an ObjectRef) answers, asked
    with backoff until the actor is back. Ray's ActorUnavailableError and timeouts mean
    "restarting, keep waiting"; ActorDiedError means Ray gave up on it: ``died(err)`` is
    raised. The actor has ``timeout_s`` to answer (model load included), not counting a wait
    for a node with room for it (``wait``: CapacityLostError when that is over); after that
    ``timed_out()`` is raised. The reference group and the engine keeper wait this way."""
    import ray
    from ray.exceptions import ActorDiedError, GetTimeoutError, RayActorError

    deadline = time.monotonic() + timeout_s
    delay, pending, left = 0.05, None, None  # left: of the wait for room, while there is none
    while True:
        pending = pending or ping()
        try:
            timeout = min(10.0, deadline - time.monotonic(), 10.0 if left is None else left)
            return ray.get(pending, timeout=max(0.1, timeout))
        except ActorDiedError as err:
            lost = died(err)
            if lost is err:
                raise
            raise lost from err
        except GetTimeoutError:
            pass  # the same ping runs as soon as the actor is up
        except RayActorError:  # unavailable: this ping died with the old process
            pending = None
        left = wait.check()
        if left is not None:  # its node is lost and none has room: the restart clock stops
            deadline = max(deadline, time.monotonic() + timeout_s)
        if time.monotonic() >= deadline:
            raise timed_out()
        time.sleep(delay)
        delay = min(2 * delay, 2.0)
