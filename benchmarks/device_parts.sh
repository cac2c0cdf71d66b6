# Sourced by the device scripts (run_gpu_suite.sh, run_gpu_large.sh) after they set NAME (the files' stem) and
# TITLE: the checkout on PYTHONPATH (nothing installed), $OUT, the commit, --smoke, and `part`, which runs one
# bounded step and records its exit code and time in $PARTS.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SMOKE=""
[[ "${1:-}" == "--smoke" ]] && SMOKE="--smoke"
OUT=${OUT:-$(mktemp -d -t "geffect-$NAME.XXXXXX")}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export GEFFECT_COMMIT=${GEFFECT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
PY=$(command -v python3 || command -v python)
CSV="$OUT/$NAME.csv"
PARTS="$OUT/${NAME}_parts.csv"
LOG="$OUT/$NAME.log"
[[ -s "$PARTS" ]] || echo "part,exit,seconds,limit,commit" >"$PARTS"
echo "$TITLE: commit $GEFFECT_COMMIT, out $OUT${SMOKE:+ (smoke)}" | tee -a "$LOG"

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
