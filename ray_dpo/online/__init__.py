"""Online DPO: generation engines and their Ray actor group, weight sync from the policy.

    engine_group.GenerationGroup(*, model_path, config: OnlineConfig, use_gpu)
        .generate(prompts, n=, sampling=, seed=) -> list[list[Completion]]
        .sync_weights(weights, method=, probe=, expected=) -> SyncReport
        .verify(probe, expected) -> float, .shutdown()
    generation.VLLMEngine / TransformersEngine       one engine (plain classes)
    weight_sync.WeightSyncError, random_probe, SyncReport
    judges.build_judge(config: JudgeConfig) -> FunctionJudge | RewardModelJudge
        .score(prompts, completions) -> list[float]; load_function_judge("pkg.mod:fn")
    pairs.make_pairs(groups, strategy=) -> (pairs, counters); PromptGroup, Candidate, ScoredPair
    evaluation: held-out prompt sampling, judge score and KL-to-reference summaries (pure)
    collective.GroupSender, receive, plan_buckets       the collective weight sync's two ends
    registries (ray_dpo.registry.Registry): ENGINES, SYNC_METHODS (facts.py, no code loaded),
        JUDGES, PAIR_STRATEGIES

Names load lazily, so importing this package costs nothing (no torch, ray or vllm) until
one is used; vllm is imported only inside a VLLMEngine.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Completion": "ray_dpo.online.generation",
    "GenerationEngine": "ray_dpo.online.generation",
    "GenerationGroup": "ray_dpo.online.engine_group",
    "TransformersEngine": "ray_dpo.online.generation",
    "VLLMEngine": "ray_dpo.online.generation",
    "ENGINES": "ray_dpo.online.facts",
    "LoadReport": "ray_dpo.online.weight_sync",
    "GroupSender": "ray_dpo.online.collective",
    "SYNC_METHODS": "ray_dpo.online.facts",
    "SyncReport": "ray_dpo.online.weight_sync",
    "WeightSyncError": "ray_dpo.online.weight_sync",
    "random_probe": "ray_dpo.online.weight_sync",
    "save_safetensors": "ray_dpo.online.weight_sync",
    "FunctionJudge": "ray_dpo.online.judges",
    "Judge": "ray_dpo.online.judges",
    "JudgeError": "ray_dpo.online.judges",
    "RewardModelJudge": "ray_dpo.online.judges",
    "build_judge": "ray_dpo.online.judges",
    "JUDGES": "ray_dpo.online.judges",
    "judge_kinds": "ray_dpo.online.judges",
    "load_function_judge": "ray_dpo.online.judges",
    "register_judge": "ray_dpo.online.judges",
    "Candidate": "ray_dpo.online.pairs",
    "ScoredPair": "ray_dpo.online.pairs",
    "PromptGroup": "ray_dpo.online.pairs",
    "group_samples": "ray_dpo.online.pairs",
    "make_pairs": "ray_dpo.online.pairs",
    "PAIR_STRATEGIES": "ray_dpo.online.pairs",
    "pair_strategy_names": "ray_dpo.online.pairs",
    "register_pair_strategy": "ray_dpo.online.pairs",
    "as_pair_rows": "ray_dpo.online.evaluation",
    "eval_metrics": "ray_dpo.online.evaluation",
    "eval_sampling": "ray_dpo.online.evaluation",
    "kl_estimate": "ray_dpo.online.evaluation",
    "load_prompts": "ray_dpo.online.evaluation",
    "select_prompts": "ray_dpo.online.evaluation",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ray_dpo.online' has no attribute {name!r}")
