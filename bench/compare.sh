#!/usr/bin/env bash
# Speed against an earlier commit: bench/pipeline.py run alternately on BASE (checked out in a
# temporary git worktree) and on this checkout, PAIRS times, for two workloads:
#   rate0     --modes pipeline --seconds 30 (windows/s at rate 0)
#   realtime  --modes raw_encoder --realtime 3 --seconds 30 (latency beyond the window, p99)
# Each run prints one JSON object; this script prints it on one line after "<workload> <base|head> ".
#
#   bash bench/compare.sh d65f83e 3 > /tmp/pairs.txt
#
# Exit codes: 0 every run finished; 1 a run failed (its stderr is in the output); 2 bad usage.
set -u
BASE=${1:?usage: bench/compare.sh BASE_COMMIT [PAIRS]}
PAIRS=${2:-3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python}
WT=$(mktemp -d /tmp/bindstream-base.XXXXXX)
trap 'git -C "$HERE" worktree remove --force "$WT" >/dev/null 2>&1; rm -rf "$WT"' EXIT
git -C "$HERE" worktree add --detach -q "$WT" "$BASE" || exit 2

RATE0=(--modes pipeline --seconds 30 --json --chunk-seconds 0.5 --tolerance 0.5)
REALTIME=(--modes raw_encoder --realtime 3 --seconds 30 --json --chunk-seconds 1.0 --tolerance 0.05 --min-time 0.2)
status=0
one() {  # workload tag root args...
    local workload=$1 tag=$2 root=$3; shift 3
    local out
    if out=$(cd "$root" && PYTHONPATH="$root" "$PY" bench/pipeline.py "$@" 2>/tmp/bindstream-compare.err); then
        echo "$workload $tag $(echo "$out" | "$PY" -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))')"
    else
        echo "$workload $tag FAILED: $(tail -n 3 /tmp/bindstream-compare.err | tr '\n' ' ')"
        status=1
    fi
}
for i in $(seq "$PAIRS"); do
    one rate0 base "$WT" "${RATE0[@]}"
    one rate0 head "$HERE" "${RATE0[@]}"
    one realtime base "$WT" "${REALTIME[@]}"
    one realtime head "$HERE" "${REALTIME[@]}"
done
exit $status
