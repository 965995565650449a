#!/bin/bash
# Cached reruns of the demo study under two checkouts, alternating, on one machine: which is faster?
#
#   benchmarks/rerun_ab.sh OLD_CHECKOUT NEW_CHECKOUT [ROUNDS [--set KEY=VALUE ...]]
#                                             (OLD: e.g. a `git worktree` of the old commit; --set: the spec's)
#
# Each checkout first runs `adaptflow run studies/demo.yaml` (--workers 1) once in a project folder of its
# own (a new ADAPTFLOW_HOME and PREFECT_HOME under $TMPDIR), which fills its caches; then ROUNDS (default
# 4) cached reruns of each, alternating old and new, each from a copy of the MLflow store as the first run
# left it (so that the store does not grow from one rerun to the next; the Prefect database and MLflow's
# artifact folder do grow a little, alike for both). Prints the wall time of each whole
# command and the "study took" it printed. Uses this project's .venv; each checkout's own code runs
# (`python -m adaptflow.cli` from the checkout). Results: docs/benchmarks.md.
set -Eeuo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); rounds=${3:-4}
overrides=("${@:4}")
python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"  # not realpath: the venv's link
export DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
export HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1
unset PREFECT_API_URL PYTHONPATH MLFLOW_TRACKING_URI
work=$(mktemp -d)
for side in old new; do  # what each side runs, and when
    echo "$side: ${!side} at $(git -C "${!side}" rev-parse --short HEAD)$(git -C "${!side}" status --short \
        --untracked-files=no | grep -q . && echo ' with uncommitted changes'), $(date -u '+%F %T UTC')"
done
trap 'echo "rerun_ab.sh: a run failed; its log is in $work" >&2' ERR
run() {  # checkout, home, label
    local started ended
    started=$(date +%s.%N)
    (cd "$1" && ADAPTFLOW_HOME="$2" PREFECT_HOME="$2/prefect" "$python" -m adaptflow.cli run studies/demo.yaml \
        --tracking-uri "sqlite:///$2/mlflow.db" "${overrides[@]}" > "$2/$3.log" 2>&1)
    ended=$(date +%s.%N)
    echo "$3: $(awk "BEGIN {printf \"%.2f\", $ended - $started}") s, $(grep -o 'study took [0-9.]* s' "$2/$3.log"), load $(cut -d' ' -f1-3 /proc/loadavg)"
}
for side in old new; do
    mkdir -p "$work/$side"
    run "${!side}" "$work/$side" "$side fresh"
    cp "$work/$side/mlflow.db" "$work/$side/first.db"
done
for round in $(seq "$rounds"); do
    for side in old new; do
        cp "$work/$side/first.db" "$work/$side/mlflow.db"
        run "${!side}" "$work/$side" "$side cached $round"
    done
done
rm -rf "$work"
