#!/bin/bash
# H200 call 5 of session 6 (2026-11-29): where the packed 1.1B rows still lose ~11% to unpacked ones with
# CUDA graphs: kernel profiles of the plan at 8x1024 and at 2x4096 (steps 10-12, after both packed
# document-count buckets are recorded).
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/w
t() { local s=$(date +%s.%N); "$@"; echo "[time] $(awk "BEGIN{print $(date +%s.%N) - $s}") s: $*" | tee -a "$O/times.txt"; }
for s in 8x1024 2x4096; do
  t timeout 100 python3 scripts/kernel_profile.py --out "$O/kprof-plan-$s.json" --skip 8 --active 3 -- \
    scripts/bench_train.py --worker --model /tmp/qbench/rand-1b --variant plan --shapes $s --steps 10 --warm 3 \
    > /tmp/w/kprof-$s.out 2>&1; tail -1 /tmp/w/kprof-$s.out | cut -c1-400
  python3 -c "
import json; d=json.load(open('$O/kprof-plan-$s.json')); print('$s', {k: v for k, v in d.items() if k not in ('kernels', 'args')})"
done
cat "$O/times.txt"
