#!/usr/bin/env bash
# The controlled-sentiment experiment with a real model, end to end, on a CPU machine:
# prepare (SmolLM2-135M-Instruct + Rotten Tomatoes pairs, once), then offline DPO and
# online DPO from ONE config into ONE MLflow store and experiment, then `ray-dpo compare`.
# About 8 min of preparation the first time, then ~25 min offline and ~36 min online on 2 cores.
#
#   examples/sentiment/run.sh                       # from any directory
#   STORAGE=/tmp/sent examples/sentiment/run.sh --set policy.learning_rate=1e-5
#
# STORAGE     run.storage_path of both runs, holds mlflow.db (default: a fresh
#             examples/sentiment/out/<timestamp>/runs, so reruns never mix or resume)
# OUT         where compare writes summary.csv and the plots (default: <STORAGE>/../compare)
# ONLY        "offline" or "online" to train one of the two
# Extra arguments go to both `ray-dpo train` commands.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STORAGE="${STORAGE:-$here/out/$(date +%Y%m%d-%H%M%S)/runs}"
mkdir -p "$STORAGE" && STORAGE="$(cd "$STORAGE" && pwd)"
OUT="${OUT:-$(dirname "$STORAGE")/compare}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)"
cd "$here/../.."                                   # repo root: the config uses ./.assets paths

export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true HF_HUB_OFFLINE=1 \
       TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false VLLM_CPU_KVCACHE_SPACE=1
unset MLFLOW_TRACKING_URI                          # both runs use <STORAGE>/mlflow.db
bin=.venv/bin
[ -x "$bin/ray-dpo" ] || { echo "no $PWD/.venv: run scripts/bootstrap first" >&2; exit 1; }

"$bin/python" examples/sentiment/prepare.py --out .assets

config=examples/sentiment/sentiment.yaml
common=(--set "run.storage_path=$STORAGE")
if [ "${ONLY:-offline}" != online ]; then
    # Offline: the fixed pairs; reference log-probs computed once up front.
    "$bin/ray-dpo" train "$config" "${common[@]}" --set run.name=sentiment-offline "$@"
fi
if [ "${ONLY:-online}" != offline ]; then
    # Online: 4 rounds of (sample the policy with vLLM -> judge -> best vs worst -> 16 steps);
    # round pairs are new each round, so reference log-probs are streamed, not precomputed.
    "$bin/ray-dpo" train "$config" "${common[@]}" --set run.name=sentiment-online \
        --set online.enabled=true --set reference.precompute=false "$@"
fi
"$bin/ray-dpo" compare --experiment ray_dpo-sentiment \
    --tracking-uri "sqlite:///$STORAGE/mlflow.db" --out "$OUT"
