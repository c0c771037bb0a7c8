#!/usr/bin/env bash
# One call on a lent GPU (the device tool): the card's ceilings, every bar of issue #17, whole
# training steps (issue #12), the CUDA tests of every kernel file and of gradient caching, then a table of bars (model prediction, measurement, target,
# PASS/FAIL) as the last lines of the output.
#
#   device run:  bash bench/gpu_check.sh              (timeout_s=540; results under $OUT)
#   locally:     bash bench/gpu_check.sh              (results under bench/results/gpu_run)
#   CPU rehearsal: bash bench/gpu_check.sh --dry-run  (the same steps, tiny sizes, Triton's
#                interpreter, pytest --collect-only; OUT defaults to a fresh temp folder; ~2 min)
#   the plan:    bash bench/gpu_check.sh --plan       (each step's real timeout and their sum)
#
# Time: every step runs under `timeout -s INT -k 10 T` (SIGINT, so a cut pytest or benchmark still
# prints its summary; SIGKILL 10 s later if it does not stop). The real timeouts add up to at most
# 450 s (tests/test_gpu_check.py checks it from --plan); with every step cut and killed the worst
# case is 450 s + 10 s per step, inside the device tool's 600 s. Steps are ordered so the bars come
# first and the tests after them; the report reads whatever the cut steps left.
#
# What comes back from $OUT (the device tool returns at most 8 files, at most 2 folders deep; all
# of these lie flat in $OUT):
#   gpu_check.log          everything printed (pip, nvidia-smi, each step, pytest output)
#   ceilings.json          the card file of bench/perf_model.py --card FILE, written first:
#                          {"name": str, "matmul_tflops": {"bf16": f, "fp16": f, "fp32": f},
#                           "copy_gbps": f, "launch_us": f, "kernel_us": f, "sm_count": int,
#                           "memory_gb": f, "gpu": bool, ...provenance}
#                          matmul: random 8192^3 operands (fp32 without TF32); copy: 1 GiB
#                          device-to-device, bytes read + written; launch_us: host time per tiny
#                          op; kernel_us: device time per tiny kernel (bench/_common.py:measure_card)
#   infonce.csv rope.csv biased_attention.csv encoder.csv train.csv
#                          benchmark rows, appended and flushed as each point is measured
#   report.json            the bars table (bench/gpu_report.py; its "text" is the table printed
#                          last in gpu_check.log) and its data
#
# The device image has torch 2.11, triton 3.6, transformers 5.17, sentence-transformers 6.0.1 and
# `python3` only (no `python`), no DeepSpeed, no flash-attn and no network: fastcse is installed
# with `pip install --no-deps --no-build-isolation --no-index -e .` (the image's setuptools); if
# that fails, PYTHONPATH gets the checkout plus a sitecustomize.py that maps fastcse.kernels.
# The peer of the DeBERTa kernel (issue #11: disentangled-flash, pure Python + Triton) runs in the
# encoder_biased step when it imports there: download its wheel into the ignored .whl/ folder here
# (`python3 -m pip download --no-deps -d .whl disentangled-flash==1.1.1`), name .whl in the call's
# carry, and begin the command with the device README's `pip install ... --target /tmp/site
# .whl/*.whl && export PYTHONPATH=/tmp/site`; without it the step skips that provider and says so.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

MODE=real
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --plan) MODE=plan ;;
  "") ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run | --plan]" >&2; exit 2 ;;
esac

if [[ $MODE == dry ]]; then
  OUT=${OUT:-$(mktemp -d /tmp/gpu_check_dry.XXXXXX)}
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
else
  OUT=${OUT:-bench/results/gpu_run}
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

# A Python started with SIGINT ignored (a background job of a non-interactive shell) never raises
# KeyboardInterrupt; `env --default-signal=INT` (coreutils >= 8.31) restores the default first.
RESET_INT=()
env --default-signal=INT true 2>/dev/null && RESET_INT=(env --default-signal=INT)

PLAN_TOTAL=0
N_STEPS=0
STATUS=()
FAILED=0

