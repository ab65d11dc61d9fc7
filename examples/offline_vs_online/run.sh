#!/usr/bin/env bash
# Offline vs online DPO on the tiny CPU task, into ONE MLflow store and experiment, then
# `ray-dpo compare` (table + PNG plots). Two training runs of a few minutes each on a 2-core
# CPU machine (needs .venv with the CPU build of vLLM). Works from any cwd.
#
#   examples/offline_vs_online/run.sh
#   STORAGE=/tmp/cmp EXPERIMENT=my-cmp examples/offline_vs_online/run.sh
#
# STORAGE     run.storage_path of both runs, holds mlflow.db (default: a fresh
#             examples/offline_vs_online/out/<timestamp>/runs, so reruns never mix or resume)
# EXPERIMENT  tracking.mlflow.experiment of both runs (default: ray_dpo-tiny)
# OUT         where compare writes summary.csv and the plots (default: <STORAGE>/../compare)
# Extra arguments go to both `ray-dpo train` commands, e.g.  --set loss.beta=0.2
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STORAGE="${STORAGE:-$here/out/$(date +%Y%m%d-%H%M%S)/runs}"
EXPERIMENT="${EXPERIMENT:-ray_dpo-tiny}"
mkdir -p "$STORAGE" && STORAGE="$(cd "$STORAGE" && pwd)"   # absolute (relative to the caller's cwd)
OUT="${OUT:-$(dirname "$STORAGE")/compare}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
cd "$here/../.."                                   # repo root: the configs use ./.tiny paths

export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset MLFLOW_TRACKING_URI                          # both runs use <STORAGE>/mlflow.db
bin=.venv/bin
[ -x "$bin/ray-dpo" ] || { echo "no $PWD/.venv: run scripts/bootstrap (it installs the CPU build of vLLM)" >&2; exit 1; }

common=(--set "run.storage_path=$STORAGE" --set "tracking.mlflow.experiment=$EXPERIMENT")

"$bin/ray-dpo" make-assets --out .tiny

# Offline: the fixed data set, plus the same held-out sampling eval as the online run.
# max_new_tokens must match the online config's (16; the default is 128): eval/kl is per
# sequence, so longer held-out samples would mean a larger KL for the same policy change.
"$bin/ray-dpo" train configs/tiny-cpu.yaml "${common[@]}" \
    --set eval.prompts_file=./.tiny/data/eval.jsonl \
    --set online.judge.function=ray_dpo.testing.assets:judge_score \
    --set online.sampling.max_new_tokens=16 --set eval.every_steps=16 "$@"

# Online: 3 rounds of vLLM generation -> judge -> pairs -> train.
"$bin/ray-dpo" train configs/tiny-cpu-online.yaml "${common[@]}" "$@"

"$bin/ray-dpo" compare --experiment "$EXPERIMENT" \
    --tracking-uri "sqlite:///$STORAGE/mlflow.db" --out "$OUT"
