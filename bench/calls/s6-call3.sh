#!/bin/bash
# H200 call 3 of session 6 (2026-11-29): the plan now replays its compiled layers as CUDA graphs and marks
# each forward as a new iteration (speed.uses_cudagraphs, speed.mark_iteration). The GPU test of that
# (graphs vs none: packed rows whose document count changes, evaluation between steps); then 1.1B on both
# shapes against Unsloth, 10 warm-up steps (the packed rows' two document-count buckets are each recorded
# once, as compilation is, before timing) and 30 timed.
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/w
t() { local s=$(date +%s.%N); "$@"; echo "[time] $(awk "BEGIN{print $(date +%s.%N) - $s}") s: $*" | tee -a "$O/times.txt"; }
t timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_train_cudagraphs.py \
  tests/test_train_varlen.py > "$O/pytest-gpu.txt" 2>&1; tail -3 "$O/pytest-gpu.txt"
t timeout 300 python3 scripts/bench_train.py --models 1b --contenders qdoctor,unsloth --variants plan \
  --steps 30 --warm 10 --peers .gpu/peers --out "$O/bench-1b.json" > /tmp/w/b1.txt 2> /tmp/w/b1.err
tail -5 /tmp/w/b1.txt
grep -c "pending, uninvoked" /tmp/w/b1.err
tail -c 3000 /tmp/w/b1.err > /tmp/w/b1-err-tail.txt
tar -czf "$O/w.tgz" -C /tmp/w .
cat "$O/times.txt"
