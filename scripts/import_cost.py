"""Where the training stack's import time goes on this machine: is each package's bytecode cached (a
read-only site-packages without __pycache__ recompiles every module on every run), on what filesystem,
and how long `import transformers, peft, bitsandbytes` takes as installed and with a writable bytecode
cache (PYTHONPYCACHEPREFIX), each twice in a fresh process. Prints one JSON object.

    python scripts/import_cost.py [--modules torch,transformers,peft,bitsandbytes] [--repeat 2]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def mount_of(path: Path) -> dict:
    """The /proc/mounts entry with the longest mount point above `path`."""
    best = {"mount": None, "fstype": None}
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            longer = len(parts) > 2 and len(parts[1]) >= len(best["mount"] or "")
            if longer and str(path).startswith(parts[1]):
                best = {"mount": parts[1], "fstype": parts[2], "options": parts[3] if len(parts) > 3 else ""}
    except OSError:
        pass
    return best


def bytecode_state(name: str) -> dict:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return {"found": False}
    root = Path(list(spec.submodule_search_locations)[0])
    tag = sys.implementation.cache_tag
    py = pyc = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                py += 1
                pyc += (Path(dirpath) / "__pycache__" / f"{f[:-3]}.{tag}.pyc").exists()
    return {"path": str(root), "writable": os.access(root, os.W_OK), "py_files": py, "cached_pyc": pyc,
            **mount_of(root)}


def timed_import(mods: str, env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {mods}"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return round(time.perf_counter() - t0, 2)


UNCACHED = """
import collections, json, os, sys
import {mods}
miss, hit = collections.Counter(), collections.Counter()
for m in list(sys.modules.values()):
    spec = getattr(m, "__spec__", None)
    if spec is None or not spec.cached or not (spec.origin or "").endswith(".py"):
        continue
    top = spec.name.split(".")[0]
    (hit if os.path.exists(spec.cached) else miss)[top] += 1
print(json.dumps({{"from_source": dict(miss.most_common()), "cached": dict(hit.most_common(12))}}))
"""


def uncached_modules(mods: str, env: dict) -> dict:
    """Which packages' modules the import loaded from source (no .pyc next to them), counted per package:
    the bytecode check of the four named packages misses their dependencies (sympy, sklearn...)."""
    r = subprocess.run([sys.executable, "-c", UNCACHED.format(mods=mods)], env=env, capture_output=True,
                       text=True)
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": r.stderr[-400:]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modules", default="torch,transformers,peft,bitsandbytes")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    names = a.modules.split(",")
    out = {"python": sys.version.split()[0], "purelib": sysconfig.get_paths()["purelib"],
           "pycache_prefix": sys.pycache_prefix, "dont_write_bytecode": sys.dont_write_bytecode,
           "packages": {n: bytecode_state(n) for n in names}}
    env = dict(os.environ)
    mods = ", ".join(names)
    out["modules"] = uncached_modules(mods, env)
    out["import_s_as_installed"] = [timed_import(mods, env) for _ in range(a.repeat)]
    with tempfile.TemporaryDirectory() as d:
        env["PYTHONPYCACHEPREFIX"] = d
        out["import_s_with_pycache_prefix"] = [timed_import(mods, env) for _ in range(a.repeat)]
    out["import_s_torch_only"] = [timed_import("torch", dict(os.environ)) for _ in range(a.repeat)]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
