#!/bin/bash
# H200 call 6 of session 6 (2026-11-29): every single-GPU test marked gpu, after the CUDA-graph and
# row-length changes (the two-GPU file, test_train_ddp.py, needs two GPUs).
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O"
t() { local s=$(date +%s.%N); "$@"; echo "[time] $(awk "BEGIN{print $(date +%s.%N) - $s}") s: $*" | tee -a "$O/times.txt"; }
t timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_train_cudagraphs.py \
  tests/test_train_speed.py tests/test_train_varlen.py tests/test_train_flat.py tests/test_train_guards.py \
  tests/test_train_offload.py tests/test_smoke_run.py > "$O/pytest-gpu.txt" 2>&1
tail -4 "$O/pytest-gpu.txt"
grep -E "^(FAILED|ERROR)|Error" "$O/pytest-gpu.txt" | head -10
