#!/usr/bin/env bash
# Large models on the lent GPU: the second device call, after run_gpu_suite.sh, in the minutes left (every part one
# pytest run of the gpu-marked tests under its own timeout; the limits sum to 360 s). Nothing installed.
#
#   GEFFECT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/run_gpu_large.sh   # on the lent GPU machine
#   bash benchmarks/run_gpu_large.sh --smoke        # CPU: the same tests, the tiny shape (CI)
#
# - geffect: the bf16 fast path against float32 materialized gradients on 4 layers, then the profiler vs a training
#   step vs materialized gradients, 1.1B and 6.7B Llama shapes, 4 sequences of 128 and 512 tokens per side, bf16
#   (benchmarks/test_geffect.py);
# - fsdp: one step of FSDP2 on one rank (NCCL, bf16 compute) next to the single-process step, 1.1B shape
#   (benchmarks/test_fsdp.py);
# - memory: one LoRA NPO step with gradient checkpointing on the 6.7B shape (bf16 weights, r 8 on q and v, 4
#   sequences of 512 tokens per side), its peak memory next to the memory plan's (benchmarks/test_train_memory.py).
# $OUT/gpu_large_<part>.json has each part's results, $OUT/gpu_large_parts.csv each part's exit code and time; the
# ratio table closes the output. A real GPU run's JSON files belong under benchmarks/results/.
NAME=gpu_large TITLE="geffect large-model GPU runs"
source "$(dirname "$0")/device_parts.sh"

B=benchmarks
bench_part geffect 170 $B/test_geffect.py
bench_part fsdp 70 $B/test_fsdp.py
bench_part memory 120 $B/test_train_memory.py
summary
