#!/usr/bin/env python
"""Time `qdoctor smoke` (per probe and total) beside `python -m bitsandbytes`, in the same run.

    python scripts/bench_smoke.py [--device cpu|cuda:N] [--repeat N] [--isolation fork|spawn]

Prints the human view of the last smoke run, then a short table: per-probe times (median over the
runs), the smoke wall time, and `python -m bitsandbytes` wall time with its exit code.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time


def timed(cmd: list[str], env=None) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--isolation", choices=["fork", "spawn"], default=None)
    a = ap.parse_args()
    smoke = [sys.executable, "-m", "qdoctor", "smoke", "--json"]
    if a.device:
        smoke += ["--device", a.device]
    if a.isolation:
        smoke += ["--isolation", a.isolation]
    walls, per_probe, bnb_walls, status, rc, bnb_rc, doc = [], {}, [], {}, None, None, None
    for _ in range(a.repeat):
        w, p = timed(smoke)
        walls.append(w)
        rc = p.returncode
        try:
            doc = json.loads(p.stdout)
        except ValueError:
            print(p.stdout[-2000:], p.stderr[-2000:], file=sys.stderr)
            return 3
        for r in doc["probes"]:
            per_probe.setdefault(r["probe"], []).append(r["duration_s"])
            status[r["probe"]] = r["status"]
        w, p = timed([sys.executable, "-m", "bitsandbytes"])
        bnb_walls.append(w)
        bnb_rc = p.returncode
    human = [sys.executable, "-m", "qdoctor", "smoke"] + smoke[5:]
    _, p = timed(human)
    print(p.stdout)
    med = statistics.median
    print(f"device {doc.get('device')}, {a.repeat} run(s), medians")
    print(f"{'what':<28}{'status':<9}{'seconds':>9}")
    for name, ts in per_probe.items():
        print(f"{'  probe ' + name:<28}{status[name]:<9}{med(ts):>9.2f}")
    print(f"{'qdoctor smoke (wall)':<28}{'rc=' + str(rc):<9}{med(walls):>9.2f}")
    print(f"{'python -m bitsandbytes':<28}{'rc=' + str(bnb_rc):<9}{med(bnb_walls):>9.2f}")
    print(f"{'ratio smoke / bitsandbytes':<37}{med(walls) / med(bnb_walls):>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
