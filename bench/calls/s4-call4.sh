#!/bin/bash
# H200 call 4 of session 4 (2026-11-29): the flat optimizer (optim.FlatParams) against per-tensor steps and
# Unsloth, 1.1B on both shapes, then 6.7B 8x1024 against Unsloth.
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/w
t() { local s=$(date +%s.%N); "$@"; echo "[time] $(awk "BEGIN{print $(date +%s.%N) - $s}") s: $*" | tee -a "$O/times.txt"; }
t python3 scripts/bench_train.py --models 1b --contenders qdoctor,unsloth --variants plan,plan-pertensor \
  --peers .gpu/peers --out "$O/bench-1b-flat.json" > /tmp/w/b1.txt 2> /tmp/w/b1.err; tail -5 /tmp/w/b1.txt
t python3 scripts/bench_train.py --models 7b --shapes 8x1024 --contenders qdoctor,unsloth --variants plan \
  --steps 6 --warm 2 --peers .gpu/peers --out "$O/bench-7b-flat.json" > /tmp/w/b7.txt 2> /tmp/w/b7.err
tail -3 /tmp/w/b7.txt; cat "$O/times.txt"
