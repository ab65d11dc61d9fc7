"""Reference placement: a separate, streamed ReferenceGroup vs a reference model inside each
policy worker. Step time and peak memory (RSS on CPU) per policy worker.

Question: what does moving the frozen reference out of the policy worker buy?

* in_worker: the worker holds policy (+ AdamW state) AND a frozen reference copy; every step
  runs the reference forward (no grad) and then the policy forward/backward/step.
* streamed:  the worker holds only the policy; ray_dpo's ReferenceGroup (one actor, its own
  process) scores batches ahead of training (score_batches, max_in_flight=2) and the step
  only waits when the group falls behind.

Each mode runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own. Both import
ray; the streamed worker is also a Ray driver. The policy step is the worker's own code
(ray_dpo.policy.worker: DeepSpeed ZeRO-0 engine, padded layout) on a single-rank gloo group.
On this CPU machine the reference actor shares the same cores as the policy; on a GPU
cluster it has its own devices, so there the streamed overlap is free compute.

    .venv/bin/python benchmarks/reference_placement.py    # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
warnings.filterwarnings("ignore")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def policy_worker(args, model_dir: str):
    import torch

    from ray_dpo.config import LossConfig, ModelConfig, PolicyConfig
    from ray_dpo.policy.worker import RankState, model_pad_token_id, pair_terms, setup_engine, step_optimizer
    from vs_trl import init_single_rank_group

    init_single_rank_group()
    policy = PolicyConfig(num_workers=1, zero_stage=0, micro_batch_size=args.pairs, learning_rate=1e-5,
                          lr_scheduler="constant", warmup_steps=0)
    engine, _ = setup_engine(ModelConfig(name_or_path=model_dir, dtype="fp32", attn_implementation="sdpa"), policy,
                             device=torch.device("cpu"), world_size=1, total_steps=args.steps)
    worker = RankState(engine=engine, feeder=None, loss=LossConfig(beta=0.1), policy=policy, rank=0, world_size=1,
                    device=torch.device("cpu"), pad_token_id=model_pad_token_id(engine.module.config),
                    total_steps=args.steps, attn_implementation="sdpa")

    def step(pairs):
        out, *_ = pair_terms(worker, pairs)
        engine.backward(out.losses.sum() / len(pairs))
        step_optimizer(engine)
        return out.losses.mean().item()

    return step


def child(args) -> None:
    """One mode, in this process; prints a JSON line."""
    import ray  # noqa: F401  (both modes pay for importing it)
    import torch

    from layouts import make_pairs

    torch.set_num_threads(args.threads)
    pairs = make_pairs("multi_turn", args.pairs * args.steps, vocab=args.vocab, seed=5)
    batches = [[{**p, "pair_id": str(i * args.pairs + j)} for j, p in enumerate(pairs[i:i + args.pairs])]
               for i in range(0, len(pairs), args.pairs)]
    baseline = peak_rss_mb()
    step = policy_worker(args, args.model_dir)
    times, losses = [], []
    if args.child == "in_worker":
        from ray_dpo.reference import ReferenceActor

        reference = ReferenceActor(args.model_dir, dtype="fp32", device="cpu", attn_implementation="sdpa")
        for batch in batches:
            t0 = time.perf_counter()
            out = reference.log_probs(batch)
            scored = [{**r, "ref_chosen_logp": c, "ref_rejected_logp": x}
                      for r, c, x in zip(batch, out["ref_chosen_logp"], out["ref_rejected_logp"])]
            losses.append(step(scored))
            times.append(time.perf_counter() - t0)
    else:
        from ray_dpo.config import ReferenceConfig
        from ray_dpo.reference import ReferenceGroup

        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        group = ReferenceGroup(model_path=args.model_dir, config=ReferenceConfig(num_actors=1, batch_size=args.pairs,
                                                                                 max_in_flight=2),
                               dtype="fp32", use_gpu=False, attn_implementation="sdpa")
        stream = group.score_batches(iter(batches))
        next_batch = lambda: next(stream)  # noqa: E731
        for _ in batches:
            t0 = time.perf_counter()
            losses.append(step(next_batch()))
            times.append(time.perf_counter() - t0)
        group.shutdown()
        ray.shutdown()
    print("RESULT " + json.dumps({"mode": args.child, "times": times, "loss0": losses[0],
                                  "peak_rss_mb": peak_rss_mb(), "baseline_rss_mb": baseline}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="steps per mode (the first is not timed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--child", choices=["in_worker", "streamed"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from _common import record, table, tiny_llama

    results = {}
    with tempfile.TemporaryDirectory(prefix="ray_dpo_refplace_") as root:
        model_dir = os.path.join(root, "model")
        model = tiny_llama(hidden=args.hidden, layers=args.layers, vocab=args.vocab)
        model.save_pretrained(model_dir)
        params = sum(p.numel() for p in model.parameters())
        del model
        for mode in ("in_worker", "streamed"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--model-dir", model_dir,
                   *[f"--{k}={getattr(args, k)}" for k in ("pairs", "steps", "threads", "vocab")]]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            results[mode] = json.loads(line[len("RESULT "):])
    rows = []
    base = results["in_worker"]
    for mode, r in results.items():
        t = sum(r["times"][1:]) / (len(r["times"]) - 1)
        bt = sum(base["times"][1:]) / (len(base["times"]) - 1)
        rows.append([mode, f"{t:.2f}", f"{bt / t:.2f}x", f"{r['peak_rss_mb']:.0f}",
                     f"{r['peak_rss_mb'] - r['baseline_rss_mb']:.0f}", f"{r['loss0']:.6f}"])
    body = table(["reference", "s/step", "speed vs in_worker", "worker peak RSS MB",
                  "of which model+optimizer+activations MB", "first loss"], rows)
    notes = (f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab} ({params / 1e6:.1f}M params, "
             f"{params * 4 / 2**20:.0f} MiB fp32), {args.pairs} pairs/step, multi_turn lengths, {args.steps} steps "
             f"(first not timed), torch threads {args.threads} per process. Reference = the initial policy, so "
             "the first loss is ln 2 in both modes. CPU: the reference actor competes for the same 2 cores.")
    record("Reference placement: streamed group vs inside the policy worker", body, packages=("ray", "deepspeed"),
           notes=notes, save=not args.no_record)


if __name__ == "__main__":
    main()