# run_step NAME REAL_TIMEOUT DRY_TIMEOUT COMMAND...: one step under its timeout (the dry timeout
# in --dry-run: generous, it only catches hangs; a loaded 2-core machine runs the dry run 3-4x
# slower); in --plan only its real timeout is listed.
run_step() {
  local name=$1 t_real=$2 t_dry=$3
  shift 3
  PLAN_TOTAL=$((PLAN_TOTAL + t_real))
  N_STEPS=$((N_STEPS + 1))
  if [[ $MODE == plan ]]; then
    printf 'step %-22s %4d s\n' "$name" "$t_real"
    return 0
  fi
  local t=$t_real
  [[ $MODE == dry ]] && t=$t_dry
  echo
  echo "=== $name (timeout ${t} s, $(date -u +%H:%M:%S))"
  local start=$SECONDS
  timeout -s INT -k 10 "$t" "${RESET_INT[@]}" "$@"
  local rc=$?
  local took=$((SECONDS - start))
  case $rc in
    0) ;;
    124|137) echo "=== $name: cut at its ${t} s timeout (rc $rc)"; FAILED=1 ;;
    *) echo "=== $name: failed (rc $rc)"; FAILED=1 ;;
  esac
  # the report's table stays the last thing printed
  [[ $name == report && $rc == 0 ]] || echo "=== $name: ${took} s"
  STATUS+=("$name rc=$rc ${took}s")
}

# fastcse.kernels maps to kernels/ (pyproject's package-dir), so PYTHONPATH=<repo> alone lacks it
# (and the repository's own fastcse/ shadows anything else on the path whenever the working folder
# is the repository, as for `python3 -m` and pytest). Without an install, a sitecustomize.py on
# PYTHONPATH maps fastcse.kernels to kernels/ as the editable install's finder does; prints the
# folder to put first on PYTHONPATH.
kernels_finder() {
  local root=/tmp/fastcse_path
  mkdir -p "$root"
  cat > "$root/sitecustomize.py" <<PY
import importlib.abc, importlib.util, os, sys

_KERNELS = os.path.join("$REPO", "kernels")


class _FastcseKernels(importlib.abc.MetaPathFinder):
    """fastcse.kernels -> kernels/ of the checkout (its submodules follow through __path__)."""

    def find_spec(self, name, path=None, target=None):
        if name != "fastcse.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, os.path.join(_KERNELS, "__init__.py"), submodule_search_locations=[_KERNELS])


sys.meta_path.insert(0, _FastcseKernels())
PY
  echo "$root"
}

install_fastcse() {
  echo "python3: $(command -v python3)"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null \
    || echo "nvidia-smi: none"
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  if [[ $MODE == dry ]]; then
    # the local environment is not ours to change: resolve and build the editable install, offline
    python3 -m pip install --dry-run --no-deps --no-build-isolation --no-index -q -e .
  else
    python3 -m pip install --no-deps --no-build-isolation --no-index -q -e .
  fi
}

imports_ok() {
  python3 -c "import fastcse.kernels.rope, fastcse.rotary, bench._common" 2>/dev/null
}

# --- the steps -------------------------------------------------------------------------------------
# Sizes per mode. Real: the bars' shapes (bf16 on the card). Dry: tiny shapes on CPU.
if [[ $MODE == dry ]]; then
  DEV=cpu
  ROPE=(--device cpu --providers eager triton --modes full --sweep seqlen --seqlens 16 --batch 1 --heads 2
        --head-dim 32 --dtype fp32 --reps 2)
  LOSS=(--device cpu --dims 16 --ns 32,64 --providers eager,chunked,triton --modes fwd,full --reps 2)
  LOSS_BIG=(--device cpu --dims 16 --ns 128 --providers triton --modes full --reps 1)
  BERT=(--device cpu --quick --reps 2)
  BIASED_ENC=(--device cpu --quick --reps 1)
  ATTN=(--device cpu --quick --seqs 16 --batch 1 --reps 1 --modes full)
  TRAIN=(--device cpu --quick --shapes unsup --paths eager fused st --warmup 0 --steps 1 --gate)
  PYTEST_MODE=(--collect-only -q)  # with -q: one line per file
  REPORT=(--perf-timeout 40 --rehearse-gpu)
else
  DEV=cuda
  ROPE=(--device cuda --quick --modes fwd bwd full --timing graph,sync --reps 20)
  LOSS=(--device cuda --dtype bf16 --dims 768 --ns 1024,2048,4096,8192,16384,32768,65536
        --providers eager,triton --modes full,fwd --reps 10)
  LOSS_BIG=(--device cuda --dtype bf16 --dims 768 --ns 262144 --providers triton --modes full --reps 3)
  BERT=(--device cuda --reps 10)
  BIASED_ENC=(--device cuda --long-batch 8 --reps 10)
  ATTN=(--device cuda --dtype bf16 --batch 8 --seqs 512,128 --reps 10 --modes full,fwd)
  # issue #12's GPU bars: BERT-base shape, bf16, unsupervised SimCSE at 64 and 512 wiki sentences
  # (no quality gate here: its three training runs do not fit the window; run it on its own)
  TRAIN=(--device cuda --models bert-base --shapes unsup --batch 64 512 --paths eager sdpa fused st
         --warmup 2 --steps 10 --gate --no-predict)  # the report predicts the bars
  PYTEST_MODE=(--durations=8)
  REPORT=(--perf-timeout 12)  # the committed predictions of the card are read; the model runs only for a card without any
