"""Offline DPO end to end on a local Ray cluster (CPU): driver, data, reference, policy, MLflow.

These tests run the real pipeline: Ray Data tokenization, a ReferenceGroup of actors, a
BatchFeeder, DeepSpeed engines inside Ray Train workers over gloo, and an MLflow SQLite
store. Only the model is tiny.
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EXPECTED_METRICS = [
    "train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins",
    "train/rewards/accuracies", "train/logps/chosen", "train/logps/rejected", "train/lr",
    "train/grad_norm", "perf/tokens_per_s", "perf/step_time_s", "perf/padding_fraction",
    "eval/loss", "eval/rewards/accuracies", "eval/rewards/margins",
    "data/read", "data/ok",
]


def ledger(cfg):
    path = os.path.join(cfg.run_dir, "ledger.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def metric_history(summary, key):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(summary.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(summary.run_id, key))


SECRET = "s3cr3t-value-that-must-never-be-logged"


def test_offline_run_learns_and_logs_everything(ray_cluster, tiny_config, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ray_dpo.driver import run_dpo

    # Credentials live in the environment (as KubeRay's secretKeyRef puts them there); none
    # may leak into MLflow params, tags or artifacts.
    for var in ("MLFLOW_TRACKING_PASSWORD", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"):
        monkeypatch.setenv(var, SECRET)
    cfg = tiny_config("learns", **{"policy.num_epochs": 2, "eval.every_steps": 16})
    summary = run_dpo(cfg)

    # Reference = initial policy, so the first step's loss is ln 2.
    first_step, first_loss = metric_history(summary, "train/loss")[0]
    assert first_step == 1
    assert first_loss == pytest.approx(math.log(2), abs=1e-4)
    # The synthetic preference is separable: held-out pairs are ranked right.
    assert metric_history(summary, "eval/rewards/accuracies")[-1][1] >= 0.9

    run = MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ray_dpo.mode"] == "offline"
    assert run.data.params["loss.beta"] == "0.1"
    missing = [k for k in EXPECTED_METRICS if k not in run.data.metrics]
    assert not missing, f"metrics not in MLflow: {missing}"

    assert_no_secret(MlflowClient(summary.tracking_uri), summary.run_id)

    # What a person comparing runs later finds in MLflow: the console, both splits' data
    # report as metrics, and the exported model's files (the tiny model fits the size limit).
    client = MlflowClient(summary.tracking_uri)
    console_log = open(client.download_artifacts(summary.run_id, "console.log"), encoding="utf-8").read()
    assert "[ray_dpo] data: train: 512 pairs" in console_log and "[ray_dpo] training:" in console_log
    assert run.data.metrics["data/read"] == 512 and run.data.metrics["data/eval/read"] == 128
    assert {"config.json", "model.safetensors"} <= {os.path.basename(f.path) for f in
                                                     client.list_artifacts(summary.run_id, "model/hf_model")}

    # Every pair of each epoch trained exactly once (the ledger records trained pair ids).
    counts = collections.Counter(pid for entry in ledger(cfg) for pid in entry["pair_ids"])
    assert len(counts) == summary.data_report["train"]["num_pairs"]
    assert set(counts.values()) == {2}

    # The final policy is a Hugging Face model.
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(summary.hf_model_path) is not None


def run_cli(cfg, tmp_path, ray):
    """``ray-dpo train`` on ``cfg`` in a subprocess that joins this module's cluster (no second
    cluster to start); returns the process with its stdout and stderr."""
    from ray_dpo.config import to_yaml

    path = tmp_path / f"{cfg.run.name}.yaml"
    path.write_text(to_yaml(cfg), encoding="utf-8")
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    return subprocess.run([sys.executable, "-m", "ray_dpo.cli", "train", str(path)], env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.extended
def test_resume_continues_at_the_checkpoint_step(ray_cluster, tiny_config, tmp_path):
    from ray_dpo.driver import run_dpo
    from console_checks import console_problems, foreign_lines

    first = tiny_config("resume", **{"policy.checkpoint_every_steps": 4,
                                                             "policy.max_steps": 4})
    # The first run goes through the CLI, so its console is what a user sees: ray_dpo's
    # lines, not Ray's (this cluster has no dashboard, so without the console filter Ray
    # Train's PlacementGroupCleaner warns once a second; every step's report has pair ids).
    proc = run_cli(first, tmp_path, ray_cluster)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-6000:]
    assert not console_problems(console, steps=4), "\n".join(console_problems(console, steps=4))
    assert len(foreign_lines(console)) <= 5, "\n".join(foreign_lines(console))
    assert [e["step"] for e in ledger(first)] == [1, 2, 3, 4]

    second = tiny_config("resume", **{"policy.checkpoint_every_steps": 4})
    summary = run_dpo(second)
    steps = [e["step"] for e in ledger(second)]
    assert steps[:5] == [1, 2, 3, 4, 5], "the second run must start right after the checkpoint"
    assert steps == list(range(1, summary.steps + 1))
    counts = collections.Counter(pid for entry in ledger(second) for pid in entry["pair_ids"])
    assert len(counts) == summary.data_report["train"]["num_pairs"]
    assert set(counts.values()) == {1}


def test_killed_reference_actor_loses_no_pair(ray_cluster, tiny_config):
    import ray

    from ray_dpo.driver import run_dpo

    cfg = tiny_config("kill-ref", **{"reference.batch_size": 4,
                                                             "reference.max_in_flight": 1})
    outcome = {}

    def train():
        try:
            outcome["summary"] = run_dpo(cfg)
        except BaseException as e:  # surfaced by the assert below
            outcome["error"] = e

    thread = threading.Thread(target=train)
    thread.start()
    killed = False
    deadline = time.monotonic() + 600
    while thread.is_alive() and time.monotonic() < deadline:
        path = os.path.join(cfg.run_dir, "ledger.jsonl")
        if not killed and os.path.exists(path) and len(ledger(cfg)) >= 2:
            actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
                      if "ref" in a["name"]]
            assert actors, "no named reference actor to kill"
            handle = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])
            ray.kill(handle, no_restart=False)
            killed = True
        time.sleep(0.2)
    thread.join(timeout=60)
    assert "error" not in outcome, outcome.get("error")
    assert killed, "the run finished before the reference actor could be killed"
    counts = collections.Counter(pid for entry in ledger(cfg) for pid in entry["pair_ids"])
    assert len(counts) == outcome["summary"].data_report["train"]["num_pairs"]
    assert set(counts.values()) == {1}


def assert_no_secret(client, run_id):
    import tempfile

    run = client.get_run(run_id)
    logged = list(run.data.params.items()) + list(run.data.tags.items())
    assert not [kv for kv in logged if SECRET in kv[0] or SECRET in kv[1]]
    out = tempfile.mkdtemp()
    client.download_artifacts(run_id, "", out)
    files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
    assert any(f.endswith("resolved.yaml") for f in files) and any(f.endswith("data_report.json") for f in files)
    for path in files:
        with open(path, "rb") as f:
            assert SECRET.encode() not in f.read(), f"secret leaked into artifact {path}"


@pytest.mark.extended  # 52 s, for CI's 35 minutes
def test_a_precomputed_run_with_heldout_eval_starts_its_reference_actors_once(ray_cluster, tiny_config, tiny_assets):
    """reference.precompute with eval.prompts_file: the actors that scored the pass stay for
    the held-out KL (as ray_dpo.topology says), instead of stopping and a second group of
    the same size starting; the run still logs eval/kl."""
    from ray_dpo import compat
    from ray_dpo.driver import run_dpo

    before = {i for i, a in compat.actor_table().items() if a["ActorClassName"].endswith("ReferenceActor")}
    cfg = tiny_config("precompute-eval", **{
        "reference.precompute": True, "policy.max_steps": 2, "eval.prompts_file": tiny_assets["eval_file"],
        "eval.num_prompts": 8, "eval.samples_per_prompt": 2, "eval.max_new_tokens": 8, "eval.every_steps": 0,
        "eval.judge.function": "ray_dpo.testing.assets:judge_score", "eval.backend": "transformers"})
    summary = run_dpo(cfg)
    started = {i for i, a in compat.actor_table().items() if a["ActorClassName"].endswith("ReferenceActor")} - before
    assert len(started) == cfg.reference.num_actors, started
    assert [step for step, _ in metric_history(summary, "eval/kl")] == [0, 2]
    [(step, startup)] = metric_history(summary, "perf/startup_s")
    assert step == 1 and 0 < startup < summary.seconds


def test_a_data_error_stops_the_reference_actors_started_before_tokenization(ray_cluster, tiny_config, tmp_path):
    """A streamed run starts its reference actors before Ray Data tokenizes (their model load
    overlaps it). A bad row that ends the run there must not leave them holding CPUs."""
    from ray_dpo import compat
    from ray_dpo.data.errors import DataError
    from ray_dpo.driver import run_dpo

    def alive() -> set:
        return {i for i, a in compat.actor_table().items()
                if a["ActorClassName"].endswith("ReferenceActor") and a["State"] != "DEAD"}

    before = alive()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": " a"}\n', encoding="utf-8")  # no "rejected"
    cfg = tiny_config("data-error", **{"data.train_files": [str(bad)], "data.on_bad_row": "error"})
    with pytest.raises(DataError, match=r"bad\.jsonl:1"):
        run_dpo(cfg)
    deadline = time.monotonic() + 30
    while alive() - before and time.monotonic() < deadline:
        time.sleep(0.5)  # ray.kill is asynchronous
    assert not alive() - before
