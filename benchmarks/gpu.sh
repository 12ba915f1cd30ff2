#!/usr/bin/env bash
# Trials per hour on one GPU over K = 1..512, in under ten minutes: the service's worker with
# --batch-trials K against the authors-style optimize() loop, the same trials for every K.
# Writes the raw JSON to $OUT (default benchmarks/results). Needs the data under $TAUOPT_DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
python3 -m pip install -q -e . torchvision >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
timeout 560 python3 benchmarks/trials_per_hour.py --device cuda --data-dir "${TAUOPT_DATA:-data}" \
    --k 1 16 64 256 512 --trials 512 --baseline-trials 4 --repeats 1 --same-trials \
    --json "$out/trials_per_hour_gpu_$(date +%F).json"
