"""Chaos runs: each run of the tiny config kills a random role at a random step (seeded) and
checks what tests/ray/test_faults.py checks; prints how many runs survived.

    .venv/bin/python benchmarks/chaos.py --runs 6 --seed 0 [--out chaos-runs] [--online]

A role is a policy worker, the BatchFeeder, a reference actor or the driver (then the same
command runs again, as a user or a KubeRay retry would). Survived = exit 0, MLflow FINISHED,
steps 1..N in the ledger once each, every pair once. --online: online DPO (two rounds of 4
steps, transformers engines, best-vs-worst pairs of the tiny judge); the roles are then a
worker, a reference actor, a generation engine, the OnlineCoordinator or the driver, and
"every pair once" means every pair any round kept (the round store).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import command, machine, table, versions  # noqa: E402

STEPS, PAIRS_PER_STEP = 12, 16
ROLES = ("worker", "feeder", "reference", "driver")
ONLINE_STEPS = 8
ONLINE_ROLES = ("worker", "reference", "engine", "coordinator", "driver")
ONLINE = {"enabled": True, "rounds": 2, "prompts_per_round": 64, "samples_per_prompt": 4, "backend": "transformers",
          "pair_strategy": "best_vs_worst", "judge": {"function": "ray_dpo.testing.assets:judge_score"},
          "sampling": {"max_new_tokens": 16}}


def write_config(root: str, assets: dict, name: str, online: bool) -> str:
    from ray_dpo.config import apply_overrides, from_dict, to_yaml

    data = {
        "run": {"name": name, "storage_path": os.path.join(root, "runs"), "device": "cpu"},
        "model": {"name_or_path": assets["model"], "dtype": "fp32"},
        "data": {"train_files": [assets["train_glob"]], "max_length": 64, "max_prompt_length": 32},
        "reference": {"num_actors": 1, "batch_size": 16},
        "policy": {"num_workers": 2, "zero_stage": 1, "micro_batch_size": 8, "learning_rate": 1e-3,
                   "warmup_steps": 2, "checkpoint_every_steps": 4, "max_steps": STEPS},
        "tracking": {"mlflow": {"experiment": "chaos"}},
    }
    if online:
        data["online"] = ONLINE
        data["policy"].update(checkpoint_every_steps=2, max_steps=None)
    cfg = from_dict(apply_overrides(data, []))
    path = os.path.join(root, f"{name}.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(to_yaml(cfg))
    return path


def one_run(root: str, assets: dict, gcs: str, index: int, rng: random.Random, online: bool) -> tuple:
    from ray_dpo.testing import chaos

    steps = ONLINE_STEPS if online else STEPS
    role, step = rng.choice(ONLINE_ROLES if online else ROLES), rng.randrange(2, steps - 1)
    name = f"chaos-{'online-' if online else ''}{index}"
    path = write_config(root, assets, name, online)
    run_dir = os.path.join(root, "runs", name)
    t0 = time.monotonic()
    proc, out = chaos.start_cli(path, os.path.join(root, f"{name}.log"), gcs)
    killed = chaos.kill_when(proc, run_dir, steps=step, pid_of=lambda: chaos.role_pid(role, proc))
    code, _ = chaos.finish(proc, out)
    if role == "driver" and killed is not None:
        proc, out = chaos.start_cli(path, os.path.join(root, f"{name}-rerun.log"), gcs)
        code, _ = chaos.finish(proc, out)
    problems = (chaos.online_ledger_problems(run_dir, steps=steps) if online
                else chaos.ledger_problems(run_dir, steps=steps, pairs_per_step=PAIRS_PER_STEP))
    status = chaos.mlflow_run(os.path.join(root, "runs"), run_dir)[1].info.status
    if code != 0 or status != "FINISHED":
        problems.append(f"exit {code}, MLflow {status}")
    if killed is None:
        problems.append("the run ended before the kill")
    return name, role, step, "yes" if not problems else "NO", round(time.monotonic() - t0), "; ".join(problems)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="keep runs and logs here (default: a temp dir)")
    parser.add_argument("--online", action="store_true", help="online DPO runs (module docstring)")
    args = parser.parse_args()
    for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)
    import ray

    from ray_dpo.testing.assets import make_tiny_assets

    root = os.path.abspath(args.out or tempfile.mkdtemp(prefix="ray_dpo_chaos_"))
    os.makedirs(root, exist_ok=True)
    assets = make_tiny_assets(os.path.join(root, "assets"))
    ray.init(address="local", num_cpus=4, include_dashboard=False)
    rng = random.Random(args.seed)
    try:
        gcs = ray.get_runtime_context().gcs_address
        rows = [one_run(root, assets, gcs, i, rng, args.online) for i in range(args.runs)]
    finally:
        ray.shutdown()
    print(f"# {command()}\n# {machine()}\n# {versions('ray', 'deepspeed')}\n# runs and logs: {root}")
    print(table(["run", "killed", "at step", "survived", "seconds", "problems"], rows))
    survived = sum(row[3] == "yes" for row in rows)
    print(f"survived: {survived} of {len(rows)}")
    return 0 if survived == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
