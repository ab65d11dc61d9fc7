"""Wall times of finished runs, read from their MLflow store: the whole run, median step and
each online round.

    .venv/bin/python benchmarks/run_times.py --tracking-uri sqlite:///ray_dpo_runs/mlflow.db \
        --experiment ray_dpo-sentiment RUN_NAME [RUN_NAME ...] [--steps-per-round 8]

wall: from the start of step 1 (its `train/loss` timestamp minus its `perf/step_time_s`) to the
end of the MLflow run, so start-up and an up-front reference pass are left out and the final
eval is in. Round r: from the last step of round r-1 (or the start of step 1) to its last step.
"""

from __future__ import annotations

import argparse
import statistics

from _common import find_run


def times(client, run, steps_per_round: int) -> dict:
    loss = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: (m.step, m.timestamp))
    step_s = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "perf/step_time_s")}
    last = {m.step: m.timestamp / 1000 for m in loss}  # the re-run value of a rolled-back step wins
    start = last[1] - step_s[1]
    out = {"steps": max(last), "wall_s": run.info.end_time / 1000 - start,
           "median_step_s": statistics.median(step_s.values())}
    if steps_per_round:
        ends = [start] + [last[s] for s in range(steps_per_round, max(last) + 1, steps_per_round)]
        out["round_s"] = [b - a for a, b in zip(ends, ends[1:])]
    sync = [m.value for m in client.get_metric_history(run.info.run_id, "sync/seconds")]
    if sync:
        out["sync_s"] = sync
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--steps-per-round", type=int, default=0, help="online runs: steps of one round")
    parser.add_argument("names", nargs="+", help="run names (the latest FINISHED run of each)")
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(args.tracking_uri)
    for name in args.names:
        t = times(client, find_run(client, args.experiment, name, status="FINISHED"), args.steps_per_round)
        rounds = " rounds " + " ".join(f"{s:.0f}" for s in t["round_s"]) if "round_s" in t else ""
        sync = f" sync {min(t['sync_s']):.1f}-{max(t['sync_s']):.1f} s" if "sync_s" in t else ""
        print(f"{name}: {t['steps']} steps, wall {t['wall_s']:.0f} s, median step {t['median_step_s']:.1f} s{rounds}{sync}")


if __name__ == "__main__":
    main()
