#!/bin/bash
# H200 call 1 of session 6 (2026-11-29): (1) why recomputing costs the packed rows speed: 1.1B 2x4096, the plan
# (three recompute bans lifted) vs plan-mat (only the materialized-backward ban) vs plan-keep (none), 30 timed
# steps each, and kernel profiles of plan and plan-keep; (2) the embedded default: which packages the image
# imports from source, every package byte-compiled, then two runs, one under -X importtime, and one under the
# kernel profiler for the host's share per step (ops dispatched, kernels launched, optimizer CPU time).
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/w
R=$PWD
t() { local s=$(date +%s.%N); "$@"; echo "[time] $(awk "BEGIN{print $(date +%s.%N) - $s}") s: $*" | tee -a "$O/times.txt"; }
t timeout 280 python3 scripts/bench_train.py --models 1b --shapes 2x4096 --contenders qdoctor \
  --variants plan,plan-mat,plan-keep --steps 30 --warm 5 --peers .gpu/peers --out "$O/bench-1b-packed.json" \
  > /tmp/w/b1.txt 2> /tmp/w/b1.err
tail -6 /tmp/w/b1.txt
for v in plan plan-keep; do
  t timeout 80 python3 scripts/kernel_profile.py --out /tmp/w/kprof-$v.json --skip 4 --active 3 -- \
    scripts/bench_train.py --worker --model /tmp/qbench/rand-1b --variant $v --shapes 2x4096 --steps 8 --warm 3 \
    > /tmp/w/kprof-$v.out 2>&1; tail -2 /tmp/w/kprof-$v.out
done
t python3 scripts/import_cost.py --repeat 1 > /tmp/w/import-cost-before.json 2>&1
python3 -c "import json; d=json.load(open('/tmp/w/import-cost-before.json')); print('before', d['modules']['from_source'], d['import_s_as_installed'])"
SP=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
t python3 -m compileall -q -j 16 "$SP" /tmp/site > /tmp/w/compileall.txt 2>&1
t python3 scripts/import_cost.py --repeat 2 > /tmp/w/import-cost-after.json 2>&1
python3 -c "import json; d=json.load(open('/tmp/w/import-cost-after.json')); print('after', d['modules']['from_source'], d['import_s_as_installed'], d['import_s_torch_only'])"
mkdir -p /tmp/e && cd /tmp/e
t python3 -m qdoctor train --skip-probes --json --output /tmp/e/r1 > /tmp/w/e1.json 2> /tmp/w/e1.err
t python3 -m qdoctor train --skip-probes --json --output /tmp/e/r2 > /tmp/w/e2.json 2> /tmp/w/e2.err
t python3 -X importtime -m qdoctor train --skip-probes --json --output /tmp/e/r3 > /tmp/w/e3.json 2> /tmp/w/e3.err
t python3 "$R/scripts/kernel_profile.py" --out /tmp/w/kprof-embedded.json --skip 35 --active 6 -m qdoctor -- \
  train --skip-probes --output /tmp/e/r4 > /tmp/w/e4.out 2>&1
cd "$R"
grep "import time" /tmp/w/e3.err | awk -F'|' '{gsub(/ /,"",$2); print $2, $3}' | sort -n -r | head -40 > /tmp/w/e3-importtime-top.txt
for f in e1 e2 e3; do python3 -c "
import json; t=open('/tmp/w/$f.json').read(); d=json.loads(t[t.find('{'):])
print('$f', d.get('status'), d.get('tokens_per_s'), d.get('wall_time_s'), d.get('timings'))" 2>&1 | tail -1; done
python3 -c "
import json; d=json.load(open('/tmp/w/kprof-embedded.json')); print({k: v for k, v in d.items() if k != 'kernels'})"
for v in plan plan-keep; do python3 -c "
import json; d=json.load(open('/tmp/w/kprof-$v.json')); print('$v', d['gpu_ms_per_step'], d['wall_ms_per_step'], d['kernels_per_step'], d['by_kind_ms_per_step'])"; done
head -12 /tmp/w/e3-importtime-top.txt
tail -c 1500 /tmp/w/b1.err > /tmp/w/b1-err-tail.txt
tar -czf "$O/w.tgz" -C /tmp/w --exclude=e3.err .
cat "$O/times.txt"
