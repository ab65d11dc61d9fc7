"""The seams between the policy workers, their step source and the engines' side, typed.

    StepSource     what a policy worker asks for its steps: BatchFeeder (offline) and the
                   OnlineCoordinator (its RoundFeeder) both are one
    PolicySync     what policy rank 0 calls at its sync points: PolicyFollower (an offline
                   run's held-out evaluator) and the OnlineCoordinator both are one
    Scorer         a judge with its lock and the decoder of token ids, shared by the rounds
                   and the held-out evals of one follower (they score in different threads)
    RunLog         where a part writes what it measured: metrics at a step, files, errors
    ReferenceRows  a ReferenceGroup and the rows it scores a call (reference.batch_size)

The workers hold Ray actor handles of a StepSource and a PolicySync (``handle.m.remote()``);
the Protocols say which methods a handle must have and what they return.

Pure: no ray, torch or vllm.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable


@runtime_checkable
class StepSource(Protocol):
    """Optimizer steps as pair rows, per rank (ray_dpo.feeder, CONTRACTS.md)."""

    def total_steps(self) -> int: ...

    def steps_per_epoch(self) -> int: ...

    def num_pairs_in_step(self, step: int) -> int: ...

    def get_step(self, step: int, rank: int, world: Optional[int] = None) -> list[list[dict]]: ...

    def get_eval(self, rank: int, world: Optional[int] = None) -> list[list[dict]]: ...


@runtime_checkable
class PolicySync(Protocol):
    """The engines' side as policy rank 0 sees it (engines/follower.py)."""

    def sync_points(self) -> list[int]: ...

    def probe(self) -> list: ...

    def sync_spec(self) -> dict: ...

    def begin_collective(self, step: int, ticket: Any) -> None: ...

    def collective_problem(self) -> Optional[str]: ...

    def advance(self, step: int, weights: Any, expected: list[float]) -> dict[str, float]: ...

    def resync(self, step: int, expected: list[float]) -> dict[str, float]: ...

    def needs_sync(self) -> Optional[str]: ...

    def finish(self, timeout_s: Optional[float] = None) -> None: ...


class Judge(Protocol):
    def score(self, prompts: Sequence[Any], completions: Sequence[str]) -> list[float]: ...


@dataclass
class Scorer:
    """judge.score under ``lock`` (one judge, several threads), and ``decode`` for samples
    whose engine returned no text."""

    judge: Judge
    decode: Callable[[list[int]], str]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def score(self, prompts: Sequence[Any], texts: Sequence[str]) -> list[float]:
        with self.lock:
            return self.judge.score(prompts, texts)

    def texts(self, completions: Sequence[Any]) -> list[str]:
        """Each completion's text (decoded from its tokens when the engine gave none)."""
        return [c.text if c.text is not None else self.decode(c.token_ids) for c in completions]


@dataclass(frozen=True)
class ReferenceRows:
    """Rows scored by a ReferenceGroup (its ``score_batches``), ``batch_size`` rows a call."""

    group: Any
    batch_size: int

    def score(self, rows: Sequence[dict]) -> list[dict]:
        """``rows`` with their reference log-probs, in order."""
        size = max(1, self.batch_size)
        return [r for batch in self.group.score_batches(rows[i:i + size] for i in range(0, len(rows), size))
                for r in batch]


@dataclass
class RunLog:
    """log(metrics, step); log_artifact(text, path) writes a file to the run (None: not
    kept); on_error(err): a part running in a thread failed, the run must hear of it."""

    log: Callable[[dict, int], None]
    on_error: Callable[[BaseException], None]
    log_artifact: Optional[Callable[[str, str], None]] = None
