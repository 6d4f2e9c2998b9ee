#!/usr/bin/env python
"""Wall time of `qdoctor check` beside the tools people use today, measured side by side.

Each round runs every command once, in turn, so machine load drifts over all of them alike.
`check --deep` is measured cold (qdoctor's cache emptied before each run: the child imports torch)
and warm (the cached deep result is reused). The plain `check` runs with a warm cache, as it does
on any second run; `check (cold cache)` empties the cache first. Prints medians and ratios last.

    python scripts/bench_check.py [--runs 5] [--python PATH] [--skip-slow]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def run(cmd, env, timeout=600.0):
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, timeout=timeout)
    return time.perf_counter() - t0, proc.returncode


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs of each command (default 5)")
    ap.add_argument("--python", default=sys.executable, help="interpreter of the environment to measure")
    ap.add_argument("--skip-slow", action="store_true",
                    help="leave out python -m bitsandbytes, collect_env and check --deep cold")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")

    py = args.python
    qdoctor = [py, "-m", "qdoctor"]
    bindir = os.path.dirname(py)
    if os.path.exists(os.path.join(bindir, "qdoctor")):
        qdoctor = [os.path.join(bindir, "qdoctor")]  # the console script, as a user runs it
    cache = tempfile.mkdtemp(prefix="qdoctor-bench-cache-")
    env = dict(os.environ, QDOCTOR_CACHE_DIR=cache)

    def clear():
        shutil.rmtree(cache, ignore_errors=True)
        os.makedirs(cache, exist_ok=True)

    # name -> (command, prepare-before-each-run)
    cases = {
        "qdoctor check": (qdoctor + ["check"], None),
        "qdoctor check (cold cache)": (qdoctor + ["check"], clear),
        "qdoctor check --deep (warm)": (qdoctor + ["check", "--deep"], None),
    }
    if not args.skip_slow:
        cases["qdoctor check --deep (cold)"] = (qdoctor + ["check", "--deep"], clear)
        cases["python -m bitsandbytes"] = ([py, "-m", "bitsandbytes"], None)
        cases["python -m torch.utils.collect_env"] = ([py, "-m", "torch.utils.collect_env"], None)

    # A wheel install byte-compiles qdoctor (pip --compile is the default), as it did torch and
    # bitsandbytes; an editable checkout under PYTHONDONTWRITEBYTECODE=1 would recompile every run.
    pkg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qdoctor")
    subprocess.run([py, "-m", "compileall", "-q", pkg], check=False, stdout=subprocess.DEVNULL,
                   env=dict(env, PYTHONDONTWRITEBYTECODE=""))
    # warm-up: fill the cache (one deep run) and the OS page cache; not measured
    clear()
    run(qdoctor + ["check", "--deep"], env)
    times: dict[str, list[float]] = {k: [] for k in cases}
    codes: dict[str, set] = {k: set() for k in cases}
    for i in range(args.runs):
        for name, (cmd, prepare) in cases.items():
            if prepare:
                prepare()
            dt, rc = run(cmd, env)
            if prepare is clear and "--deep" not in cmd:
                run(qdoctor + ["check", "--deep"], env)  # re-warm the cache for the warm cases
            times[name].append(dt)
            codes[name].add(rc)
        print(f"round {i + 1}/{args.runs} done", file=sys.stderr)
    shutil.rmtree(cache, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["qdoctor check"]
    width = max(len(k) for k in med)
    print(f"\n{args.runs} runs each, {os.cpu_count()} CPUs, python {py}")
    print(f"{'command'.ljust(width)}  median s   min s   max s   x check  exit")
    for k, v in times.items():
        print(f"{k.ljust(width)}  {med[k]:8.3f}  {min(v):6.3f}  {max(v):6.3f}  {med[k] / ref:7.1f}  "
              f"{','.join(str(c) for c in sorted(codes[k], key=str))}")
    if "python -m bitsandbytes" in med:
        print(f"\nqdoctor check / python -m bitsandbytes = {ref / med['python -m bitsandbytes']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
