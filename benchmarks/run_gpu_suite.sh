#!/usr/bin/env bash
# The GPU suite in one bounded device call: correctness first, then speed; nothing installed.
#
#   GEFFECT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/run_gpu_suite.sh   # on the lent GPU machine
#   bash benchmarks/run_gpu_suite.sh --smoke        # CPU: the same plumbing, Triton interpreter, tiny shapes (CI)
#
# The package is imported from this checkout (PYTHONPATH), with whatever torch / triton / transformers / nvcc the
# machine carries. Liger and CCE are timed only when importable; wheels for them may travel in .whl/ (installed
# with --no-index into a temporary folder, never from a network). Every part runs under its own `timeout`; the
# limits sum to at most 470 s of the 8 minutes a device call is given. Each measurement is appended to
# $OUT/gpu_suite.csv as soon as it is taken (with the machine, the GPU and the commit), each failing case is
# a row of its own, $OUT/gpu_suite_parts.csv has every part's exit code and time, and the compact table
# (≤ 12,000 characters) is printed last and kept in $OUT/gpu_suite_table.txt. A real GPU run's CSVs belong under
# benchmarks/results/ (copy them there from $OUT); a smoke run writes under $OUT only (default: a temp dir).
NAME=gpu_suite TITLE="geffect GPU suite"
source "$(dirname "$0")/device_parts.sh"
[[ -n "$SMOKE" ]] && export TRITON_INTERPRET=1
[[ -z "$SMOKE" ]] && { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"; }

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
part speed 115 "$PY" benchmarks/gpu_suite.py speed --csv "$CSV" $SMOKE
part overhead 20 "$PY" benchmarks/gpu_suite.py overhead --csv "$CSV" $SMOKE
part logits 40 "$PY" benchmarks/gpu_suite.py logits --csv "$CSV" $SMOKE
part stats 25 "$PY" benchmarks/gpu_suite.py stats --csv "$CSV" $SMOKE
timeout 10 "$PY" benchmarks/gpu_suite.py table --csv "$CSV" --parts "$PARTS" | tee "$OUT/gpu_suite_table.txt"
