"""Why ray_dpo's step is slower inside the Ray Train worker than the floor: one invocation,
the same step code in several processes, side by side.

Each block runs, in ONE process, the floor's bare torch step (floor.py's loop) and ray_dpo's
step code (worker.setup_engine, pair_terms, engine.backward, step_optimizer at the example's
ZeRO-0) on the same batches, alternating per step (floor first on steps 1, 3, 5.., ray_dpo
first on 2, 4, ..), and records per step: wall seconds, the process's CPU seconds (all threads), and
its involuntary context switches (another process took the core). Before the steps it
records the process's torch/OMP/allocator settings (probe()).

Blocks (--blocks), by default in this order, in a Ray cluster started like ray_dpo's
(driver.init_ray):
  run_dpo:       a real run_dpo of the example (floor.py's run_config, --run-steps steps);
                 its perf/* medians, not alternated;
  run_dpo_nice0: the same with the Ray Train workers at nice 0 (RAY_worker_niceness=0 in
                 their runtime env; Ray runs its workers at nice 15);
  ray_train:     a TorchTrainer with one worker of policy.num_cpus_per_worker CPUs (the
                 policy worker's process kind), RAY_TRAIN_HEALTH_CHECK_INTERVAL_S as set; its
                 steps also alternate between Ray's niceness (odd steps) and nice 0 (even
                 steps, every thread; needs the privilege to lower niceness, e.g. root);
  plain_ray_up:  a spawned plain process while the Ray cluster is up and idle;
  plain:         a spawned plain process after ray.shutdown();
  run_dpo_2:     the default real run again (a Ray cluster started anew), to bracket.
During every block a driver thread samples every process's CPU time and niceness (psutil,
every second), so the output says which other processes used CPU during the measured steps.

    .venv/bin/python benchmarks/floor_inside.py --out /tmp/floor_inside     # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import threading
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from sentiment_vs_trl import CONFIG, load_run_config, ray_dpo_pairs  # noqa: E402

_ENV_KEYS = ("OMP", "MKL", "OPENBLAS", "MALLOC", "LD_PRELOAD", "KMP", "GOMP", "DNNL", "ONEDNN", "TORCH",
             "RAY_TRAIN_HEALTH")


def probe() -> dict:
    """This process's settings that could change the speed of the same torch ops."""
    with open("/proc/self/maps", encoding="utf-8") as f:
        maps = f.read()
    with open("/proc/self/status", encoding="utf-8") as f:
        status = {k: v.strip() for k, _, v in (line.partition(":") for line in f) if k in ("Cpus_allowed_list",)}
    return {
        "pid": os.getpid(), "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(), "affinity": sorted(os.sched_getaffinity(0)),
        "nice": os.nice(0), "sched_policy": os.sched_getscheduler(0), **status,
        "env": {k: v for k, v in sorted(os.environ.items()) if any(s in k for s in _ENV_KEYS)},
        "grad_enabled": torch.is_grad_enabled(), "anomaly": torch.is_anomaly_enabled(),
        "deterministic": torch.are_deterministic_algorithms_enabled(), "mkldnn": torch.backends.mkldnn.enabled,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "default_dtype": str(torch.get_default_dtype()),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "allocators": [n for n in ("jemalloc", "tcmalloc", "mimalloc") if n in maps],
        "os_threads": len(os.listdir("/proc/self/task")),
        "parallel_info": [line for line in torch.__config__.parallel_info().splitlines() if "thread" in line.lower()
                          or "OMP" in line or "MKL" in line],
    }


def _counters() -> tuple[float, float, int]:
    import resource

    u = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), u.ru_utime + u.ru_stime, u.ru_nivcsw


