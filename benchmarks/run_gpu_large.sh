#!/usr/bin/env bash
# Large models on the lent GPU (issues 13.6, 14.2): the second device call, after run_gpu_suite.sh, in the minutes
# left (every part under its own timeout; the limits sum to 240 s). Nothing installed; rows appended as measured.
#
#   GEFFECT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/run_gpu_large.sh   # on the lent GPU machine
#   bash benchmarks/run_gpu_large.sh --smoke        # CPU: the same plumbing, the tiny shape (CI)
#
# - geffect: the profiler vs a training step vs materialized gradients, 1.1B and 6.7B Llama shapes, 4 sequences
#   of 128 and 512 tokens per side (512 and 2048 tokens), bf16; first the bf16-vs-float32 check on 4 layers;
# - fsdp: one step of FSDP2 on one rank (NCCL, bf16 compute) next to the single-process step, 1.1B shape.
# $OUT/gpu_large.csv has the rows (same columns as gpu_suite.csv), $OUT/gpu_large_parts.csv each part's exit code
# and time; the table closes the output. A real GPU run's CSVs belong under benchmarks/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=""
[[ "${1:-}" == "--smoke" ]] && SMOKE="--smoke"
OUT=${OUT:-$(mktemp -d -t geffect-gpu-large.XXXXXX)}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export GEFFECT_COMMIT=${GEFFECT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
PY=$(command -v python3 || command -v python)
CSV="$OUT/gpu_large.csv"
PARTS="$OUT/gpu_large_parts.csv"
LOG="$OUT/large.log"
[[ -s "$PARTS" ]] || echo "part,exit,seconds,limit,commit" >"$PARTS"
echo "geffect large-model GPU runs: commit $GEFFECT_COMMIT, out $OUT${SMOKE:+ (smoke)}" | tee -a "$LOG"

part() {  # name, limit in seconds, command...: bounded, logged, its exit code and time recorded
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "$name,$rc,$(($(date +%s) - start)),$limit,$GEFFECT_COMMIT" >>"$PARTS"
  echo "== $name: exit $rc in $(($(date +%s) - start))s" | tee -a "$LOG"
}

TOKENS=128,512 FSDP_TOKENS=512 REPEATS=2
[[ -n "$SMOKE" ]] && TOKENS=8 FSDP_TOKENS=8 REPEATS=1
part geffect 170 "$PY" benchmarks/geffect_gpu.py --csv "$CSV" --shapes 1.1b,6.7b --tokens "$TOKENS" \
  --repeats "$REPEATS" --check $SMOKE
part fsdp 70 "$PY" benchmarks/fsdp_gpu.py --csv "$CSV" --shape 1.1b --tokens "$FSDP_TOKENS" --repeats "$REPEATS" $SMOKE
timeout 10 "$PY" benchmarks/gpu_suite.py table --csv "$CSV" --parts "$PARTS" | tee "$OUT/gpu_large_table.txt"
