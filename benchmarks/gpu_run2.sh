#!/usr/bin/env bash
# Second GPU pass: where the time goes (writer vs device vs decode) for ViT-L/14-336.
set -u
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/clipfeat-gpu-out}; mkdir -p "$OUT"
N=${1:-4000}
python3 benchmarks/bench_write.py --rows 1024 2>&1 | tee "$OUT/write.txt"
python3 benchmarks/bench_extract.py --tower vitl336 --images "$N" --device cuda --batch-size 128 \
  --skip-naive --json "$OUT/bench2.json" 2>&1 | tee "$OUT/bench2.txt"
