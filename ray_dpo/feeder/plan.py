"""BatchPlan: how pairs are cut into optimizer steps (the step layout of ray_dpo.feeder)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


def accumulation_steps(gradient_accumulation_steps: int, num_workers: int, world: int) -> int:
    """Micro-batches per rank per optimizer step when ``world`` of the ``num_workers`` ranks
    train (an elastic run that lost some): gradient_accumulation_steps at full size, else
    enough that the same global batch fits, ceil(num_workers * gas / world). Each
    micro-batch still holds at most micro_batch_size pairs, so a step trains the same pairs
    with the same update whatever the world size; a rank's trailing micro-batches may be
    empty (the feeder's step layout)."""
    if world >= num_workers:
        return gradient_accumulation_steps
    return math.ceil(num_workers * gradient_accumulation_steps / world)


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

    def accumulation(self, world: Optional[int] = None) -> int:
        """Micro-batches per rank per step when ``world`` ranks train (accumulation_steps;
        None: all num_workers)."""
        world = self.num_workers if world is None else world
        if not isinstance(world, int) or not 1 <= world <= self.num_workers:
            raise ValueError(f"world must be in [1, {self.num_workers}] (policy.num_workers), got {world!r}")
        return accumulation_steps(self.gradient_accumulation_steps, self.num_workers, world)

    def total_steps(self, num_pairs: int) -> int:
        total = self.steps_per_epoch(num_pairs) * self.num_epochs
        return min(total, self.max_steps) if self.max_steps is not None else total


@dataclass(frozen=True)
class Prefetch:
    """How the feeder's background thread scores reference log-probs ahead of training.

    steps: score at most this many steps ahead of the slowest rank (>= 0).
    batch_size: pairs per reference call (None: reference.config.batch_size, else the
        plan's micro_batch_size).
    start_step: where prefetching starts (the resume step, when known).
    """

    steps: int = 2
    batch_size: Optional[int] = None
    start_step: int = 0

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"prefetch_steps must be >= 0, got {self.steps}")
