"""Online DPO rounds, built on the generation engines (ray_dpo.engines).

    coordinator.OnlineCoordinator       the run's StepSource and PolicySync: rounds, syncs, evals
    rounds: RoundPlan, plan_rounds, sync_points, round_prompt_indices, pair_rows (pure)
    round_builder.RoundProducer         generate -> judge -> pair -> reference-score one round
    round_store.RoundStore              rounds on disk, read back after a restart
    round_feeder.RoundFeeder            a round's pairs as per-rank steps
    pairs.make_pairs(groups, strategy=) -> (pairs, counters); PromptGroup, Candidate, ScoredPair
    registry (ray_dpo.registry.Registry): PAIR_STRATEGIES

Names load lazily, so importing this package costs nothing (no torch, ray or vllm).
"""

from __future__ import annotations

from ray_dpo.lazy import lazy_names

_LAZY = {
    "Candidate": "ray_dpo.online.pairs",
    "ScoredPair": "ray_dpo.online.pairs",
    "PromptGroup": "ray_dpo.online.pairs",
    "group_samples": "ray_dpo.online.pairs",
    "make_pairs": "ray_dpo.online.pairs",
    "PAIR_STRATEGIES": "ray_dpo.online.pairs",
    "pair_strategy_names": "ray_dpo.online.pairs",
    "register_pair_strategy": "ray_dpo.online.pairs",
    "RoundPlan": "ray_dpo.online.rounds",
    "plan_rounds": "ray_dpo.online.rounds",
    "sync_points": "ray_dpo.online.rounds",
}

__getattr__, __all__ = lazy_names(__name__, _LAZY)
