#!/usr/bin/env bash
# All GPU measurements of flexbert-bench in one call (at most BENCH_BUDGET seconds, default
# 560: run it under a limit of 590 s or more), from the repo root, with nothing installed:
# correctness checks first (the compiled flex backend's later), then what the targets need
# (base inference, the max batch at 8192, MLM training, large, torch.compile), then the
# optional phases in order of use: compiled training, bf16 RoPE, the flex checks, the max
# batch at 512, CUDA graphs, op profiles. Every phase has its own `timeout`, clamped to what
# is left of the budget (the final report keeps its share), and an optional phase runs only if
# its whole limit fits; results.json is rewritten after every row, so a phase cut short keeps
# what it measured and the next phase still runs.
#
#   OUT=bench_out bash scripts/gpu_bench.sh          # on the GPU machine
#   BENCH_CPU=1 PYTHON=.venv/bin/python bash scripts/gpu_bench.sh   # same logic, tiny, CPU
#
# Writes into $OUT six files (the device tool brings back at most eight): gpu_checks.json,
# results.json, results.txt (the table), targets.md (each target met or not), results.png
# (if matplotlib is there) and log.txt (the environment, then every phase's output).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./bench_out}"
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi  # uv sync's
if [ -z "${PYTHON:-}" ]; then  # the first of python3 / python that has torch
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
      PYTHON=$candidate; break
    fi
  done
fi
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_bench: $PY cannot import torch; set PYTHON=<a python with torch>" >&2; exit 2
fi
if [ "${BENCH_CPU:-0}" != "1" ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_bench: no CUDA GPU visible to $PY; BENCH_CPU=1 runs the same phases on the CPU" >&2
  exit 2
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}." PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/log.txt"
BENCH=("$PY" -m flexbert.bench.cli --out "$OUT" --append)

if [ "${BENCH_CPU:-0}" = "1" ]; then  # CPU dry run: every phase, tiny sizes, seconds each
  DEV=(--device cpu --tiny --num-docs 8,2 --batch-size 4,1 --repeats 1 --warmup 0)
  CHECK_SIZES=tiny; CHECK_DEV=cpu
  BASE=(); LARGE=(--sizes tiny)
  FAST=sdpa; SLOW=; CAPS=8,2; TRAIN=(--train-steps 1 --train-rows 2 --train-len 128)
  T_CHECK=120; T_BASE=120; T_BATCH=60; T_LARGE=60; T_COMPILE=120; T_TRAIN=120
  T_LEVERS=120; T_TRAIN_COMPILE=120; T_FLEX=60; T_GRAPH=0; BUDGET=${BENCH_BUDGET:-100000}
  LARGE_DOCS=(); BATCH_SECONDS=30
else
  DEV=(--device cuda --num-docs 512,32 --batch-size 256,16 --repeats 3 --warmup 1)
  CHECK_SIZES=tiny,base; CHECK_DEV=cuda
  BASE=(--sizes base); LARGE=(--sizes large)
  # max-batch caps: the search starts from a prediction (peak memory at 1 and 2 documents),
  # so a high cap costs nothing unless it is reached (an H200 may fit > 512 rows of 8192)
  FAST=varlen; SLOW=,sdpa; CAPS=16384,2048; TRAIN=(--train-steps 10 --train-rows 32 --train-len 1024)
  # required phases: 60+90+75+50+60+90 = 425 s, the report 40: ~95 s for optional ones
  T_CHECK=60; T_BASE=90; T_BATCH=75; T_LARGE=60; T_COMPILE=90; T_TRAIN=50
  T_LEVERS=80; T_TRAIN_COMPILE=90; T_FLEX=60; T_GRAPH=80; BUDGET=${BENCH_BUDGET:-560}
  LARGE_DOCS=(--num-docs 256,16); BATCH_SECONDS=25  # per model and set: then ">=N"
fi
if "$PY" -c "import flash_attn" 2>/dev/null; then FAST="$FAST,flash_attn"; fi

T_REPORT=40  # the report imports torch and transformers again: slow on a cold or busy box
phase() {  # phase NAME SECONDS CMD...: run with a time limit, log it, never stop the script
  local name=$1 limit=$2; shift 2
  # clamp to the budget left (less timeout's 10 s grace), the report's share kept; the report
  # itself always runs, for 15 s at least
  local left=$((BUDGET - SECONDS - 10))
  if [ "$name" = report ]; then
    (( left < 15 )) && left=15
  else
    left=$((left - T_REPORT))
    if (( left < 15 )); then
      echo "=== $name: skipped (${SECONDS}s used of the ${BUDGET}s budget)" | tee -a "$LOG"
      return
    fi
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOG"
}

optional() {  # optional NAME SECONDS CMD...: a phase, only if it fits in the budget left
  if (( SECONDS + $2 + T_REPORT + 10 > BUDGET )); then  # the final report keeps its share
    echo "=== $1: skipped (${SECONDS}s used; it needs $2s of the ${BUDGET}s budget)" | tee -a "$LOG"
    return
  fi
  phase "$@"
}

