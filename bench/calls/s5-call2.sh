#!/bin/bash
# H200 call 2 of session 5 (2026-11-29): 1.1B on both shapes, 30 timed steps: the plan (compiled layers with
# the activation memory budget, speed.MEMORY_BUDGET) vs the partitioner's default (plan-amb100) vs Unsloth;
# then the embedded default as installed (torch has no cached bytecode and PYTHONDONTWRITEBYTECODE is set),
# torch byte-compiled once (compileall), the embedded default twice more and once under cProfile.
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/w
t() { local s=$(date +%s.%N); "$@"; echo "[time] $(awk "BEGIN{print $(date +%s.%N) - $s}") s: $*" | tee -a "$O/times.txt"; }
t timeout 330 python3 scripts/bench_train.py --models 1b --contenders qdoctor,unsloth --variants plan,plan-amb100 \
  --steps 30 --warm 5 --peers .gpu/peers --out "$O/bench-1b.json" > /tmp/w/b1.txt 2> /tmp/w/b1.err
tail -8 /tmp/w/b1.txt; cp /tmp/w/b1.txt "$O/bench-1b-stdout.txt"
cd /tmp && mkdir -p e && cd e
t python3 -m qdoctor train --skip-probes --json --output /tmp/e/r1 > /tmp/w/e1.json 2> /tmp/w/e1.err
TD=$(python3 -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('torch').origin))")
t python3 -m compileall -q -j 16 "$TD" > /tmp/w/compileall.txt 2>&1
t python3 -m qdoctor train --skip-probes --json --output /tmp/e/r2 > /tmp/w/e2.json 2> /tmp/w/e2.err
t python3 -m qdoctor train --skip-probes --json --output /tmp/e/r3 > /tmp/w/e3.json 2> /tmp/w/e3.err
t python3 -m cProfile -o /tmp/w/e4.prof -m qdoctor train --skip-probes --json --output /tmp/e/r4 > /tmp/w/e4.json 2> /tmp/w/e4.err
python3 -c "import pstats; pstats.Stats('/tmp/w/e4.prof').sort_stats('cumulative').print_stats(60)" > /tmp/w/e4-top.txt 2>&1
cd - > /dev/null
t python3 scripts/import_cost.py --repeat 2 > /tmp/w/import-cost-after.json 2>&1
for f in e1 e2 e3 e4; do python3 -c "
import json,sys; t=open('/tmp/w/$f.json').read(); d=json.loads(t[t.find('{'):])
s=d.get('summary',d); print('$f', s.get('status'), s.get('tokens_per_s'), s.get('wall_time_s'), s.get('timings'))" 2>&1 | tail -1; done
tail -9 /tmp/w/import-cost-after.json
tar -czf "$O/embedded.tgz" -C /tmp/w e1.json e2.json e3.json e4.json e1.err e2.err e4-top.txt import-cost-after.json compileall.txt
cat "$O/times.txt"
