# Sourced by the device scripts (run_gpu_suite.sh, run_gpu_large.sh) after they set NAME (the files' stem) and
# TITLE: the checkout on PYTHONPATH (nothing installed), $OUT, the commit, --smoke (the gpu tests on the CPU:
# GEFFECT_BENCH_GPU_SMOKE=1), `part`, which runs one bounded step and records its exit code and time in $PARTS, and
# `bench_part`, a part that runs gpu-marked pytest-benchmark tests and saves their JSON as $OUT/${NAME}_<part>.json.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SMOKE=""
[[ "${1:-}" == "--smoke" ]] && SMOKE="--smoke"
OUT=${OUT:-$(mktemp -d -t "geffect-$NAME.XXXXXX")}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export GEFFECT_COMMIT=${GEFFECT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
[[ -n "$SMOKE" ]] && export GEFFECT_BENCH_GPU_SMOKE=1
PY=$(command -v python3 || command -v python)
PARTS="$OUT/${NAME}_parts.csv"
LOG="$OUT/$NAME.log"
[[ -s "$PARTS" ]] || echo "part,exit,seconds,limit,commit" >"$PARTS"
echo "$TITLE: commit $GEFFECT_COMMIT, out $OUT${SMOKE:+ (smoke)}" | tee -a "$LOG"

part() {  # name, limit in seconds, command...: bounded, logged, its exit code and time recorded
  local name=$1 limit=$2 start rc
  shift 2
  [[ -n "$SMOKE" ]] && limit=$((3 * limit))  # a shared CI core starts python and torch slower than the GPU machine
  start=$(date +%s)
  echo "== $name (limit ${limit}s)" | tee -a "$LOG"
  timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  echo "$name,$rc,$(($(date +%s) - start)),$limit,$GEFFECT_COMMIT" >>"$PARTS"
  echo "== $name: exit $rc in $(($(date +%s) - start))s" | tee -a "$LOG"
}

bench_part() {  # name, limit in seconds, pytest arguments (files, -k ...): the gpu tests, timed, JSON saved
  local name=$1 limit=$2
  shift 2
  part "$name" "$limit" "$PY" -m pytest -q -rfEs -p no:cacheprovider -m gpu --benchmark-columns=median,iqr,rounds \
    --benchmark-json "$OUT/${NAME}_$name.json" "$@"
}

summary() {  # the ratio table of every saved JSON and the failed tests, bounded, printed last and kept
  { timeout 20 "$PY" benchmarks/ratios.py "$OUT/${NAME}"_*.json
    echo; cat "$PARTS"; { grep -h -E "^(FAILED|ERROR) " "$LOG" || true; } | cut -c1-300 | head -40
  } | tee "$OUT/${NAME}_table.txt"
}