rm -f "$OUT/results.json" "$LOG"
{
  echo "date: $(date -u +%FT%TZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  # triton builds its launchers with a C compiler: without one every compiled row fails
  echo "C compiler: $(command -v cc || command -v gcc || command -v clang || echo none)"
  "$PY" -c "import torch, importlib.util as u; print('torch', torch.__version__,
'cuda', torch.version.cuda, 'transformers', u.find_spec('transformers') is not None,
'flash_attn (imports)', __import__('flexbert.attention.backends').attention.backends.flash_attn_available(), 'matplotlib', u.find_spec('matplotlib') is not None)"
} 2>&1 | tee -a "$LOG"

phase checks "$T_CHECK" "$PY" -m flexbert.bench.gpu_checks --out "$OUT" --sizes "$CHECK_SIZES" \
  --device "$CHECK_DEV" --part fast
phase base "$T_BASE" "${BENCH[@]}" "${DEV[@]}" "${BASE[@]}" --backends "$FAST$SLOW" \
  --models flexbert,hf-modernbert,bert --train-steps 0 --no-plot
# fixed-8192: the "2x HF's max batch" target is decided there (fixed-512's search comes later)
MAX_BATCH=("${BENCH[@]}" "${DEV[@]}" "${BASE[@]}" --backends "${FAST%%,*}" --models
  flexbert,hf-modernbert --max-batch-only --max-batch-search "$CAPS" --max-batch-seconds
  "$BATCH_SECONDS" --train-steps 0 --no-plot)
phase max_batch "$T_BATCH" "${MAX_BATCH[@]}" --workloads fixed-long
phase train "$T_TRAIN" "${BENCH[@]}" "${DEV[@]}" "${BASE[@]}" --backends "${FAST%%,*}" \
  --models flexbert,hf-modernbert,bert --workloads none "${TRAIN[@]}" --no-plot
phase large "$T_LARGE" "${BENCH[@]}" "${DEV[@]}" "${LARGE_DOCS[@]}" "${LARGE[@]}" \
  --backends "${FAST%%,*}" --models flexbert,hf-modernbert --train-steps 0 --no-plot
phase compile "$T_COMPILE" "${BENCH[@]}" "${DEV[@]}" "${BASE[@]}" --backends "${FAST%%,*}+compile" \
  --models flexbert --train-steps 0 --no-plot
# Levers one at a time: compiled MLM training (dense and sparse: four compilations of the
# layer stack's forward and backward fit the limit, eight would not), then RoPE in bf16 for
# inference (eager and compiled).
optional train_compile "$T_TRAIN_COMPILE" "${BENCH[@]}" "${DEV[@]}" "${BASE[@]}" \
  --backends "${FAST%%,*}+compile" --models flexbert \
  --workloads none "${TRAIN[@]}" --no-plot
optional levers "$T_LEVERS" "${BENCH[@]}" "${DEV[@]}" "${BASE[@]}" \
  --backends "${FAST%%,*}+bf16rope,${FAST%%,*}+compile+bf16rope" --models flexbert \
  --workloads fixed-short,var-short,fixed-long --train-steps 0 --no-plot
# FlexAttention against eager (it compiles: slow on a fresh machine), added to gpu_checks.json
optional checks_flex "$T_FLEX" "$PY" -m flexbert.bench.gpu_checks --out "$OUT" --sizes tiny \
  --device "$CHECK_DEV" --part slow
optional max_batch_short 45 "${MAX_BATCH[@]}" --workloads fixed-short
# CUDA graphs (GPU only: each batch shape's forward captured once, then replayed).
if [ "$CHECK_DEV" = cuda ]; then
  optional cudagraph "$T_GRAPH" "${BENCH[@]}" "${DEV[@]}" "${BASE[@]}" \
    --backends "${FAST%%,*}+cudagraph,${FAST%%,*}+compile+cudagraph" --models flexbert \
    --workloads fixed-short,var-short,fixed-long --train-steps 0 --no-plot
else
  echo "=== cudagraph: skipped (CUDA graphs need a GPU)" | tee -a "$LOG"
fi
# Where the time goes (GPU only): top CUDA ops of FlexBERT and HF, inference then training.
if [ "$CHECK_DEV" = cuda ]; then
  optional profile_infer 45 "$PY" -m flexbert.bench.profiling --device cuda --size base \
    --backend "${FAST%%,*}" --workload fixed-short --num-docs 128 --batch-size 128 --rows 20
  optional profile_train 45 "$PY" -m flexbert.bench.profiling --device cuda --size base \
    --backend "${FAST%%,*}" --train --train-rows 32 --train-len 1024 --rows 20
fi
# The table, ratios and plot over every phase's rows (no model is built here).
phase report "$T_REPORT" "${BENCH[@]}" "${DEV[@]}" --models none --workloads none --train-steps 0
