#!/usr/bin/env bash
# One call on a lent GPU (device tool): every CUDA test and every benchmark in about 7 minutes.
#   device run:  bash bench/gpu_check.sh          (timeout_s=480; results under $OUT)
#   locally:     bash bench/gpu_check.sh          (results under bench/results/gpu_run)
# The device tool returns at most 8 files from $OUT, so everything lands in one log, the card's
# description and one tarball of CSVs + PNGs. The device image has torch, triton, transformers and
# sentence-transformers but neither DeepSpeed nor flash-attn; fastcse installs without
# dependencies on top of it. Step timeouts add up to about 7 minutes: a step that runs long is cut,
# and every benchmark appends its rows as it goes, so what finished is kept.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_run}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1

step() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv | tee "$OUT/card.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
rm -f bench/results/gpu_*.csv bench/results/gpu_*.png

step "CUDA tests: every cuda-marked test, and the kernel test files on CUDA tensors"
timeout 110 python -m pytest -q -p no:cacheprovider -m cuda tests
timeout 70 python -m pytest -q -p no:cacheprovider tests/test_infonce.py tests/test_rope.py

step "InfoNCE: ceilings, then N swept, bf16, D=768, M=2N"
timeout 100 python -m bench.bench_infonce --device cuda --dtype bf16 --dims 768 --ceilings \
    --ns 1024,4096,8192,16384,32768 --modes fwd,full --providers eager,chunked,triton --reps 10 \
    --csv gpu_infonce.csv
step "InfoNCE: N = 65536 and 262144 (eager is expected to run out of memory at 262144)"
timeout 60 python -m bench.bench_infonce --device cuda --dtype bf16 --dims 768 --ns 65536,262144 \
    --modes full --providers eager,triton --reps 3 --csv gpu_infonce.csv
python -m bench.bench_infonce --plot --csv gpu_infonce.csv

step "RoPE: bf16 (8, 4096, 32, 128), q and k"
timeout 40 python -m bench.bench_rope --device cuda --quick --csv gpu_rope.csv

step "Biased attention: DeBERTa-v3-base / T5-base attention module, bf16, batch 8"
timeout 70 python -m bench.bench_biased_attention --device cuda --dtype bf16 --batch 8 \
    --seqs 128,512 --modes fwd,full --providers eager,biased --reps 10 --csv gpu_biased_attention.csv

step "Encoders: BERT-base / DeBERTa-v3-base / T5-base shapes, wiki lengths and 512"
timeout 90 python -m bench.bench_encoder --device cuda --csv gpu_encoder.csv

step "pack results"
tar czf "$OUT/results.tgz" bench/results/gpu_*.csv bench/results/*.png 2>/dev/null
ls -la "$OUT"
