#!/bin/bash
# H200 call 2 of session 6 (2026-11-29): call 1 found the packed 1.1B step host-bound (105 ms of GPU time in
# a 162-182 ms step, ~4,900 kernel launches). Does replaying the compiled layers as CUDA graphs (plan-cg:
# inductor's triton.cudagraphs) close that gap? 1.1B both shapes: plan vs plan-cg vs Unsloth, 30 timed steps;
# then a kernel profile of plan-cg at 2x4096.
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/w
t() { local s=$(date +%s.%N); "$@"; echo "[time] $(awk "BEGIN{print $(date +%s.%N) - $s}") s: $*" | tee -a "$O/times.txt"; }
t timeout 400 python3 scripts/bench_train.py --models 1b --contenders qdoctor,unsloth --variants plan,plan-cg \
  --steps 30 --warm 5 --peers .gpu/peers --out "$O/bench-1b-cg.json" > /tmp/w/b1.txt 2> /tmp/w/b1.err
tail -8 /tmp/w/b1.txt
grep -i "cudagraph\|skipping" /tmp/w/b1.err | sort | uniq -c | head -8
t timeout 90 python3 scripts/kernel_profile.py --out /tmp/w/kprof-plan-cg.json --skip 4 --active 3 -- \
  scripts/bench_train.py --worker --model /tmp/qbench/rand-1b --variant plan-cg --shapes 2x4096 --steps 8 --warm 3 \
  > /tmp/w/kprof-plan-cg.out 2>&1; tail -2 /tmp/w/kprof-plan-cg.out
python3 -c "
import json; d=json.load(open('/tmp/w/kprof-plan-cg.json')); print({k: v for k, v in d.items() if k != 'kernels'})" 2>&1 | tail -1
tail -c 3000 /tmp/w/b1.err > /tmp/w/b1-err-tail.txt
tar -czf "$O/w.tgz" -C /tmp/w .
cat "$O/times.txt"
