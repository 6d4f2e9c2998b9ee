#!/bin/bash
# H200 call 4 of session 6 (2026-11-29): 6.7B on both shapes, the plan (compiled layers as CUDA graphs)
# against Unsloth; 8 warm-up steps (both packed document-count buckets recorded once) and 8 timed.
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/w
t() { local s=$(date +%s.%N); "$@"; echo "[time] $(awk "BEGIN{print $(date +%s.%N) - $s}") s: $*" | tee -a "$O/times.txt"; }
t timeout 450 python3 scripts/bench_train.py --models 7b --contenders qdoctor,unsloth --variants plan --steps 8 \
  --warm 8 --peers .gpu/peers --out "$O/bench-7b.json" > /tmp/w/b7.txt 2> /tmp/w/b7.err
tail -5 /tmp/w/b7.txt
grep -c "pending, uninvoked" /tmp/w/b7.err
tail -c 3000 /tmp/w/b7.err > /tmp/w/b7-err-tail.txt
tar -czf "$O/w.tgz" -C /tmp/w b7.txt b7-err-tail.txt
cat "$O/times.txt"
