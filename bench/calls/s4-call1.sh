#!/bin/bash
# H200 call 1 of session 4 (2026-11-29): where the embedded default's start-up goes (cold, then warm), the
# 1.1B 8x1024 side-by-side in training mode with the plan's SDPA, and a per-kernel GPU profile of qdoctor and
# Unsloth on that shape. Run from the repository root on the device with the peer site unpacked.
set -u
O=${OUT:-/tmp/out}; mkdir -p "$O"
t() { local s=$(date +%s.%N); "$@"; echo "[time] $(awk "BEGIN{print $(date +%s.%N) - $s}") s: $*" | tee -a "$O/times.txt"; }
t env PROFILE_DUMP="$O/embedded-cold.prof" python3 scripts/profile_train.py --skip-probes --json --output /tmp/e1 \
  > "$O/embedded-cold.json" 2> "$O/embedded-cold.err"
t python3 -c "import torch; torch.zeros(1, device='cuda')"
t python3 -c "import transformers, peft, bitsandbytes"
t python3 -m qdoctor train --skip-probes --json --output /tmp/e2 > "$O/embedded-warm.json" 2> "$O/embedded-warm.err"
t python3 -m qdoctor train --skip-probes --json --fused-loss none --attention sdpa --output /tmp/e3 \
  > "$O/embedded-warm-plain.json" 2> "$O/embedded-warm-plain.err"
t python3 scripts/bench_train.py --models 1b --shapes 8x1024 --contenders qdoctor,unsloth,plain --variants plan \
  --peers .gpu/peers --out "$O/bench-1b.json" > "$O/bench-1b.txt" 2> "$O/bench-1b.err"
tail -8 "$O/bench-1b.txt"
M=/tmp/qbench/rand-1b
t python3 scripts/kernel_profile.py --out "$O/kprof-qdoctor.json" -- scripts/bench_train.py --worker --model $M \
  --variant plan --shapes 8x1024 --steps 6 --warm 3 > "$O/kprof-qdoctor.txt" 2>&1
t python3 scripts/kernel_profile.py --out "$O/kprof-unsloth.json" -- .gpu/peers/unsloth_loop.py $M --gc 0 \
  --shapes 8x1024 --steps 6 --warm 3 > "$O/kprof-unsloth.txt" 2>&1
grep -h "kernel_profile\]" "$O"/kprof-*.txt
cat "$O/times.txt"
