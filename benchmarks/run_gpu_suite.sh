#!/usr/bin/env bash
# One device call on a lent H100 that runs every GPU check and benchmark, each bounded in time, and leaves
# the CSVs under $OUT (the folder the device tool sends back). Sized for a ~10-minute call:
#   run: GEFFECT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/run_gpu_suite.sh
# Optional comparison wheels (liger-kernel 0.8.5, cut-cross-entropy 25.1.1) are installed from wheels/ if present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/geffect-gpu-out}; mkdir -p "$OUT"; export OUT
pip install -q --no-deps -e . >"$OUT/install.log" 2>&1
ls wheels/*.whl >/dev/null 2>&1 && pip install -q --no-deps wheels/*.whl >>"$OUT/install.log" 2>&1
python -c "import geffect_kernels.csrc as c; c.build_extensions()" >"$OUT/build.log" 2>&1
run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; echo "$name: exit $? (log $name.log)"
}
run logits_kernels 120 python benchmarks/gpu_logits_kernels.py
run losses 300 python benchmarks/gpu_losses.py --quick
run geffect 180 python benchmarks/geffect_gpu.py --shapes 1.1b --repeats 3 --out "$OUT/geffect_gpu.csv"
cp benchmarks/results/gpu_*.csv "$OUT/" 2>/dev/null
for f in logits_kernels losses geffect; do echo "== $f"; tail -n 25 "$OUT/$f.log"; done
