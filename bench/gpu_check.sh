#!/usr/bin/env bash
# One call on a lent GPU (device tool): every CUDA test and every benchmark, in about 7 minutes.
#   run: bash bench/gpu_check.sh        (writes under $OUT, or bench/results/gpu_run without it)
# What comes back from $OUT is limited to 8 files, so everything lands in one log, one tarball of
# CSVs + PNGs, and the card's description. The device image has torch/triton/transformers but
# neither DeepSpeed nor flash-attn; fastcse installs without dependencies on top of it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
exec > >(tee "$LOG") 2>&1

step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT/card.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
GPU_CSV_DIR=bench/results
rm -f "$GPU_CSV_DIR"/gpu_*.csv

step "CUDA tests (pytest -m cuda)"
timeout 150 python -m pytest -q -m cuda tests -x -p no:cacheprovider

step "InfoNCE: ceilings + sweep, bf16, D=768, M=2N"
timeout 150 python -m bench.bench_infonce --device cuda --dtype bf16 --dims 768 --ceilings \
    --ns 1024,4096,8192,16384,32768 --modes fwd,full --providers eager,chunked,triton --reps 10 \
    --csv gpu_infonce.csv
step "InfoNCE: N = 65536 and 262144 (eager is expected to run out of memory)"
timeout 90 python -m bench.bench_infonce --device cuda --dtype bf16 --dims 768 --ns 65536,262144 \
    --modes full --providers eager,triton --reps 3 --csv gpu_infonce.csv
python -m bench.bench_infonce --plot --csv gpu_infonce.csv

# Other ops' benchmarks append their own steps below (each with its own timeout).
if [ -f bench/bench_rope.py ]; then
  step "RoPE: bf16 (8, 4096, 32, 128) q and k"
  timeout 60 python -m bench.bench_rope --device cuda --csv gpu_rope.csv
fi
if [ -f bench/bench_encoder.py ]; then
  step "Encoders: BERT-base / DeBERTa-v3-base / T5-base shapes"
  timeout 120 python -m bench.bench_encoder --device cuda --csv gpu_encoder.csv
fi

step "pack results"
tar czf "$OUT/results.tgz" bench/results/gpu_*.csv bench/results/*.png 2>/dev/null
ls -la "$OUT"