def bench(model_cfg, policy, loss_cfg, rows: list[dict], *, steps: int, pairs_per_step: int,
          threads: int | None, init_dist: bool, nice_toggle: bool = False, out_path: str | None = None) -> dict:
    """Alternate the floor's step and ray_dpo's step on the same batches in THIS process."""
    from transformers import AutoModelForCausalLM

    from ray_dpo import compat
    from ray_dpo.batching.layouts import build_batch, model_inputs, pair_logps
    from ray_dpo.policy import worker as W
    from ray_dpo.policy.ds_config import lr_lambda
    from ray_dpo.policy.step_metrics import PhaseClock

    before = probe()
    if threads:
        torch.set_num_threads(threads)
    if init_dist:  # a plain process: a group of one, as TorchTrainer gives the Ray worker
        import torch.distributed as dist

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    batches = [rows[i * pairs_per_step:(i + 1) * pairs_per_step] for i in range(steps)]
    # ray_dpo's side: the worker's own engine setup and step functions
    torch.manual_seed(0)
    engine, _ = W.setup_engine(model_cfg, policy, device=torch.device("cpu"), world_size=1, total_steps=steps)
    worker = W.RankState(engine=engine, feeder=None, loss=loss_cfg, policy=policy, rank=0, world_size=1,
                         device=torch.device("cpu"), pad_token_id=W.model_pad_token_id(engine.module.config),
                         total_steps=steps, attn_implementation=compat.attn_implementation(engine.module.config))
    # the floor's side: floor.py's loop
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_cfg.name_or_path, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.train()
    pad = worker.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=policy.learning_rate, betas=tuple(policy.adam_betas),
                                  weight_decay=policy.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(
        s, warmup_steps=policy.warmup_steps, total_steps=steps, schedule=policy.lr_scheduler))

    def floor_step(pairs):
        batch = build_batch(pairs, layout=policy.layout, pad_token_id=int(pad))
        ref = torch.tensor([[p["ref_chosen_logp"], p["ref_rejected_logp"]] for p in pairs])
        logits = model(**model_inputs(batch, attn_implementation="sdpa", dtype=torch.float32)).logits
        chosen, rejected, _, _ = pair_logps(logits.float(), batch)
        margin = (chosen - ref[:, 0]) - (rejected - ref[:, 1])
        loss = -torch.nn.functional.logsigmoid(loss_cfg.beta * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), policy.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item(), {}

    def ray_dpo_step(pairs):
        clock = PhaseClock()
        out, _ = W.pair_terms(worker, pairs, clock)
        worker.engine.backward(out.losses.sum() / len(pairs))
        clock.lap("backward")
        W.step_optimizer(worker.engine)
        clock.lap("optimizer")
        return float(out.losses.mean()), dict(clock.seconds)

    after_setup = probe()
    records = []
    own_nice = os.nice(0)
    for i, pairs in enumerate(batches):
        nice = own_nice
        if nice_toggle:  # steps 1, 3, 5..: the process's own niceness; 2, 4, ..: 0 (every thread: nice is per thread)
            nice = own_nice if i % 2 == 0 else 0
            for tid in os.listdir("/proc/self/task"):
                try:
                    os.setpriority(os.PRIO_PROCESS, int(tid), nice)
                except (PermissionError, ProcessLookupError):
                    pass
        order = (("floor", floor_step), ("ray_dpo", ray_dpo_step))
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            t0, c0, n0 = _counters()
            wall0 = time.time()
            loss, phases = fn(pairs)
            t1, c1, n1 = _counters()
            records.append({"step": i + 1, "side": name, "wall_s": t1 - t0, "cpu_s": c1 - c0, "nivcsw": n1 - n0,
                            "loss": loss, "nice": os.nice(0), "start": wall0, "end": time.time(), "phases": phases})
    result = {"probe_before": before, "probe_after_setup": after_setup, "records": records}
    if out_path:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump(result, f)
    return result


def in_subprocess(*args, **kwargs) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(bench, *args, **kwargs).result()


def _train_loop(config: dict) -> None:
    """Imports this module by name in the worker (pickled by value, __main__'s globals do not travel)."""
    import importlib
    import sys

    sys.path.insert(0, config.pop("bench_dir"))
    importlib.import_module("floor_inside").bench(**config)


