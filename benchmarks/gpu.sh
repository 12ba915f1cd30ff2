#!/usr/bin/env bash
# Trials per hour on one GPU over K = 1..512, in under ten minutes: the service's worker with
# --batch-trials K (at least K trials each) against the authors-style optimize() loop, every
# variant on trials drawn once at random; and K = 256 with bfloat16 products. Every step has its
# own time limit, together under ten minutes. Raw JSON to $OUT (default benchmarks/results), named
# trials_per_hour_<gpu>_<date>_k<K>_<precision>.json (<gpu>: h100, h200, ...); the data under
# $TAUOPT_DATA.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results}
day=$(date +%F)
mkdir -p "$out"
python3 -m pip install -q -e . torchvision >/dev/null
# "NVIDIA H200" -> h200, as benchmarks/_machine.py names a GPU
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/NVIDIA //' \
    | awk '{print tolower($1)}')
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu_${gpu}_$day.txt"
run() {  # seconds, K, trials, baseline trials, precision
    timeout "$1" python3 benchmarks/trials_per_hour.py --device cuda \
        --data-dir "${TAUOPT_DATA:-data}" --k "$2" --trials "$3" --baseline-trials "$4" \
        --precision "$5" --repeats 1 --same-trials \
        --json "$out/trials_per_hour_${gpu}_${day}_k$2_$5.json" || echo "K=$2 $5: stopped ($?)"
}
run 120 1 32 4 float32
run 90 16 32 0 float32
run 90 64 64 0 float32
run 100 256 256 0 float32
run 100 512 512 0 float32
run 80 256 256 0 bfloat16
