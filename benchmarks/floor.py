"""ray_dpo's policy step against the machine's floor: a bare PyTorch loop on the same batches.

Question: how much slower is a ray_dpo training step than the least a step on this machine
can cost (the same model, batches, reference log-probs and dtype, with no DeepSpeed and no
Ray), per batch layout? Where does ray_dpo's extra time go (its perf/*_s phase metrics)?

One invocation does both, back to back, on the sentiment example (SmolLM2-135M-Instruct,
8 pairs a step, examples/sentiment/sentiment.yaml):

1. ray_dpo: for each layout and each model dtype (--dtypes: fp32, and bf16 = DeepSpeed's bf16
   mode), a short `run_dpo` of the example's config (--steps steps, no held-out eval, no HF
   export) in one local Ray cluster; the reference log-probs are precomputed once per dtype
   into this invocation's cache, so every run and the floor use the same ones. Per step:
   perf/step_time_s (feeder fetch -> optimizer step, what the worker measures) and its phases,
   perf/report_s (rank 0: the end of one step to the start of the next, i.e. Ray Train's
   report), and the wall time between the MLflow points of two steps. Peak RSS: the worker's
   perf/peak_rss_gb at the last step.
2. the floor, in a fresh process per (layout, precision): exactly the batches of the run's
   pair ledger (<storage>/<run>/ledger.jsonl), tokenized by ray_dpo's PairTokenizer (the code
   of the tokenize stage), the cached reference log-probs; one forward in the layout
   (ray_dpo.batching.layouts: pure torch), sigmoid DPO loss, backward, clip_grad_norm_, torch
   AdamW; torch threads = policy.num_cpus_per_worker. fp32, and bf16 under
   torch.autocast("cpu") with fp32 weights (the precision matching the run's dtype). Each
   floor runs twice: first while the runs' Ray cluster is still up and idle ("Ray up": the
   machine as the Ray Train worker shares it with Ray's raylet, GCS, agents and idle actors;
   --no-floor-ray-up skips it), then after ray.shutdown() ("Ray down": the machine's floor,
   and the process's peak RSS its own).

Medians over the steps after --warmup. "floor (padded)" is the yardstick: one concatenated
forward of the 2B sequences, causal sdpa. The ratio columns divide ray_dpo's step (the
worker's step time plus rank 0's report) by the floors. benchmarks/floor_inside.py runs
the same step code side by side in the Ray Train worker and in plain processes.

    .venv/bin/python examples/sentiment/prepare.py --out .assets     # once
    .venv/bin/python benchmarks/floor.py                            # ~12 min on 2 cores
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # the others: sentiment_vs_trl's import sets them
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from _common import record, table  # noqa: E402
from sentiment_vs_trl import CONFIG, _history, load_run_config, ray_dpo_pairs  # noqa: E402

LAYOUTS = ("padded", "packed", "prefix_shared")
PHASES = ("fetch", "build", "forward", "backward", "optimizer")  # perf/<phase>_s, within perf/step_time_s


# --------------------------------------------------------------------------- ray_dpo side


def run_config(cfg, *, layout: str, steps: int, out: str, dtype: str = "fp32"):
    """The example's config for a short timed run: no held-out eval, no export, own storage;
    model.dtype = dtype (the reference's too: one reference cache per dtype)."""
    import dataclasses

    return dataclasses.replace(
        cfg,
        run=dataclasses.replace(cfg.run, name=f"floor-{layout}" + ("" if dtype == "fp32" else f"-{dtype}"),
                                storage_path=out),
        model=dataclasses.replace(cfg.model, dtype=dtype),
        policy=dataclasses.replace(cfg.policy, layout=layout, max_steps=steps, save_hf_model=False,
                                   checkpoint_every_steps=0),
        reference=dataclasses.replace(cfg.reference, cache_dir=os.path.join(out, f"reference_cache_{dtype}")),
        eval=dataclasses.replace(cfg.eval, prompts_file=None),
    )


def run_ray_dpo(cfg) -> dict:
    """Train `cfg`; per-step perf metrics from its MLflow run and its ledger's batches."""
    from ray_dpo.driver import run_dpo
    from ray_dpo.tracking.mlflow_sink import mlflow_client

    summary = run_dpo(cfg)
    client = mlflow_client(summary.tracking_uri)
    keys = ["perf/step_time_s", "perf/report_s", "perf/peak_rss_gb", "train/loss",
            *(f"perf/{p}_s" for p in PHASES)]
    history = {k: {s: v for s, (v, _) in _history(client, summary.run_id, k).items()} for k in keys}
    stamps = {s: t for s, (_, t) in _history(client, summary.run_id, "train/loss").items()}
    history["wall_s"] = {s: stamps[s] - stamps[s - 1] for s in stamps if s - 1 in stamps}
    with open(os.path.join(cfg.run.storage_path, cfg.run.name, "ledger.jsonl"), encoding="utf-8") as f:
        ledger = {e["step"]: e["pair_ids"] for e in map(json.loads, f)}
    return {"history": history, "ledger": [ledger[s] for s in sorted(ledger)]}


def reference_logps(cache_dir: str) -> dict[str, tuple[float, float]]:
    """The one entry of this invocation's reference cache (every run hit the same one)."""
    from ray_dpo.reference import cache

    keys = [k for k in os.listdir(cache_dir) if os.path.isdir(os.path.join(cache_dir, k))]
    if len(keys) != 1:
        raise SystemExit(f"expected one reference cache entry under {cache_dir}, found {keys}")
    return cache.load(cache_dir, keys[0])


# --------------------------------------------------------------------------- the floor


def floor_loop(model_dir: str, batches: list[list[dict]], *, layout: str, precision: str, threads: int,
               policy, beta: float) -> dict:
    """The bare loop on `batches` (rows with ref_*_logp), in THIS process: step seconds,
    losses and the process's peak RSS. Run it in a fresh process (floor_in_subprocess)."""
    from transformers import AutoModelForCausalLM

    from ray_dpo.batching.layouts import build_batch, model_inputs, pair_logps
    from ray_dpo.policy.ds_config import lr_lambda

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else model.config.eos_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=policy.learning_rate, betas=tuple(policy.adam_betas),
                                  weight_decay=policy.weight_decay)
    # ray_dpo's LR schedule over the run's steps, so the losses can be compared step by step
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(
        s, warmup_steps=policy.warmup_steps, total_steps=len(batches), schedule=policy.lr_scheduler))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    times, losses = [], []
    for pairs in batches:
        t0 = time.perf_counter()
        batch = build_batch(pairs, layout=layout, pad_token_id=int(pad))
        ref = torch.tensor([[p["ref_chosen_logp"], p["ref_rejected_logp"]] for p in pairs])
        with autocast:
            logits = model(**model_inputs(batch, attn_implementation="sdpa", dtype=torch.float32)).logits
        chosen, rejected, _, _ = pair_logps(logits.float(), batch)
        margin = (chosen - ref[:, 0]) - (rejected - ref[:, 1])
        loss = -torch.nn.functional.logsigmoid(beta * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), policy.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return {"times": times, "losses": losses,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def floor_in_subprocess(*args, **kwargs) -> dict:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(floor_loop, *args, **kwargs).result()


# --------------------------------------------------------------------------- table


def median_after(values: dict[int, float] | list[float], warmup: int) -> float:
    """Median of steps warmup+1.. (1-based) of a {step: value} history or a list."""
    items = sorted(values.items()) if isinstance(values, dict) else list(enumerate(values, start=1))
    kept = [v for s, v in items if s > warmup]
    return statistics.median(kept) if kept else float("nan")


def phase_table(runs: dict[str, dict], warmup: int) -> str:
    rows = []
    for layout, run in runs.items():
        h = run["history"]
        step = median_after(h["perf/step_time_s"], warmup)
        phases = [median_after(h[f"perf/{p}_s"], warmup) if h[f"perf/{p}_s"] else float("nan") for p in PHASES]
        rows.append([layout, *(f"{v:.3f}" for v in phases), f"{step - sum(phases):.3f}", f"{step:.3f}",
                     f"{median_after(h['perf/report_s'], warmup):.3f}" if h["perf/report_s"] else "-",
                     f"{median_after(h['wall_s'], warmup):.3f}"])
    return table(["layout", *(f"{p} s" for p in PHASES), "rest s", "step s", "report s",
                  "wall between steps s"], rows)


PRECISION = {"fp32": "fp32", "bf16": "bf16"}  # ray_dpo's model.dtype -> the floor's precision (bf16: autocast)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--steps", type=int, default=8, help="steps per ray_dpo run and floor loop")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="ray_dpo runs' model.dtype; each is compared with the floor of its precision")
    parser.add_argument("--floor-ray-up", action=argparse.BooleanOptionalAction, default=True,
                        help="also time each floor while the runs' Ray cluster is up and idle")
    parser.add_argument("--out", default=None, help="storage for the runs (default: a temporary directory)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args = parser.parse_args()
    base = load_run_config(args.config)
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="ray_dpo_floor_"))
    runs = {}
    for layout in args.layouts:
        for dtype in args.dtypes:
            runs[layout, dtype] = run_ray_dpo(run_config(base, layout=layout, steps=args.steps, out=out, dtype=dtype))
    token_rows = ray_dpo_pairs(base)[1]
    refs = {dtype: reference_logps(os.path.join(out, f"reference_cache_{dtype}")) for dtype in args.dtypes}
    rows = {dtype: {r["pair_id"]: {**r, "ref_chosen_logp": refs[dtype][r["pair_id"]][0],
                                   "ref_rejected_logp": refs[dtype][r["pair_id"]][1]} for r in token_rows}
            for dtype in args.dtypes}
    threads = int(base.policy.num_cpus_per_worker)
    import ray

    floors = {}
    conditions = (["ray_up"] if args.floor_ray_up else []) + ["ray_down"]
    for condition in conditions:
        if condition == "ray_down":
            ray.shutdown()  # the floor runs alone on the cores
        for layout in args.layouts:
            for dtype in args.dtypes:
                batches = [[rows[dtype][pid] for pid in ids] for ids in runs[layout, dtype]["ledger"]]
                for floor_layout in dict.fromkeys(("padded", layout)):
                    key = (floor_layout, PRECISION[dtype], condition)
                    if key not in floors:
                        floors[key] = floor_in_subprocess(
                            base.model.name_or_path, batches, layout=floor_layout, precision=PRECISION[dtype],
                            threads=threads, policy=base.policy, beta=base.loss.beta)
    result_rows = []
    for layout in args.layouts:
        for dtype in args.dtypes:
            h = runs[layout, dtype]["history"]
            step = median_after(h["perf/step_time_s"], args.warmup)
            report = median_after(h["perf/report_s"], args.warmup) if h["perf/report_s"] else 0.0
            ray_loss = [h["train/loss"][s] for s in sorted(h["train/loss"])]
            precision = PRECISION[dtype]
            yard, same = floors["padded", precision, "ray_down"], floors[layout, precision, "ray_down"]
            yard_s, same_s = median_after(yard["times"], args.warmup), median_after(same["times"], args.warmup)
            up = floors.get((layout, precision, "ray_up"))
            up_s = median_after(up["times"], args.warmup) if up else float("nan")
            loss_diff = max(abs(a - b) for a, b in zip(ray_loss, same["losses"]))
            result_rows.append([
                layout, dtype, "fp32" if precision == "fp32" else "bf16 autocast", f"{step:.2f}", f"{report:.2f}",
                f"{yard_s:.2f}", f"{same_s:.2f}", f"{up_s:.2f}",
                f"{(step + report) / yard_s:.2f}x", f"{(step + report) / same_s:.2f}x",
                f"{(step + report) / up_s:.2f}x", f"{same_s and up_s / same_s:.2f}x",
                f"{h['perf/peak_rss_gb'][max(h['perf/peak_rss_gb'])]:.2f}", f"{same['peak_rss_gb']:.2f}",
                f"{loss_diff:.1e}"])
    body = table(["layout", "ray_dpo dtype", "floor precision", "ray_dpo step s", "+ report s",
                  "floor (padded) s", "floor (same layout) s", "floor (same layout, Ray up) s",
                  "ray_dpo / floor (padded)", "ray_dpo / floor (same layout)", "ray_dpo / floor (same layout, Ray up)",
                  "floor Ray up / down", "worker peak RSS GB", "floor peak RSS GB", "max abs(loss diff)"], result_rows)
    body += "\n\nray_dpo's step by phase (medians, seconds; perf/*_s from ray_dpo/policy/worker.py run_step):\n\n"
    body += phase_table({f"{layout} {dtype}": run for (layout, dtype), run in runs.items()}, args.warmup)
    notes = (f"SmolLM2-135M-Instruct, {base.policy.micro_batch_size} pairs a step, {args.steps} steps per run, "
             f"medians over steps {args.warmup + 1}..{args.steps}; ray_dpo: the example's config "
             f"(ZeRO-{base.policy.zero_stage}, {base.policy.num_workers} worker x {threads} CPUs) with "
             f"policy.layout and model.dtype set per row; floor: torch threads {threads}, its own process, the same "
             "batches (pair ledger) and cached reference log-probs (of the run's dtype), timed while the runs' Ray "
             "cluster is up and idle ('Ray up') and after ray.shutdown() (the other floor columns). 'max abs(loss "
             "diff)': ray_dpo's train/loss vs the same-layout floor of its precision over all steps (bf16 rows: "
             "DeepSpeed bf16 weights vs autocast over fp32 weights, so not expected to match).")
    record("ray_dpo step vs the floor (bare PyTorch loop, same batches)", body, packages=("ray", "deepspeed"),
           notes=notes, save=not args.no_record)


if __name__ == "__main__":
    main()
