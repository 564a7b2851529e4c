#!/usr/bin/env bash
# The GPU check, one prepared script for a lent CUDA machine, run from the repo root with
# nothing installed (the machine's own torch/transformers/h5py/typer/tqdm, through
# PYTHONPATH; Pillow resizes, as the optional C resize is not built there):
#   OUT=$OUT bash benchmarks/gpu_run.sh [IMAGES]
# Prints, for ViT-L/14-336 at batch 128: writer-only (bench_write: raw disk, ShardWriter,
# bare h5py, and a 1 ms ticker's lateness), model-only, decode-only and end-to-end img/s
# with the stage timings (bench_extract), after a bit-exactness check against LLaVA's path.
# Then several outputs in one pass (bench_outputs: two towers in one run vs two runs).
# Disk: the machine holds about 58,000 images of ViT-L output; the default 4,000 images
# (4.7 GB of shards, written once per run) and 1,024 writer rows (1.2 GB) fit many times.
set -u
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
OUT=${OUT:-/tmp/clipfeat-gpu-out}; mkdir -p "$OUT"
N=${1:-4000}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "cpus: $(nproc)"
  df -h /tmp | tail -1
  python3 -c "import torch,transformers,PIL,h5py,typer,numpy; print('torch', torch.__version__, 'transformers', transformers.__version__, 'pillow', PIL.__version__, 'h5py', h5py.__version__, 'hdf5', h5py.version.hdf5_version, 'typer', typer.__version__, 'numpy', numpy.__version__)"
} 2>&1 | tee "$OUT/env.txt"
python3 benchmarks/gpu_exactness.py --images 48 --batch-size 16 2>&1 | grep -v Warning | tee "$OUT/exact.txt"
python3 benchmarks/bench_write.py --rows 1024 --rounds 3 --dir /tmp 2>&1 | tee "$OUT/write.txt"
python3 benchmarks/bench_write.py --rows 1024 --rounds 3 --dir /tmp --busy 16 2>&1 | tee "$OUT/write-busy.txt"
python3 benchmarks/bench_extract.py --tower vitl336 --images "$N" --device cuda --batch-size 128 \
  --skip-naive --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.txt"
# Several outputs in one pass (issue 15): two tiny towers in one run vs one run each, where
# the forward is on the GPU and only decoding and resizing are on the CPU.
python3 benchmarks/bench_outputs.py --images 2000 --rounds 2 --only same --only mixed \
  2>&1 | grep -v "Writing model" | tee "$OUT/outputs.txt"
