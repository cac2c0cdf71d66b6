#!/usr/bin/env bash
# The GPU suite in one bounded device call (issue 10): correctness first, then speed; nothing installed.
#
#   GEFFECT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/run_gpu_suite.sh   # on the lent GPU machine
#   bash benchmarks/run_gpu_suite.sh --smoke        # CPU: the same plumbing, Triton interpreter, tiny shapes (CI)
#
# The package is imported from this checkout (PYTHONPATH), with whatever torch / triton / transformers / nvcc the
# machine carries. Liger and CCE are timed only when importable; wheels for them may travel in .whl/ (installed
# with --no-index into a temporary folder, never from a network). Every part runs under its own `timeout`; the
# limits sum to at most 470 s of the 8 minutes a device call is given. Each measurement is appended to
# $OUT/gpu_suite.csv as soon as it is taken (with the machine, the GPU and the commit), each failing case is
# a row of its own, $OUT/gpu_parts.csv has every part's exit code and time, and the compact table
# (≤ 12,000 characters) is printed last and kept in $OUT/gpu_table.txt. A real GPU run's CSVs belong under
# benchmarks/results/ (copy them there from $OUT); a smoke run writes under $OUT only (default: a temp dir).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=""
[[ "${1:-}" == "--smoke" ]] && SMOKE="--smoke"
OUT=${OUT:-$(mktemp -d -t geffect-gpu-suite.XXXXXX)}
mkdir -p "$OUT"
export OUT PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export GEFFECT_COMMIT=${GEFFECT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
[[ -n "$SMOKE" ]] && export TRITON_INTERPRET=1
PY=$(command -v python3 || command -v python)
CSV="$OUT/gpu_suite.csv"
PARTS="$OUT/gpu_parts.csv"
LOG="$OUT/suite.log"
[[ -s "$PARTS" ]] || echo "part,exit,seconds,limit,commit" >"$PARTS"
echo "geffect GPU suite: commit $GEFFECT_COMMIT, out $OUT${SMOKE:+ (smoke)}" | tee -a "$LOG"
[[ -z "$SMOKE" ]] && { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"; }

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

if compgen -G ".whl/*.whl" >/dev/null; then  # optional comparison packages carried as wheels
  part wheels 20 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$OUT/site" .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$OUT/site"
fi
if [[ -n "$SMOKE" ]]; then  # the extension build takes minutes on a CI core: only check that its spec resolves
  part build 30 "$PY" -c "from geffect_kernels.backends.cpp import build; print(build.extension_spec('cpu')['name'])"
else
  part build 90 "$PY" -c "import geffect_kernels.csrc as c; c.build_extensions()"
fi
part correctness 150 "$PY" benchmarks/gpu_suite.py correctness --csv "$CSV" $SMOKE
part speed 140 "$PY" benchmarks/gpu_suite.py speed --csv "$CSV" $SMOKE
part overhead 20 "$PY" benchmarks/gpu_suite.py overhead --csv "$CSV" $SMOKE
part logits 40 "$PY" benchmarks/gpu_suite.py logits --csv "$CSV" $SMOKE
timeout 10 "$PY" benchmarks/gpu_suite.py table --csv "$CSV" --parts "$PARTS" | tee "$OUT/gpu_table.txt"
