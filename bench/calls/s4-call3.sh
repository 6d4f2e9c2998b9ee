#!/bin/bash
# H200 call 3 of session 4 (2026-11-29): the GPU-only tests (offloaded checkpointing, flat optimizer, varlen,
# one sync per step), then the longest 6.7B sequence at micro-batch 1 under a 24 GiB memory cap: the plain
# loop with checkpointing, qdoctor with checkpointing, qdoctor with the layer inputs offloaded to host memory.
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/w
t() { local s=$(date +%s.%N); "$@"; echo "[time] $(awk "BEGIN{print $(date +%s.%N) - $s}") s: $*" | tee -a "$O/times.txt"; }
t python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_train_offload.py tests/test_train_flat.py \
  tests/test_train_varlen.py tests/test_train_guards.py > "$O/pytest-gpu.txt" 2>&1; tail -3 "$O/pytest-gpu.txt"
t python3 scripts/bench_train.py --models 7b --shapes none --contenders plain,qdoctor --peers .gpu/peers \
  --maxseq-variants ckpt,offload --mem-cap 24 --timeout 300 \
  --maxseq "plain=28672,32768;ckpt=40960,45056;offload=65536,81920,98304" \
  --out "$O/bench-7b-longest-cap24.json" > /tmp/w/l.txt 2> /tmp/w/l.err
tail -12 /tmp/w/l.txt; tail -c 3000 /tmp/w/l.err > "$O/longest-stderr-tail.txt"
cat "$O/times.txt"
