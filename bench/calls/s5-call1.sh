#!/bin/bash
# H200 call 1 of session 5 (2026-11-29): does torch 2.11's varlen take fewer key/value heads unrepeated
# (scripts/varlen_gqa_probe.py); where the stack's import time goes (scripts/import_cost.py: bytecode cache,
# filesystem); then 1.1B on both shapes: the plan (now with unrepeated key/value heads where the self-check
# passes them) and the plan with the compiled layers' activation memory budget at 0.9 and 0.7, vs Unsloth.
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/w
t() { local s=$(date +%s.%N); "$@"; echo "[time] $(awk "BEGIN{print $(date +%s.%N) - $s}") s: $*" | tee -a "$O/times.txt"; }
t python3 scripts/varlen_gqa_probe.py > "$O/gqa.json" 2> /tmp/w/gqa.err; cat "$O/gqa.json"; tail -3 /tmp/w/gqa.err
t timeout 420 python3 scripts/bench_train.py --models 1b --contenders qdoctor,unsloth \
  --variants plan,plan-amb90,plan-amb70 --peers .gpu/peers --out "$O/bench-1b-amb.json" > /tmp/w/b1.txt 2> /tmp/w/b1.err
tail -12 /tmp/w/b1.txt; grep -v "^\s*$" /tmp/w/b1.err | grep -i "error\|warn\|self-check" | tail -5
cp /tmp/w/b1.txt "$O/bench-1b-amb-stdout.txt"
t python3 scripts/import_cost.py --repeat 2 > "$O/import-cost.json" 2>&1; tail -12 "$O/import-cost.json"
cat "$O/times.txt"
