#!/usr/bin/env bash
# The GPU suite in one bounded device call: the gpu-marked benchmark tests, correctness first, then speed; nothing
# installed.
#
#   GEFFECT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/run_gpu_suite.sh   # on the lent GPU machine
#   bash benchmarks/run_gpu_suite.sh --smoke        # CPU: the same tests, Triton interpreter, tiny shapes (CI)
#
# The package is imported from this checkout (PYTHONPATH), with whatever torch / triton / transformers / nvcc /
# pytest-benchmark the machine carries. Liger and CCE are timed only when importable; wheels for them may travel in
# .whl/ (installed with --no-index into a temporary folder, never from a network). Every part is one pytest run under
# its own `timeout`; the limits sum to at most 455 s (475 s with the table) of the 8 minutes a device call is given.
# Each timed part saves pytest-benchmark's JSON as $OUT/gpu_suite_<part>.json (machine, library versions, commit,
# each group's ratios in extra_info), $OUT/gpu_suite_parts.csv has every part's exit code and time, $OUT/gpu_suite.log
# the output, and the ratio table (≤ 12,000 characters) is printed last and kept in $OUT/gpu_suite_table.txt. A real
# GPU run's JSON files belong under benchmarks/results/ (copy them there from $OUT); a smoke run writes under $OUT
# only.
NAME=gpu_suite TITLE="geffect GPU suite"
source "$(dirname "$0")/device_parts.sh"
[[ -z "$SMOKE" ]] && { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"; }

if compgen -G ".whl/*.whl" >/dev/null; then  # optional comparison packages carried as wheels
  part wheels 20 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$OUT/site" .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:$OUT/site"
fi
if [[ -n "$SMOKE" ]]; then  # the extension build takes minutes on a CI core: only check that its spec resolves
  part build 30 "$PY" -c "from geffect_kernels.backends.cpp import build; print(build.extension_spec('cpu')['name'])"
else
  part build 75 "$PY" -c "import geffect_kernels.csrc as c; c.build_extensions()"
fi
B=benchmarks
part correctness 120 "$PY" -m pytest -q -rfEs -p no:cacheprovider -m gpu -k "float64 or host_sync" \
  $B/test_gpu_correctness.py $B/test_token_stats.py $B/test_logits_kernels.py
if [[ -n "$SMOKE" ]]; then  # one tiny shape
  bench_part fused 70 $B/test_fused_losses.py
else  # two parts: a part cut by its timeout loses only its own JSON
  bench_part fused 60 $B/test_fused_losses.py -k "V128256 and not N32768"
  bench_part fused_32k 35 $B/test_fused_losses.py -k "V32000 or N32768"
fi
bench_part overhead 15 $B/test_api_overhead.py
bench_part logits 30 $B/test_logits_kernels.py -k "not float64"
bench_part stats 20 $B/test_token_stats.py -k "not float64"
bench_part compiled 60 $B/test_compiled_step.py    # inductor compiles forward and backward once, untimed
bench_part head_adapter 20 $B/test_head_adapter.py
summary
