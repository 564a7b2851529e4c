#!/usr/bin/env bash
# The GPU check, run on a lent CUDA machine from the repo root (nothing installed: the
# machine's own torch/transformers/h5py/typer/tqdm are used through PYTHONPATH).
#   bash benchmarks/gpu_run.sh [IMAGES]
set -u
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/clipfeat-gpu-out}; mkdir -p "$OUT"
N=${1:-3000}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "cpus: $(nproc)"
  python3 -c "import torch,transformers,PIL,h5py,typer,numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'pillow', PIL.__version__, 'h5py', h5py.__version__, 'typer', typer.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/env.txt"
python3 benchmarks/gpu_exactness.py --images 48 --batch-size 16 2>&1 | grep -v Warning | tee "$OUT/exact.txt"
python3 benchmarks/bench_extract.py --tower vitl336 --images "$N" --device cuda --batch-size 128 \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
