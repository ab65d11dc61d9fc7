"""The schedule of an online run, and how a round's judged samples become training rows.

    RoundPlan(rounds, steps_per_round, total_steps)     fixed before training starts
        .round_of(step), .round_start(r)
    plan_rounds(num_rounds=, prompts_per_round=, global_batch=, num_epochs=, max_steps=)
    sync_points(total_steps=, steps_per_round=, eval_every=, eval_sampling=) -> sorted steps
    round_prompt_indices(num_prompts, per_round=, round_index=, seed=) -> indices
    pair_rows(pairs, max_length=, max_prompt_length=, over_length=, bos_id=) -> (rows, counters)

Steps are counted like the worker's reported "step": k = optimizer steps completed. Round r
trains steps r*S .. (r+1)*S - 1 (0-based feeder indices), S = steps_per_round:

    S = ceil(prompts_per_round / global_batch) * num_epochs

so the LR schedule, checkpoints and the progress ETA know the run's length up front. A round
keeps at most prompts_per_round pairs (one per prompt; prompts without a margin are dropped
and counted); when it keeps fewer, its last steps are EMPTY: no forward, no update, so the
round boundaries stay where the plan put them.

A sync point k is where the policy, having completed k steps, sends its weights to the
generation engines (verified on the probe): every round start (r*S, to generate round r) and,
when held-out sampling is on, every eval point (0, multiples of eval_every, and the end).

Pure: no ray, torch or vllm.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ray_dpo.data.fitting import fit_lengths


@dataclass(frozen=True)
class RoundPlan:
    rounds: int
    steps_per_round: int
    total_steps: int
    """rounds * steps_per_round, or fewer when policy.max_steps cuts the run short."""

    def round_of(self, step: int) -> int:
        """The round that 0-based feeder step ``step`` belongs to."""
        return step // self.steps_per_round

    def round_start(self, r: int) -> int:
        return r * self.steps_per_round

    @property
    def rounds_run(self) -> int:
        """Rounds that get at least one step (max_steps may leave later ones out)."""
        return min(self.rounds, math.ceil(self.total_steps / self.steps_per_round))


def plan_rounds(*, num_rounds: int, prompts_per_round: int, global_batch: int, num_epochs: int = 1,
                max_steps: Optional[int] = None) -> RoundPlan:
    for name, value in (("online.rounds", num_rounds), ("online.prompts_per_round", prompts_per_round),
                        ("global batch", global_batch), ("policy.num_epochs", num_epochs)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    per_round = math.ceil(prompts_per_round / global_batch) * num_epochs
    total = num_rounds * per_round
    if max_steps:
        total = min(total, max_steps)
    return RoundPlan(rounds=num_rounds, steps_per_round=per_round, total_steps=total)


def sync_points(*, total_steps: int, steps_per_round: Optional[int], eval_every: int,
                eval_sampling: bool) -> list[int]:
    """Steps (completed-step counts) after which the policy syncs its weights to the engines.

    steps_per_round None: an offline run (syncs only for held-out sampling).
    """
    from ray_dpo.engines.evaluation import eval_points

    points: set[int] = set()
    if steps_per_round:
        points.update(range(0, total_steps, steps_per_round))
    if eval_sampling:
        points.update(eval_points(total_steps, eval_every))
    return sorted(points)


def round_prompt_indices(num_prompts: int, *, per_round: int, round_index: int, seed: int) -> list[int]:
    """The data set rows whose prompts round ``round_index`` samples from.

    The rows are walked in a seeded order, a fresh permutation per pass, ``per_round`` at a
    time, so a rerun picks the same prompts and every prompt is used before one repeats.
    A round never holds a prompt twice (when per_round <= num_prompts): a round that
    straddles two passes skips the next pass's copies of prompts it already has and takes
    the following ones instead.
    """
    if num_prompts < 1:
        raise ValueError("no prompts to generate from")
    out: list[int] = []
    seen: set[int] = set()
    position = round_index * per_round
    orders: dict[int, list[int]] = {}
    while len(out) < per_round:
        epoch, offset = divmod(position, num_prompts)
        if epoch not in orders:
            orders[epoch] = list(range(num_prompts))
            random.Random(f"ray_dpo.online.{seed}.{epoch}").shuffle(orders[epoch])
        index = orders[epoch][offset]
        position += 1
        if index in seen and per_round <= num_prompts:
            continue
        seen.add(index)
        out.append(index)
    return out


def pair_rows(pairs: Sequence[Any], *, max_length: int, max_prompt_length: int, over_length: str,
              bos_id: Optional[int]) -> tuple[list[dict], dict[str, int]]:
    """Tokenized pair rows (CONTRACTS.md) for online pairs (ray_dpo.online.pairs.ScoredPair with
    token-id prompt/chosen/rejected), fitted to the data limits exactly like data rows.

    counters: {"rows", "truncated", "dropped_length"}; rows + dropped_length == len(pairs).
    A sample that hit max_new_tokens has no EOS; it is trained as it is (its log-prob is
    still the policy's).
    """
    rows: list[dict] = []
    counters = {"rows": 0, "truncated": 0, "dropped_length": 0}
    for pair in pairs:
        fitted = fit_lengths(list(pair.prompt), list(pair.chosen), list(pair.rejected), max_length=max_length,
                             max_prompt_length=max_prompt_length, policy=over_length, bos_id=bos_id)
        if fitted.status == "dropped":
            counters["dropped_length"] += 1
            continue
        rows.append({"pair_id": pair.pair_id, "prompt_ids": fitted.prompt, "chosen_ids": fitted.chosen,
                     "rejected_ids": fitted.rejected, "truncated": fitted.status == "truncated"})
        counters["truncated"] += fitted.status == "truncated"
    counters["rows"] = len(rows)
    return rows, counters
