#!/bin/bash
# H200 call 3 of session 5 (2026-11-29): `qdoctor check` as installed (QD613: torch's bytecode never cached);
# the GPU-only tests; the plan (compiled layers recomputing pointwise work, speed.RECOMPUTE_POINTWISE; varlen
# with unrepeated key/value heads) vs Unsloth on 1.1B (30 timed steps) and 6.7B, both shapes; `qdoctor check`
# again after compileall of torch.
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O" /tmp/w
t() { local s=$(date +%s.%N); "$@"; echo "[time] $(awk "BEGIN{print $(date +%s.%N) - $s}") s: $*" | tee -a "$O/times.txt"; }
t python3 -m qdoctor check --json > /tmp/w/check-before.json 2> /tmp/w/check-before.err; echo "check rc=$?"
t timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_train_varlen.py tests/test_train_flat.py \
  tests/test_train_offload.py tests/test_train_guards.py > "$O/pytest-gpu.txt" 2>&1; tail -3 "$O/pytest-gpu.txt"
t timeout 200 python3 scripts/bench_train.py --models 1b --contenders qdoctor,unsloth --variants plan \
  --steps 30 --warm 5 --peers .gpu/peers --out "$O/bench-1b.json" > /tmp/w/b1.txt 2> /tmp/w/b1.err
tail -4 /tmp/w/b1.txt
t timeout 280 python3 scripts/bench_train.py --models 7b --contenders qdoctor,unsloth --variants plan --steps 6 \
  --warm 2 --peers .gpu/peers --out "$O/bench-7b.json" > /tmp/w/b7.txt 2> /tmp/w/b7.err
tail -4 /tmp/w/b7.txt
TD=$(python3 -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('torch').origin))")
t python3 -m compileall -q -j 16 "$TD" > /tmp/w/compileall.txt 2>&1
t python3 -m qdoctor check --json > /tmp/w/check-after.json 2> /tmp/w/check-after.err
for f in before after; do python3 -c "
import json; d=json.load(open('/tmp/w/check-$f.json'))
print('$f', d.get('verdict'), [(x.get('code'), x.get('severity')) for x in d.get('findings', [])])" 2>&1 | tail -1; done
tail -c 1500 /tmp/w/b1.err > /tmp/w/b1-err-tail.txt; tail -c 1500 /tmp/w/b7.err > /tmp/w/b7-err-tail.txt
tar -czf "$O/w.tgz" -C /tmp/w .
cat "$O/times.txt"
