"""What LoRA costs and saves on the real example, side by side in one invocation: full
fine-tuning against LoRA with each reference mode (offline), and the weight sync of a full
online run against a LoRA one.

    .venv/bin/python benchmarks/lora_cost.py [--steps 16] [--rank 16] [--skip-online] [--record]

Each mode is `ray-dpo train examples/sentiment/sentiment.yaml` in a subprocess (its own
local Ray cluster), one after the other, with the held-out eval off and policy.max_steps
steps; the numbers come from each run's MLflow store:

    full            full fine-tuning, reference precomputed by the reference actors (cached)
    lora            LoRA, policy.lora.reference=adapters_off (the worker scores its base)
    lora-group      LoRA, policy.lora.reference=group with the precompute: the cache the
                    full run wrote (same base model, data, tokenizer) is read, not recomputed
    online-full     2 online rounds of 64 prompts, full weights synced to vLLM
    online-lora     the same with LoRA: the adapter alone is synced

step s: median perf/step_time_s; to step 1: seconds from the command's start to the end of
step 1 (start-up, a reference pass); peak RSS: the policy worker's perf/peak_rss_gb.
Needs the example's assets (examples/sentiment/prepare.py --out .assets).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _common import ROOT, find_run, record, table

CONFIG = os.path.join(ROOT, "examples", "sentiment", "sentiment.yaml")
EXPERIMENT = "lora-cost"


def modes(rank: int, lr: float) -> dict[str, list[str]]:
    lora = [f"policy.lora.rank={rank}", f"policy.lora.alpha={2 * rank}", f"policy.learning_rate={lr}"]
    online = ["online.enabled=true", "online.rounds=2", "online.prompts_per_round=64", "reference.precompute=false"]
    return {
        "full": [],
        "lora": [*lora, "reference.precompute=false"],
        "lora-group": [*lora, "policy.lora.reference=group"],
        "online-full": online,
        "online-lora": [*online, *lora],
    }


def run(name: str, sets: list[str], storage: str, steps: int) -> float:
    sets = [*sets, f"run.name={name}", f"run.storage_path={storage}", f"tracking.mlflow.experiment={EXPERIMENT}",
            f"policy.max_steps={steps}", "eval.prompts_file=null"]
    cmd = [os.path.join(ROOT, ".venv", "bin", "ray-dpo"), "train", CONFIG, *[a for s in sets for a in ("--set", s)]]
    print(f"[lora_cost] {name}: {' '.join(sets[:-5])}", flush=True)
    t0 = time.time()
    with open(os.path.join(storage, f"{name}.log"), "w", encoding="utf-8") as log:
        code = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}); its console: {storage}/{name}.log")
    return t0


def measure(client, name: str, t0: float) -> dict:
    run_ = find_run(client, EXPERIMENT, name, status="FINISHED")
    history = lambda key: sorted(((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_.info.run_id, key)))  # noqa: E731
    steps = history("perf/step_time_s")
    first = history("train/loss")[0]
    params = run_.data.params
    sync_bytes = [v for s, v, _ in history("sync/bytes")]
    sync_s = [v for s, v, _ in history("sync/seconds") if s > 0]
    return {"step_s": statistics.median(v for _, v, _ in steps), "to_step1_s": first[2] / 1000 - t0,
            "rss_gb": max(v for _, v, _ in history("perf/peak_rss_gb")),
            "trainable": int(params.get("lora/trainable_params", 0)) or None,
            "sync_mb": statistics.median(sync_bytes) / 1e6 if sync_bytes else None,
            "sync_s": statistics.median(sync_s) if sync_s else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4, help="LoRA learning rate (full: the config's)")
    parser.add_argument("--skip-online", action="store_true")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    storage = tempfile.mkdtemp(prefix="lora_cost_")
    rows = []
    try:
        client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
        for name, sets in modes(args.rank, args.lr).items():
            if args.skip_online and name.startswith("online"):
                continue
            m = measure(client, name, run(name, sets, storage, args.steps))
            rows.append([name, f"{m['step_s']:.2f}", f"{m['to_step1_s']:.0f}", f"{m['rss_gb']:.2f}",
                         f"{m['trainable']:,}" if m["trainable"] else "all",
                         f"{m['sync_mb']:.2f}" if m["sync_mb"] else "-", f"{m['sync_s']:.2f}" if m["sync_s"] else "-"])
            print(f"[lora_cost] {rows[-1]}", flush=True)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    body = table(["mode", "step s (median)", "to step 1 s", "policy peak RSS GB", "trainable params",
                  "sync MB", "sync s"], rows)
    notes = (f"SmolLM2-135M-Instruct, examples/sentiment/sentiment.yaml with the held-out eval off, "
             f"{args.steps} steps of 8 pairs; LoRA rank {args.rank}, alpha {2 * args.rank}, all linear layers. "
             "One process after the other on the same 2 cores.")
    if args.record:
        record("LoRA against full fine-tuning on the sentiment example", body, packages=("peft", "vllm"), notes=notes)
    else:
        print(body + "\n" + notes)


if __name__ == "__main__":
    sys.exit(main())
