"""Weight sync by method: object_store vs checkpoint vs collective (several bucket sizes).

Question: what does one sync cost in time, and in memory on the policy's side and the
engine's, for each online.weight_sync method, and how does that grow with the model?

For each model: a policy stand-in actor holds the model (Hugging Face, as policy rank 0 of
a ZeRO 0-2 run holds it; it stands in for DeepSpeed's engine, which adds nothing to a sync
outside ZeRO-3) and calls ray_dpo's own ``policy.weights.sync_policy``, the function every
policy rank calls at a sync point, against a real PolicyFollower actor with one vLLM (CPU)
engine configured for the method. So each row is the code path of a training run: the
probe forward on the policy, the transfer, the engine's in-place load, the probe check.
Before each sync the stand-in's weights are perturbed (a "trained" policy).

Measured per sync (3 per row after one warm-up sync; the median time, the largest memory):
  * seconds: sync_policy's wall time, what training waits for;
  * policy extra MiB: the stand-in's peak RSS during the sync above its RSS before it;
  * engine extra MiB: the same for the engine's process;
  * node extra MiB: the machine's used memory (total - available, shared memory included,
    so the object store's copy counts here) above its level before the sync.
Sampled every 20 ms from this process (psutil); short peaks between samples are missed.

    .venv/bin/python benchmarks/weight_sync.py --models smollm2,1b --record

    --models LIST      smollm2 (.assets/smollm2-135m-instruct, examples/sentiment/prepare.py)
                       and/or 1b (a random Llama of ~1.0B parameters built here, bf16)
    --buckets LIST     collective bucket sizes in MiB (default 16,64,256)
    --repeats N        syncs per row (default 3)
    --methods LIST     only these of object_store,checkpoint,collective (default: all)
    --record           append the table to BENCHMARKS.md

Run it alone: the numbers are one machine's memory and cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import types
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

from _common import ROOT, record, table  # noqa: E402

SMOLLM2 = os.path.join(ROOT, ".assets", "smollm2-135m-instruct")
JUDGE = "ray_dpo.testing.assets:judge_score"


def build_1b(root: str) -> str:
    """A random Llama of ~1.0B parameters in bf16 (hidden 2048, 16 layers), with SmolLM2's
    tokenizer and its vocabulary (49152): the follower draws its sync probe from the
    tokenizer's ids, so the embedding must hold every one of them."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = os.path.join(root, "llama-1b-random-v49152")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    if not os.path.isdir(SMOLLM2):
        sys.exit(f"the 1b model takes SmolLM2's tokenizer from {SMOLLM2}: run examples/sentiment/prepare.py first")
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=len(tokenizer), max_position_embeddings=2048,
                         tie_word_embeddings=False, torch_dtype="bfloat16")
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    tokenizer.save_pretrained(path)
    return path


class PolicyStandIn:
    """Policy rank 0 of a one-rank run, without DeepSpeed (see the module docstring): the
    attributes sync_policy reads from a RankState, around a plain Hugging Face model."""

    def __init__(self, model_path: str, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
        engine = types.SimpleNamespace(module=model, zero_optimization_partition_weights=lambda: False)
        self.worker = types.SimpleNamespace(engine=engine, rank=0, world_size=1, device=torch.device("cpu"),
                                            pad_token_id=0, policy=types.SimpleNamespace(
                                                lora=types.SimpleNamespace(enabled=False)))

    def pid(self) -> int:
        return os.getpid()

    def perturb(self, seed: int) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.worker.engine.module.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=g).to(p.dtype))

    def sync(self, follower, step: int, probe, spec: dict) -> float:
        from ray_dpo.policy.weights import sync_policy

        t0 = time.perf_counter()
        sync_policy(self.worker, follower, step, probe, send_weights=True, sync=spec)
        return time.perf_counter() - t0


