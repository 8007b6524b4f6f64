#!/usr/bin/env bash
# The GPU check of issue 5 as one command, for a lent GPU machine (the `device` tool's `run`):
# towers alone (bench/encoder.py) and, with imagebind_huge, the raw_encoder ceiling, the naive
# floor (fp32, batch 1) and single_process (bench/pipeline.py). Sized to end in about 8 minutes
# on an H100/H200; results in $OUT (./gpu_check_out when unset). Record them in bench/RESULTS.md
# with the device named.
#
# That machine has torch, numpy, msgpack, pyyaml, regex, safetensors and psutil, not PyAV,
# pyzmq, ftfy (with wcwidth) or open_clip_torch (the tokenizer's vocabulary file), and it
# reaches no package index. Fetch their wheels here once, into the git-ignored .whl/ (about
# 38 MB together; a call carries at most 64 MiB):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl av pyzmq ftfy wcwidth open_clip_torch
# then run `bash bench/gpu_check.sh` there with carry [".whl"].
#
# Not in this check: the `pipeline` mode (the Ray graph). Ray's wheel (79 MB for 2.60) does not
# fit one call's carry, and the other modes do not need Ray.
#
# BENCH_DEVICE / BENCH_MODEL / BENCH_PRECISION / BENCH_SECONDS override the defaults (cuda,
# imagebind_huge, bf16, 8), e.g. to try the script on a CPU with imagebind_tiny.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
DEVICE=${BENCH_DEVICE:-cuda}
MODEL=${BENCH_MODEL:-imagebind_huge}
PRECISION=${BENCH_PRECISION:-bf16}
SECONDS_PER_SESSION=${BENCH_SECONDS:-8}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

{
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    fi
    "$PY" -c "import torch, av, zmq; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'av', av.__version__, 'pyzmq', zmq.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

status=0
# 1. The towers alone: items/s per batch size.
timeout 200 "$PY" bench/encoder.py --model "$MODEL" --device "$DEVICE" --precision "$PRECISION" --batch 1 8 32 64 \
    --json > "$OUT/encoder.json" 2> "$OUT/encoder.err" || { echo "bench/encoder.py failed ($?)"; status=1; }
# 2. The ceiling, the floor and the single process, on the same synthetic 720p30 sessions.
timeout 300 "$PY" bench/pipeline.py --model "$MODEL" --device "$DEVICE" --precision "$PRECISION" --max-batch 64 \
    --sessions 2 --seconds "$SECONDS_PER_SESSION" --modes raw_encoder naive single_process --cache "$OUT/.sessions" \
    --json > "$OUT/pipeline.json" 2> "$OUT/pipeline.err" || { echo "bench/pipeline.py failed ($?)"; status=1; }
rm -rf "$OUT/.sessions"
tail -n 3 "$OUT/encoder.err" "$OUT/pipeline.err"
exit $status
