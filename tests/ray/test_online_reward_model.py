"""An online run judged by a reward model, end to end: a tiny random
LlamaForSequenceClassification (num_labels=1) in its own actor scores every round's samples,
transformers engines generate them.

No ray_cluster fixture here: the driver starts its own local cluster, whose logical CPUs
follow the config (the reward-model judge's actor included, or the run would wait for a CPU
forever), and the console says how many it got and why.
"""

from __future__ import annotations

import os

import pytest

# Extended tier: the reward-model judge itself is in CI (test_reward_model_judge.py).
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.extended]


def test_online_run_judged_by_a_reward_model(tiny_config, tiny_assets, tmp_path, capsys, monkeypatch):
    import ray
    from mlflow.tracking import MlflowClient
    from transformers import AutoTokenizer

    from ray_dpo.config import local_cluster_cpus
    from ray_dpo.driver import run_dpo
    from ray_dpo.testing.assets import build_tiny_reward_model

    reward_model = build_tiny_reward_model(tmp_path / "rm", AutoTokenizer.from_pretrained(tiny_assets["tokenizer"]))
    cfg = tiny_config("online-reward-model", **{
        "online.enabled": True, "online.backend": "transformers", "online.judge.reward_model": reward_model,
        "online.rounds": 2, "online.prompts_per_round": 16, "online.samples_per_prompt": 2,
        "online.sampling.max_new_tokens": 8, "policy.num_epochs": 1})  # 16 prompts / 16 per step: 1 step a round
    ray.shutdown()  # whatever an earlier module left running: run_dpo starts its own cluster
    # Its workers (started with a runtime_env, away from this directory) import ray_dpo from
    # this checkout, not from wherever the environment installed it.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    try:
        summary = run_dpo(cfg)
    finally:
        ray.shutdown()

    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("[ray_dpo] local Ray cluster: "))
    cpus = local_cluster_cpus(cfg, cores=os.cpu_count() or 1)[0]
    assert f": {cpus} logical CPUs (" in line and "+ 1 reward-model judge actor x 1 +" in line, line

    assert summary.steps == 2
    client = MlflowClient(summary.tracking_uri)
    assert client.get_run(summary.run_id).info.status == "FINISHED"

    def steps(key):
        return [m.step for m in sorted(client.get_metric_history(summary.run_id, key), key=lambda m: m.step)]

    assert steps("online/round") == [0, 1]
    assert steps("online/judge_score_mean") == [0, 1], "one judge mean per round, at its first step"
    assert steps("online/pairs_kept") == [0, 1]
    assert steps("train/loss") == [1, 2]