class Sampler:
    """Peak RSS of some processes and the node's used memory, every 20 ms, above a baseline."""

    def __init__(self, pids: dict[str, int]):
        import psutil

        self.procs = {k: psutil.Process(p) for k, p in pids.items()}
        self.base = self._now()
        self.peak = dict(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _now(self) -> dict[str, int]:
        import psutil

        vm = psutil.virtual_memory()
        out = {k: p.memory_info().rss for k, p in self.procs.items()}
        out["node"] = vm.total - vm.available
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, v in self._now().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def extra_mib(self) -> dict[str, float]:
        return {k: (self.peak[k] - self.base[k]) / 2**20 for k in self.peak}


def follower_config(model_path: str, data_file: str, method: str, bucket_mb: float, storage: str):
    from ray_dpo.config import from_dict

    return from_dict({
        "run": {"name": f"sync-{method}", "storage_path": storage, "device": "cpu"},
        "model": {"name_or_path": model_path, "dtype": "fp32"},
        "data": {"train_files": [data_file], "max_length": 64, "max_prompt_length": 32},
        "online": {"backend": "vllm", "weight_sync": method, "sync_bucket_mb": bucket_mb or 256.0,
                   "sync_tolerance": 1.0,
                   "judge": {"function": JUDGE}},
    })


def engine_pids() -> set[int]:
    """Processes titled as Ray's VLLMEngine actors (Ray names an actor's process ray::<class>)."""
    import psutil

    out = set()
    for p in psutil.process_iter(["cmdline"]):
        if any("VLLMEngine" in part for part in (p.info["cmdline"] or [])[:1]):
            out.add(p.pid)
    return out


def measure(model_name: str, model_path: str, dtype: str, method: str, bucket_mb: float, repeats: int,
            data_file: str, storage: str) -> dict:
    import ray

    from ray_dpo.engines.follower import start_follower
    from ray_dpo.engines.weight_sync import random_probe

    cfg = follower_config(model_path, data_file, method, bucket_mb, storage)
    before = engine_pids()
    follower = start_follower(cfg, reference=None, total_steps=10_000)
    new = engine_pids() - before
    if len(new) != 1:
        raise SystemExit(f"expected one new VLLMEngine process, found {sorted(new)}")
    policy = ray.remote(num_cpus=0)(PolicyStandIn).remote(model_path, dtype)
    try:
        vocab = json.load(open(os.path.join(model_path, "config.json")))["vocab_size"]
        probe = random_probe(vocab, seed=0)
        spec = ray.get(follower.sync_spec.remote())
        pids = {"policy": ray.get(policy.pid.remote()), "engine": new.pop()}
        ray.get(policy.sync.remote(follower, 1, probe, spec))  # warm-up: first-call imports and buffers
        seconds, extra = [], {"policy": 0.0, "engine": 0.0, "node": 0.0}
        for k in range(1, repeats + 1):
            ray.get(policy.perturb.remote(k))
            with Sampler(pids) as s:
                seconds.append(ray.get(policy.sync.remote(follower, k + 1, probe, spec)))
            extra = {key: max(extra[key], v) for key, v in s.extra_mib().items()}
        row = {"model": model_name, "method": method, "bucket MiB": bucket_mb if method == "collective" else "-",
               "seconds": statistics.median(seconds), **{f"{k} extra MiB": round(v) for k, v in extra.items()}}
        print(json.dumps(row), flush=True)
        return row
    finally:
        ray.get(follower.close.remote())
        ray.kill(follower)
        ray.kill(policy)


def oom_kills() -> int:
    """How many processes Ray's memory monitor has killed in this session (raylet.out)."""
    path = "/tmp/ray/session_latest/logs/raylet.out"
    if not os.path.exists(path):
        return 0
    return open(path, encoding="utf-8", errors="replace").read().count("OOM kill reason")


def model_mib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2")
    parser.add_argument("--buckets", default="16,64,256")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=os.path.join(ROOT, ".bench", "weight_sync"))
    parser.add_argument("--methods", default="", help="only these methods (default: all)")
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()

    import ray

    os.makedirs(args.work, exist_ok=True)
    models = []
    for name in args.models.split(","):
        if name == "smollm2":
            if not os.path.isdir(SMOLLM2):
                raise SystemExit(f"{SMOLLM2} is missing: run examples/sentiment/prepare.py first")
            models.append((name, SMOLLM2, "float32"))
        elif name == "1b":
            models.append((name, build_1b(args.work), "bfloat16"))
        elif os.path.isdir(name):
            models.append((os.path.basename(name.rstrip("/")), name, "float32"))
        else:
            raise SystemExit(f"--models: unknown model {name!r} (smollm2, 1b or a model directory)")
    data_file = os.path.join(args.work, "pairs.jsonl")
    with open(data_file, "w", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as storage:
        for name, path, dtype in models:
            print(f"{name}: {model_mib(path):.0f} MiB of weights ({dtype})", flush=True)
            plans = [("object_store", 0), ("checkpoint", 0)] + [("collective", float(b))
                                                                 for b in args.buckets.split(",")]
            for method, bucket in plans:
                if args.methods and method not in args.methods.split(","):
                    continue
                kills = oom_kills()
                try:
                    row = measure(name, path, dtype, method, bucket, args.repeats, data_file, storage)
                except ray.exceptions.RayError as err:  # e.g. Ray's memory monitor killed the engine
                    why = ("out of memory: Ray's monitor killed a process at 95% of RAM" if oom_kills() > kills
                           else type(err).__name__)
                    row = {"model": name, "method": method, "bucket MiB": bucket if method == "collective" else "-",
                           "seconds": f"failed ({why})", "policy extra MiB": "-", "engine extra MiB": "-",
                           "node extra MiB": "-"}
                    print(json.dumps(row), flush=True)
                row["model MiB"] = round(model_mib(path))
                rows.append(row)
    ray.shutdown()
    headers = ["model", "model MiB", "method", "bucket MiB", "seconds", "policy extra MiB", "engine extra MiB",
               "node extra MiB"]
    body = table(headers, [[r[h] for h in headers] for r in rows])
    if args.record:
        record("Weight sync by method: object_store, checkpoint, collective", body, packages=("ray", "vllm"))
    else:
        print(body)


if __name__ == "__main__":
    main()
