#!/usr/bin/env bash
# Manual check (not run by CI): builds the `cuda` extension (csrc/binding.cpp with GEFFECT_WITH_CUDA plus
# csrc/cuda/*.cu) against a CUDA build of torch on a machine with nvcc but no GPU, through the package's
# own paths: build.load("cuda") (torch's extension cache) and setup.py's ahead-of-time build_ext.
# Compiling, linking and importing the library need no GPU (torch loads libcuda lazily).
#
#   csrc/check_cuda_build.sh [TORCH_SPEC]
#   (default torch==2.11.0, cu130 on PyPI; needs ~6 GB in /tmp)
#
# Leave CUDA_HOME unset to also check build.py's toolkit lookup (see _cuda_home there). The venv, the
# extension cache and the source copy live under $WORK (default /tmp/geffect_cuda_check), removed at the end
# unless KEEP=1.
set -euo pipefail
TORCH_SPEC=${1:-torch==2.11.0}
REPO=$(cd "$(dirname "$0")/.." && pwd)  # this file is csrc/check_cuda_build.sh
WORK=${WORK:-/tmp/geffect_cuda_check}
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q "$TORCH_SPEC" ninja
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2}

echo "== build.load('cuda') =="
TORCH_EXTENSIONS_DIR="$WORK/ext" PYTHONPATH="$REPO" "$WORK/venv/bin/python" - <<'EOF'
import torch
from geffect_kernels.backends.cpp import build
from geffect_kernels.catalog import IGNORE_INDEX

print("torch", torch.__version__, "CUDA", torch.version.cuda)
cuda, cpu = build.load("cuda", verbose=True), build.load("cpu")
assert cuda.has_cuda() and hasattr(cuda, "ghost_inner_product_cuda"), cuda
# the CPU kernels of the cuda build are the CPU build's
logits = torch.randn(6, 37, dtype=torch.float64)
labels = torch.randint(0, 37, (6,))
labels[2] = IGNORE_INDEX
for a, b in zip(cuda.row_logprobs(logits, labels, IGNORE_INDEX, 0.0),
                cpu.row_logprobs(logits, labels, IGNORE_INDEX, 0.0)):
    assert torch.equal(a, b)
print("OK:", cuda.__file__)
EOF

echo "== GEFFECT_BUILD_EXT=1 setup.py build_ext (a copy of the tracked files) =="
rm -rf "$WORK/src" && mkdir "$WORK/src"
(cd "$REPO" && git ls-files -z | xargs -0 cp --parents -t "$WORK/src")
(cd "$WORK/src" && GEFFECT_BUILD_EXT=1 "$WORK/venv/bin/python" setup.py -q build_ext --inplace)
(cd "$WORK/src" && PYTHONPATH=. "$WORK/venv/bin/python" -c \
  "import torch, geffect_kernels.backends.cpp._cuda as m; assert m.has_cuda(); print('OK:', m.__file__)")
