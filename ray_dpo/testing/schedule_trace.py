"""What an online run's schedule did, read from the intervals its roles recorded.

The stand-in roles of ray_dpo.testing.schedule record every interval they spend (the
engine generating, loading weights or scoring the probe; the reference scoring a batch;
the trainer fetching a step, training it or syncing) on one clock (time.monotonic, which
is system-wide on Linux, so the engine actors' intervals line up with the driver's).
This module turns them into per-round facts:

    Event(role, what, index, start, end)      one interval; index: the round (generate,
                                              score, built) or the 0-based step (fetch,
                                              train; sync: the completed-step count)
    rounds(events, steps_per_round) -> [RoundTiming]
    generation(events) -> {round: (start, end)}
    markdown_table(rows) -> str

A round's wall time runs from the end of the previous round's last training step (the run's
first sync for round 0) to the end of its own last step; "bound" is the longer of its
generation and its training, the most a perfect overlap could hide. Each interval the
trainer spent not training (a sync, a fetch) is put down to what it waited for:

    generation   the round's samples were not all generated when the wait began (a sync
                 waits here too: the weight load queues on the engine behind the samples)
    pairs        generated, but not yet judged, paired and installed
    reference    installed, but the step's reference log-probs were not scored yet
    sync         none of these: the weight load and probe check themselves

Pure: no ray, torch or vllm.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Iterable, Sequence

SLACK_FRACTION = 0.02
"""Waits below this fraction of a round's wall time are noise: the round counts as training-bound."""


@dataclass(frozen=True)
class Event:
    role: str  # "engine" | "reference" | "trainer" | "coordinator"
    what: str  # engine: generate, load, probe; reference: score; trainer: fetch, train, sync; coordinator: built
    index: int  # see the module docstring
    start: float  # seconds, time.monotonic()
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class RoundTiming:
    round: int
    start: float
    end: float
    train_s: float  # the round's training steps, summed
    gen_s: float  # the round's generation on the engines (first start to last end)
    waits: dict[str, float] = field(default_factory=dict)  # cause -> seconds the trainer waited

    @property
    def wall_s(self) -> float:
        return self.end - self.start

    @property
    def bound_s(self) -> float:
        return max(self.gen_s, self.train_s)

    @property
    def ratio(self) -> float:
        return self.wall_s / self.bound_s

    @property
    def waited_on(self) -> str:
        """The causes the trainer waited on for more than SLACK_FRACTION of the round, longest
        first; "nothing (training)" when none did."""
        causes = sorted(((s, c) for c, s in self.waits.items() if s > SLACK_FRACTION * self.wall_s), reverse=True)
        return ", ".join(f"{c} {s:.2f} s" for s, c in causes) or "nothing (training)"


def generation(events: Iterable[Event]) -> dict[int, tuple[float, float]]:
    """round -> (first start, last end) of its generate calls over all engines."""
    spans: dict[int, list[float]] = {}
    for e in events:
        if e.role == "engine" and e.what == "generate":
            lo, hi = spans.get(e.index, (e.start, e.end))
            spans[e.index] = [min(lo, e.start), max(hi, e.end)]
    return {r: (lo, hi) for r, (lo, hi) in spans.items()}


def rounds(events: Sequence[Event], steps_per_round: int) -> list[RoundTiming]:
    """Per round: its wall time, training, generation and what the trainer waited on."""
    gen = generation(events)
    built = {e.index: e.end for e in events if e.role == "coordinator" and e.what == "built"}
    trainer = sorted((e for e in events if e.role == "trainer"), key=lambda e: e.start)
    trains = [e for e in trainer if e.what == "train"]
    by_round: dict[int, list[Event]] = collections.defaultdict(list)
    for e in trains:
        by_round[e.index // steps_per_round].append(e)
    out: list[RoundTiming] = []
    start = min(e.start for e in trainer)
    for r in sorted(by_round):
        end = max(e.end for e in by_round[r])
        lo, hi = gen.get(r, (start, start))
        timing = RoundTiming(r, start, end, train_s=sum(e.seconds for e in by_round[r]), gen_s=hi - lo)
        for e in trainer:
            if e.what != "train" and start <= e.start < end and e.seconds > 0:
                cause = _cause(e.start, r, gen, built, sync=e.what == "sync")
                timing.waits[cause] = timing.waits.get(cause, 0.0) + e.seconds
        out.append(timing)
        start = end
    return out


def _cause(begin: float, r: int, gen: dict[int, tuple[float, float]], built: dict[int, float], *,
           sync: bool) -> str:
    if r in gen and gen[r][1] > begin:
        return "generation"
    if built.get(r, begin) > begin:
        return "pairs"
    return "sync" if sync else "reference"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