fi

if [[ $MODE != plan ]]; then
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
  TEE_PID=$!
  echo "gpu_check.sh $MODE: OUT=$OUT, repo $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%FT%TZ)"
fi

export -f install_fastcse
export MODE
run_step install 20 90 bash -c install_fastcse
if [[ $MODE != plan ]] && ! imports_ok; then
  echo "fastcse does not import after the install step: mapping fastcse.kernels through PYTHONPATH"
  export PYTHONPATH="$(kernels_finder):$REPO${PYTHONPATH:+:$PYTHONPATH}"
  imports_ok || echo "fastcse still does not import: the steps below will fail"
fi

# bars first: the card's ceilings (the model's input), rotary, the loss, encoders, attention
run_step ceilings 20 90 python3 -m bench.gpu_report ceilings --device "$DEV" --out "$OUT/ceilings.json"
run_step rope 30 90 python3 -m bench.bench_rope "${ROPE[@]}" --csv "$OUT/rope.csv"
run_step infonce 65 90 python3 -m bench.bench_infonce "${LOSS[@]}" --csv "$OUT/infonce.csv"
run_step infonce_262144 30 90 python3 -m bench.bench_infonce "${LOSS_BIG[@]}" --csv "$OUT/infonce.csv"
run_step encoder_bert 30 90 python3 -m bench.bench_encoder "${BERT[@]}" --models bert --workloads wiki32 \
  --backends eager sdpa varlen --varlen-kernels auto aten_flash --csv "$OUT/encoder.csv"
run_step encoder_biased 30 90 python3 -m bench.bench_encoder "${BIASED_ENC[@]}" --models deberta-v3 t5 \
  --workloads long512 --backends eager biased disentangled-flash --csv "$OUT/encoder.csv"
run_step attention 25 90 python3 -m bench.bench_biased_attention "${ATTN[@]}" --providers eager,biased \
  --csv "$OUT/biased_attention.csv"
run_step train 40 120 python3 -m bench.bench_train "${TRAIN[@]}" --csv "$OUT/train.csv"

# the CUDA tests: whole files (bf16 loss paths, dropout replay, HF parity), not only -m cuda
PYTEST=(python3 -m pytest -q -p no:cacheprovider -rfEs "${PYTEST_MODE[@]}")
# (plus the check that the queued timing of the rotary bars hides host work on this card)
run_step tests_loss_rope 40 90 "${PYTEST[@]}" tests/test_infonce.py tests/test_rope.py \
  tests/test_gpu_check.py::test_queued_timing_hides_host_work_on_cuda
run_step tests_biased 40 90 "${PYTEST[@]}" tests/test_biased_attention.py tests/test_biased_models.py
run_step tests_encoders 40 90 "${PYTEST[@]}" tests/test_rope_models.py tests/test_encoder.py tests/test_encoder_varlen.py \
  tests/test_packed_attention.py tests/test_short_attention.py tests/test_dropout_add_norm.py
# gradient caching's CUDA replay (the CUDA generator's state, SDPA and the biased kernel's Philox seed)
run_step tests_grad_cache 20 90 "${PYTEST[@]}" -m cuda tests/test_grad_cache.py

if [[ $MODE == plan ]]; then
  run_step report 20 90 true
  echo "total $PLAN_TOTAL s in $N_STEPS steps (worst case, every step cut and killed: $((PLAN_TOTAL + 10 * N_STEPS)) s)"
  exit 0
fi

# last: the table (its own timeout; the predictions are those committed for the card in
# bench/results/perf_model.csv, written before the run; the model runs on ceilings.json only for a card without any)
run_step report 20 90 python3 -m bench.gpu_report table --dir "$OUT" "${REPORT[@]}" --steps "${STATUS[@]}"
# gpu_report printed the table last; close our side of the log pipe and let tee finish writing
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null
exit $FAILED
