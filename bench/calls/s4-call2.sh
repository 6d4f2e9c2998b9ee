#!/bin/bash
# H200 call 2 of session 4 (2026-11-29): the embedded default cold (import tree) and warm with the deep facts
# child started early; per-kernel GPU profiles of qdoctor and Unsloth on 1.1B 8x1024; varlen outside the
# compiled graphs on 1.1B 2x4096; 6.7B qdoctor (plan) vs Unsloth on both shapes.
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/w
t() { local s=$(date +%s.%N); "$@"; echo "[time] $(awk "BEGIN{print $(date +%s.%N) - $s}") s: $*" | tee -a "$O/times.txt"; }
{ id -u; python3 -c "import transformers, os; d=os.path.dirname(transformers.__file__); print(d, os.access(d, os.W_OK), len(os.listdir(d + '/__pycache__')) if os.path.isdir(d + '/__pycache__') else 'no __pycache__')"; } > /tmp/w/env.txt 2>&1
t python3 -X importtime -m qdoctor train --skip-probes --json --output /tmp/e1 > /tmp/w/e-cold.json 2> /tmp/w/e-cold.err
t python3 -m qdoctor train --skip-probes --json --output /tmp/e2 > /tmp/w/e-warm1.json 2> /tmp/w/e-warm1.err
t python3 -m qdoctor train --skip-probes --json --output /tmp/e3 > /tmp/w/e-warm2.json 2> /tmp/w/e-warm2.err
t python3 -X importtime -c "import transformers, peft, bitsandbytes" 2> /tmp/w/imports-warm.err
tar -czf "$O/embedded.tgz" -C /tmp/w .
t python3 scripts/bench_train.py --models 1b --shapes 2x4096 --contenders qdoctor --variants plan-vdis \
  --out "$O/bench-1b-vdis.json" > /tmp/w/b1.txt 2>&1; tail -3 /tmp/w/b1.txt
M=/tmp/qbench/rand-1b; mkdir -p /tmp/k
t python3 scripts/kernel_profile.py --out /tmp/k/qdoctor.json -- scripts/bench_train.py --worker --model $M \
  --variant plan --shapes 8x1024 --steps 6 --warm 3 > /tmp/k/qdoctor.txt 2>&1
t python3 scripts/kernel_profile.py --out /tmp/k/unsloth.json -- .gpu/peers/unsloth_loop.py $M --gc 0 \
  --shapes 8x1024 --steps 6 --warm 3 > /tmp/k/unsloth.txt 2>&1
tar -czf "$O/kprof.tgz" -C /tmp/k .
grep -h "kernel_profile\]" /tmp/k/*.txt
t python3 scripts/bench_train.py --models 7b --contenders qdoctor,unsloth --variants plan --steps 6 --warm 2 \
  --peers .gpu/peers --out "$O/bench-7b.json" > /tmp/w/b7.txt 2> /tmp/w/b7.err
tail -6 /tmp/w/b7.txt
cat "$O/times.txt"
