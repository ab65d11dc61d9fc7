"""Stand-ins for the BatchFeeder's inputs (tests/unit/test_batch_feeder.py, tests/ray/test_feeder.py).

make_rows: tokenized pair rows of random token ids; FakeReference: ReferenceGroup's
``score_batches`` with deterministic values (fake_logps), recording what it scored;
plan_of: a small BatchPlan (2 ranks, G=12, 2 epochs) with overrides.

A module of the package, not of a test: a Ray actor (the feeder) imports FakeReference
by name. Pure: numpy only.
"""

from __future__ import annotations

import random
import time
from typing import Iterable, Iterator, Optional

from ray_dpo.feeder import BatchPlan


def make_rows(n: int, *, seed: int = 0, prefix: str = "f.jsonl", vocab: int = 100) -> list[dict]:
    """n tokenized pair rows with ids "<prefix>:<1-based line>"; every fifth is truncated."""
    rng = random.Random(seed)

    def ids(lo, hi):
        return [rng.randrange(7, vocab) for _ in range(rng.randint(lo, hi))]

    return [{"pair_id": f"{prefix}:{i + 1}", "prompt_ids": ids(1, 6), "chosen_ids": ids(1, 8),
             "rejected_ids": ids(1, 8), "truncated": i % 5 == 0} for i in range(n)]


def fake_logps(row: dict) -> tuple[float, float]:
    """The (chosen, rejected) log-probs FakeReference gives a row."""
    return -0.5 * sum(row["chosen_ids"]) - 0.25, -0.5 * sum(row["rejected_ids"]) - 0.75


class FakeReference:
    """score_batches like ReferenceGroup's, with deterministic values; records what it scored.

    fail_at: raise on this (0-based) batch; delay: seconds per batch.
    """

    def __init__(self, *, delay: float = 0.0, fail_at: Optional[int] = None):
        self.delay = delay
        self.fail_at = fail_at
        self.scored: list[str] = []
        self.batches = 0

    def score_batches(self, batches: Iterable[list[dict]]) -> Iterator[list[dict]]:
        for batch in batches:
            if self.fail_at is not None and self.batches >= self.fail_at:
                raise RuntimeError(f"reference exploded on batch {self.batches}")
            time.sleep(self.delay)
            self.batches += 1
            self.scored += [r["pair_id"] for r in batch]
            out = []
            for row in batch:
                c, r = fake_logps(row)
                out.append({**row, "ref_chosen_logp": c, "ref_rejected_logp": r})
            yield out


def plan_of(**overrides) -> BatchPlan:
    """2 ranks x 2 pairs x 3 micro-batches (G=12), 2 epochs, shuffled with seed 7; overrides win."""
    base = dict(num_workers=2, micro_batch_size=2, gradient_accumulation_steps=3, num_epochs=2,
                max_steps=None, seed=7, shuffle=True)
    return BatchPlan(**{**base, **overrides})
