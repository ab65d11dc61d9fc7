"""The data path at scale: time to step 1 and the feeder's memory at 1M and 4M pairs.

Question: every tokenized pair of a run sits in one feeder actor (token ids as 4-byte
integers, plus the reference log-probs); how long does a run take to reach its first step,
and how much memory does that actor hold, as the data set grows?

For each size: N synthetic pairs of the tiny task (ray_dpo.testing.assets, ~40 tokens a
pair) are written as 8 JSONL shards, then `ray-dpo train configs/tiny-cpu.yaml` runs one
step on them (policy.max_steps=1, no precompute: reference log-probs are streamed per
step, as by default; no held-out eval). Measured from this process:
  * seconds to step 1: from the command's start to its "[ray_dpo] step 1/" line
    (Ray start-up, reading and tokenizing every pair with Ray Data, the feeder's start,
    DeepSpeed's start, the first step);
  * feeder peak RSS: the largest resident memory of the feeder actor's process (sampled
    every 0.2 s; its process is titled ray::_FeederActor).

    .venv/bin/python benchmarks/data_scale.py --sizes 1000000,4000000 --record

Needs the tiny assets (`ray-dpo make-assets --out .tiny`). Run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, record, table  # noqa: E402

SHARDS = 8


def write_pairs(directory: str, n: int, *, seed: int = 0) -> tuple[str, int]:
    """N pairs in SHARDS JSONL files (reused if there); (glob, bytes)."""
    from ray_dpo.testing.assets import make_preference_rows

    os.makedirs(directory, exist_ok=True)
    done = os.path.join(directory, "DONE")
    if not os.path.exists(done):
        base = make_preference_rows(10_000, seed=seed)  # varied rows, repeated with new ids
        rng = random.Random(seed)
        per = -(-n // SHARDS)
        for s in range(SHARDS):
            with open(os.path.join(directory, f"train-{s:02d}.jsonl"), "w", encoding="utf-8") as f:
                for i in range(s * per, min(n, (s + 1) * per)):
                    f.write(json.dumps(base[rng.randrange(len(base))]) + "\n")
        open(done, "w").close()
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".jsonl"))
    return os.path.join(directory, "train-*.jsonl"), size


def feeder_rss(stop: threading.Event, peak: list[int]) -> None:
    import psutil

    while not stop.is_set():
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any("_FeederActor" in part for part in (p.info["cmdline"] or [])[:1]):
                    peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                pass
        time.sleep(0.2)


def one_run(glob: str, storage: str, n: int) -> dict:
    cmd = [os.path.join(ROOT, ".venv", "bin", "ray-dpo"), "train", "configs/tiny-cpu.yaml",
           "--set", f"data.train_files=[{glob}]", "--set", "data.eval_files=[]", "--set", "policy.max_steps=1",
           "--set", "policy.num_epochs=1", "--set", f"run.storage_path={storage}", "--set", f"run.name=scale-{n}",
           "--set", "eval.every_steps=0", "--set", "policy.checkpoint_every_steps=0"]
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=feeder_rss, args=(stop, peak), daemon=True)
    sampler.start()
    t0 = time.monotonic()
    first_step = None
    log_path = os.path.join(storage, f"scale-{n}.log")
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0"))
        for line in proc.stdout:
            log.write(line)
            if first_step is None and line.startswith("[ray_dpo] step 1/"):
                first_step = time.monotonic() - t0
        code = proc.wait()
    stop.set()
    sampler.join()
    if code != 0 or first_step is None:
        raise SystemExit(f"the run of {n} pairs failed (exit {code}); its output: {log_path}")
    return {"seconds to step 1": first_step, "feeder peak MiB": peak[0] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000,4000000")
    parser.add_argument("--work", default=os.path.join(ROOT, ".bench", "data_scale"))
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    if not os.path.isdir(os.path.join(ROOT, ".tiny", "model")):
        raise SystemExit("the tiny assets are missing: run `ray-dpo make-assets --out .tiny` first")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        glob, size = write_pairs(os.path.join(args.work, f"pairs-{n}"), n)
        storage = os.path.join(args.work, f"runs-{n}")
        os.makedirs(storage, exist_ok=True)
        row = {"pairs": f"{n:,}", "JSONL MiB": size / 2**20, **one_run(glob, storage, n)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    headers = ["pairs", "JSONL MiB", "seconds to step 1", "feeder peak MiB"]
    body = table(headers, [[r[h] for h in headers] for r in rows])
    if args.record:
        record("The data path at scale: time to step 1 and the feeder's memory", body, packages=("ray",))
    else:
        print(body)


if __name__ == "__main__":
    main()
