"""Token-budget batching: cut a micro-batch into forwards of bounded cost.

The cost of a forward is the number of positions `layouts.build_batch` computes for it in
a given layout; a pair is never split across forwards.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

from ray_dpo.batching.layouts import Layout, layout_spec
from ray_dpo.batching.padded import TokenPair


class TokenBudgetPlan(NamedTuple):
    """The forwards one micro-batch is cut into."""

    micro_batches: list[list[TokenPair]]  # every pair exactly once, input order kept
    oversized: list[int]  # indices of micro-batches holding ONE pair over the budget


def _pair_tokens(spec: Layout, pair: TokenPair) -> int:
    return spec.pair_tokens(len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"]))


def micro_batch_cost(pairs: Sequence[TokenPair], *, layout: str) -> int:
    """Positions `build_batch(pairs, layout=...)` computes (packed / prefix_shared: real
    tokens, i.e. one row when max_tokens_per_row >= the cost)."""
    spec = layout_spec(layout)
    sizes = [_pair_tokens(spec, p) for p in pairs]
    if spec.padded:
        return 2 * len(sizes) * max(sizes, default=0)
    return sum(sizes)


def token_budget_micro_batches(pairs: Sequence[TokenPair], *, max_tokens: int, layout: str) -> TokenBudgetPlan:
    """Greedy, order-stable split of `pairs` into micro-batches of <= max_tokens computed
    positions each (cost model of `micro_batch_cost`). A pair is never split; a pair over
    the budget on its own gets a micro-batch of its own and is listed in `oversized`."""
    spec = layout_spec(layout)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    batches: list[list[TokenPair]] = []
    oversized: list[int] = []
    current: list[TokenPair] = []
    total = widest = 0
    for pair in pairs:
        size = _pair_tokens(spec, pair)
        new_total, new_widest = total + size, max(widest, size)
        cost = 2 * (len(current) + 1) * new_widest if spec.padded else new_total
        if current and cost > max_tokens:
            batches.append(current)
            current, new_total, new_widest = [], size, size
            cost = 2 * size if spec.padded else size
        current.append(pair)
        total, widest = new_total, new_widest
        if cost > max_tokens:  # alone and still over budget
            oversized.append(len(batches))
            batches.append(current)
            current, total, widest = [], 0, 0
    if current:
        batches.append(current)
    return TokenBudgetPlan(batches, oversized)
