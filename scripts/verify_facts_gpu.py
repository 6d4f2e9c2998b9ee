#!/usr/bin/env python
"""On a GPU machine: do the static facts agree with what torch, bitsandbytes and cuobjdump say?

Compares, for this machine:
  - torch's arch list read from libtorch_cuda.so's fatbinary vs torch.cuda.get_arch_list() (child);
  - the bitsandbytes library qdoctor predicts (`selected`) vs the one that really loaded;
  - NVML compute capabilities vs torch.cuda.get_device_capability();
  - every libbitsandbytes_cuda*.so (and libtorch_cuda.so) vs `cuobjdump --list-elf/--list-ptx`, if found.
Prints one line per comparison (MATCH / DIFF) and exits 1 on any DIFF.

    python scripts/verify_facts_gpu.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys

from qdoctor.facts import collect, elf


def cuobjdump_archs(tool: str, path: str) -> tuple[list[str], list[str]] | None:
    def listing(flag):
        try:
            out = subprocess.run([tool, flag, path], capture_output=True, text=True, timeout=600).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        return sorted({f"sm_{m}" for m in re.findall(r"\.sm_(\d+)[a-z]?\.", out)}, key=lambda a: int(a[3:]))

    sass, ptx = listing("--list-elf"), listing("--list-ptx")
    return None if sass is None else (sass, ptx or [])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the deep facts snapshot here")
    args = ap.parse_args(argv)
    facts = collect(deep=True, timeout=300, refresh=True)
    diffs = 0

    def report(what, ours, theirs):
        nonlocal diffs
        ok = ours == theirs
        diffs += not ok
        print(f"{'MATCH' if ok else 'DIFF '}  {what}: qdoctor={ours} reference={theirs}")

    t = facts["torch"]
    rt = t.get("runtime_arch_list") or []
    static = None
    if t.get("path") and t.get("cuda"):
        from qdoctor.facts.torch_build import scan_arch

        scanned = scan_arch(os.path.join(t["path"], "lib"))
        static = scanned and scanned["arch_list"]
        if scanned:
            print(f"       torch fatbin SM container counts: {scanned['arch_counts']}")
    report("torch SASS archs (fatbin vs get_arch_list)", static, [a for a in rt if a.startswith("sm_")])

    b = facts["bitsandbytes"]
    report("bitsandbytes library (predicted vs loaded)", b.get("selected"), b.get("library"))
    print(f"       bitsandbytes loads={b.get('loads')} error={b.get('error')!r}")

    gpus = facts["nvidia"].get("gpus") or []
    nv = {g["index"]: g.get("compute_capability") for g in gpus if g.get("visible")}
    tc = {d["index"]: d.get("capability") for d in t.get("devices") or []}
    report("compute capabilities (NVML visible vs torch)", sorted(nv.values()), sorted(tc.values()))

    tool = shutil.which("cuobjdump") or next(iter(sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"))), None)
    if tool is None:
        print("       cuobjdump not found: fatbin cross-check skipped")
    else:
        libs = sorted(glob.glob(os.path.join(b.get("path") or "/nonexistent", "libbitsandbytes_cuda*.so")))
        if t.get("path") and os.path.exists(os.path.join(t["path"], "lib", "libtorch_cuda.so")):
            libs.append(os.path.join(t["path"], "lib", "libtorch_cuda.so"))
        for lib in libs:
            ref = cuobjdump_archs(tool, lib)
            info = elf.inspect(lib)
            report(f"{os.path.basename(lib)} SASS (fatbin walk vs cuobjdump --list-elf)", info["archs"],
                   ref and ref[0])
            report(f"{os.path.basename(lib)} PTX (fatbin walk vs cuobjdump --list-ptx)", info["ptx"],
                   ref and ref[1])
    if args.json:
        from qdoctor.redact import redact_obj

        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"facts": redact_obj(facts)}, fh, indent=2)
    print(f"\n{diffs} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
