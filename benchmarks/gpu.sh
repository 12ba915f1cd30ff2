#!/usr/bin/env bash
# Trials per hour on one GPU over K = 1..512, in under ten minutes: the service's worker with
# --batch-trials K (at least K trials each) against the authors-style optimize() loop, every
# variant on trials drawn once at random. Raw JSON to $OUT (default benchmarks/results); the
# data under $TAUOPT_DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
day=$(date +%F)
mkdir -p "$out"
python3 -m pip install -q -e . torchvision >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu_$day.txt"
run() {  # K, trials, baseline trials
    timeout 170 python3 benchmarks/trials_per_hour.py --device cuda \
        --data-dir "${TAUOPT_DATA:-data}" --k "$1" --trials "$2" --baseline-trials "$3" \
        --repeats 1 --same-trials --json "$out/trials_per_hour_gpu_${day}_k$1.json"
}
run 1 32 4
run 16 32 0
run 64 64 0
run 256 256 0
run 512 512 0