def in_ray_train(cfg, kwargs: dict, out: str, worker_env: dict | None = None) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    path = os.path.join(out, "ray_train.json")
    trainer = TorchTrainer(
        _train_loop, train_loop_config={**kwargs, "out_path": path, "bench_dir": os.path.dirname(os.path.abspath(__file__))},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False,
                                     resources_per_worker={"CPU": cfg.policy.num_cpus_per_worker}),
        run_config=RunConfig(name="floor_inside", storage_path=out,
                             worker_runtime_env={"env_vars": worker_env} if worker_env else None))
    trainer.fit()
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class CpuSampler:
    """Every process's CPU seconds (user+sys), sampled every `every` s in a thread."""

    def __init__(self, every: float = 1.0):
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        import psutil

        while not self._stop.is_set():
            snap = {}
            for p in psutil.process_iter(["name", "cmdline"]):
                try:
                    t = p.cpu_times()
                    cmd = p.info["cmdline"] or [p.info["name"] or "?"]
                    snap[p.pid] = (_label(p.info["name"], cmd), t.user + t.system, p.nice())
                except Exception:  # noqa: BLE001 -- gone between listing and reading
                    continue
            self.samples.append((time.time(), snap))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def usage(self, start: float, end: float) -> list[tuple[str, int, float]]:
        """(label, pid, CPU seconds) of every process between the samples bracketing [start, end]."""
        before = max((s for s in self.samples if s[0] <= start), key=lambda s: s[0], default=self.samples[0])
        after = min((s for s in self.samples if s[0] >= end), key=lambda s: s[0], default=self.samples[-1])
        rows = []
        for pid, (label, cpu, nice) in after[1].items():
            rows.append((label, pid, cpu - before[1].get(pid, (label, 0.0, 0))[1], nice))
        return sorted(rows, key=lambda r: -r[2]), after[0] - before[0]


def _label(name: str, cmd: list[str]) -> str:
    joined = " ".join(cmd)
    for key in ("ray::", "raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env",
                "default_worker", "floor_inside"):
        if key in joined:
            return (cmd[0] if key == "ray::" else key)[:60]
    return (name or "?")[:40]


def summarize(name: str, result: dict, warmup: int) -> None:
    recs = [r for r in result["records"] if r["step"] > warmup]
    for nice in sorted({r["nice"] for r in recs}, reverse=True):
        for side in ("floor", "ray_dpo"):
            mine = [r for r in recs if r["side"] == side and r["nice"] == nice]
            wall = statistics.median(r["wall_s"] for r in mine)
            cpu = statistics.median(r["cpu_s"] / r["wall_s"] for r in mine)
            nivcsw = statistics.median(r["nivcsw"] for r in mine)
            print(f"  {name:14s} nice {nice:3d} {side:8s} median step {wall:6.2f} s  cores busy {cpu:4.2f}  "
                  f"involuntary ctx switches {nivcsw:6.0f}  steps: " + " ".join(f"{r['wall_s']:.2f}" for r in mine))


