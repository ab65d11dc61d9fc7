"""The generation engines: what serves the policy's weights and samples from them.

Used by online runs (round generation) and by offline runs' held-out eval alike; knows
nothing of rounds (ray_dpo.online builds those on top of it).

    spec.EngineSpec / engine_spec(cfg)              the engines of a run, from online or eval
    engine_group.GenerationGroup(*, model_path, spec: EngineSpec, use_gpu)
        .generate(prompts, n=, sampling=, seed=) -> list[list[Completion]]
        .sync_weights(weights, method=, probe=, expected=) -> SyncReport
        .verify(probe, expected) -> float, .shutdown()
    generation.VLLMEngine / TransformersEngine       one engine (plain classes)
    engine_restarts.EngineKeeper                     restart, reload and re-ask a dead engine
    weight_sync.WeightSyncError, random_probe, SyncReport
    collective.GroupSender, receive, plan_buckets    the collective weight sync's two ends
    follower.PolicyFollower                          the actor rank 0 syncs at its sync points
    heldout.HeldOutEvaluator                         held-out sampling, judging and KL
    evaluation: held-out prompt sets, judge score and KL summaries, per-sample records (pure)
    judges.build_judge(config: JudgeConfig) -> FunctionJudge | RewardModelJudge
        .score(prompts, completions) -> list[float]; load_function_judge("pkg.mod:fn")
    registries (ray_dpo.registry.Registry): ENGINES, SYNC_METHODS (facts.py, no code
        loaded), JUDGES

Names load lazily, so importing this package costs nothing (no torch, ray or vllm) until
one is used; vllm is imported only inside a VLLMEngine.
"""

from __future__ import annotations

from ray_dpo.lazy import lazy_names

_LAZY = {
    "EngineSpec": "ray_dpo.engines.spec",
    "engine_spec": "ray_dpo.engines.spec",
    "Completion": "ray_dpo.engines.generation",
    "GenerationEngine": "ray_dpo.engines.generation",
    "GenerationGroup": "ray_dpo.engines.engine_group",
    "TransformersEngine": "ray_dpo.engines.generation",
    "VLLMEngine": "ray_dpo.engines.generation",
    "ENGINES": "ray_dpo.engines.facts",
    "LoadReport": "ray_dpo.engines.weight_sync",
    "GroupSender": "ray_dpo.engines.collective",
    "SYNC_METHODS": "ray_dpo.engines.facts",
    "SyncReport": "ray_dpo.engines.weight_sync",
    "WeightSyncError": "ray_dpo.engines.weight_sync",
    "random_probe": "ray_dpo.engines.weight_sync",
    "save_safetensors": "ray_dpo.engines.weight_sync",
    "FunctionJudge": "ray_dpo.engines.judges",
    "Judge": "ray_dpo.engines.judges",
    "JudgeError": "ray_dpo.engines.judges",
    "RewardModelJudge": "ray_dpo.engines.judges",
    "build_judge": "ray_dpo.engines.judges",
    "JUDGES": "ray_dpo.engines.judges",
    "judge_kinds": "ray_dpo.engines.judges",
    "load_function_judge": "ray_dpo.engines.judges",
    "register_judge": "ray_dpo.engines.judges",
    "as_pair_rows": "ray_dpo.engines.evaluation",
    "eval_metrics": "ray_dpo.engines.evaluation",
    "eval_points": "ray_dpo.engines.evaluation",
    "eval_sampling": "ray_dpo.engines.evaluation",
    "kl_estimate": "ray_dpo.engines.evaluation",
    "load_prompts": "ray_dpo.engines.evaluation",
    "select_prompts": "ray_dpo.engines.evaluation",
}

__getattr__, __all__ = lazy_names(__name__, _LAZY)
