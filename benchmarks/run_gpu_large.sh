#!/usr/bin/env bash
# Large models on the lent GPU (issues 13.6, 14.2): the second device call, after run_gpu_suite.sh, in the minutes
# left (every part under its own timeout; the limits sum to 360 s). Nothing installed; rows appended as measured.
#
#   GEFFECT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/run_gpu_large.sh   # on the lent GPU machine
#   bash benchmarks/run_gpu_large.sh --smoke        # CPU: the same plumbing, the tiny shape (CI)
#
# - geffect: the profiler vs a training step vs materialized gradients, 1.1B and 6.7B Llama shapes, 4 sequences
#   of 128 and 512 tokens per side (512 and 2048 tokens), bf16; first the bf16-vs-float32 check on 4 layers;
# - fsdp: one step of FSDP2 on one rank (NCCL, bf16 compute) next to the single-process step, 1.1B shape;
# - memory: one LoRA NPO step with gradient checkpointing on the 6.7B shape (bf16 weights, r 8 on q and v, 4
#   sequences of 512 tokens per side), its peak memory next to the memory plan's ($OUT/gpu_large_memory.csv).
# $OUT/gpu_large.csv has the rows (same columns as gpu_suite.csv), $OUT/gpu_large_parts.csv each part's exit code
# and time; the table closes the output. A real GPU run's CSVs belong under benchmarks/results/.
NAME=gpu_large TITLE="geffect large-model GPU runs"
source "$(dirname "$0")/device_parts.sh"

TOKENS=128,512 FSDP_TOKENS=512 REPEATS=2
[[ -n "$SMOKE" ]] && TOKENS=8 FSDP_TOKENS=8 REPEATS=1
part geffect 170 "$PY" benchmarks/geffect_gpu.py --csv "$CSV" --shapes 1.1b,6.7b --tokens "$TOKENS" \
  --repeats "$REPEATS" --check $SMOKE
part fsdp 70 "$PY" benchmarks/fsdp_gpu.py --csv "$CSV" --shape 1.1b --tokens "$FSDP_TOKENS" --repeats "$REPEATS" $SMOKE
part memory 120 "$PY" benchmarks/memory_gpu.py --csv "$OUT/gpu_large_memory.csv" --shape 6.7b --tokens 512 $SMOKE
timeout 10 "$PY" benchmarks/gpu_suite.py table --csv "$CSV" --parts "$PARTS" | tee "$OUT/gpu_large_table.txt"