def real_run(cfg, *, name: str, steps: int, warmup: int, out: str, worker_env: dict | None) -> dict:
    """A real run_dpo of the example (floor.py's run_config: no eval, no export); with
    worker_env, the Ray Train workers get those env vars (RunConfig.worker_runtime_env)."""
    import dataclasses

    import ray.train

    from floor import run_config
    from ray_dpo.driver import run_dpo
    from ray_dpo.tracking.mlflow_sink import mlflow_client
    from sentiment_vs_trl import _history

    rc = run_config(cfg, layout=cfg.policy.layout, steps=steps, out=out)
    rc = dataclasses.replace(rc, run=dataclasses.replace(rc.run, name=name))
    cls = ray.train.RunConfig  # the driver builds it: its workers get worker_env through __post_init__
    original = cls.__post_init__

    def post_init(self):
        if worker_env and not self.worker_runtime_env:
            self.worker_runtime_env = {"env_vars": dict(worker_env)}
        original(self)

    cls.__post_init__ = post_init
    try:
        summary = run_dpo(rc)
    finally:
        cls.__post_init__ = original
    client = mlflow_client(summary.tracking_uri)
    keys = ("perf/step_time_s", "perf/forward_s", "perf/backward_s", "perf/optimizer_s", "perf/report_s", "train/loss")
    hist = {k: _history(client, summary.run_id, k) for k in keys}
    stamps = {s: t for s, (_, t) in hist["train/loss"].items()}
    med = {k: statistics.median(v for s, (v, _) in h.items() if s > warmup) for k, h in hist.items() if h}
    return {"medians": med, "window": (stamps[warmup], stamps[max(stamps)]),
            "steps": {s: v for s, (v, _) in hist["perf/step_time_s"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--run-steps", type=int, default=8, help="steps of each real run_dpo block")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in every block (default: leave each process's own)")
    parser.add_argument("--blocks", nargs="+",
                        default=["run_dpo", "run_dpo_nice0", "ray_train", "plain_ray_up", "plain", "run_dpo_2"])
    parser.add_argument("--out", default="/tmp/floor_inside")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cfg = load_run_config(args.config)
    _, rows = ray_dpo_pairs(cfg)
    rows = [{**r, "ref_chosen_logp": 0.0, "ref_rejected_logp": 0.0} for r in rows]  # same work as real ones
    kwargs = dict(model_cfg=cfg.model, policy=cfg.policy, loss_cfg=cfg.loss, rows=rows, steps=args.steps,
                  pairs_per_step=cfg.policy.micro_batch_size, threads=args.threads)
    results, usage, runs = {}, {}, {}
    import ray

    from ray_dpo.driver import init_ray

    for block in args.blocks:
        if block == "plain":
            ray.shutdown()
        elif not ray.is_initialized():
            init_ray(cfg)
        with CpuSampler() as sampler:
            if block.startswith("run_dpo"):
                env = {"RAY_worker_niceness": "0"} if block.endswith("nice0") else None
                runs[block] = real_run(cfg, name=f"inside-{block}", steps=args.run_steps, warmup=args.warmup + 1,
                                       out=args.out, worker_env=env)
                window = runs[block]["window"]
            elif block == "ray_train":
                results[block] = in_ray_train(cfg, {**kwargs, "init_dist": False, "nice_toggle": True}, args.out)
            else:
                results[block] = in_subprocess(**kwargs, init_dist=True)
            if block in results:
                recs = [r for r in results[block]["records"] if r["step"] > args.warmup]
                window = (min(r["start"] for r in recs), max(r["end"] for r in recs))
        usage[block] = sampler.usage(*window)
    ray.shutdown()
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"results": results, "runs": runs, "usage": usage}, f, default=str)
    print("\n=== probes ===")
    for block, res in results.items():
        print(block, "before setup", json.dumps(res["probe_before"], default=str))
    print(f"\n=== real runs (medians over steps > {args.warmup + 1}) ===")
    for block, run in runs.items():
        m = run["medians"]
        print(f"  {block:14s} step {m['perf/step_time_s']:.2f} s  forward {m['perf/forward_s']:.2f}  backward "
              f"{m['perf/backward_s']:.2f}  optimizer {m['perf/optimizer_s']:.2f}  report {m.get('perf/report_s', 0):.3f}"
              "  steps: " + " ".join(f"{v:.2f}" for _, v in sorted(run["steps"].items())))
    print(f"\n=== alternating steps in one process (medians over steps > {args.warmup}) ===")
    for block, res in results.items():
        summarize(block, res, args.warmup)
    print("\n=== CPU seconds per process during the measured steps ===")
    for block, (rows_, span) in usage.items():
        print(f"{block}: window {span:.1f} s")
        for label, pid, cpu, nice in rows_[:14]:
            if cpu > 0.05:
                print(f"    {cpu:7.2f} s  {100 * cpu / span:5.1f}%  nice {nice:3d} {pid:7d} {label}")


if __name__ == "__main__":
    main()
