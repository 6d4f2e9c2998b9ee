"""Native-library rules (QD104, QD105, QD506, QD609): will the shared libraries of torch and bitsandbytes load
on this system? Judged from the ELF version needs read from the libraries themselves (facts), or from
matrix/native.toml for snapshots that do not carry them."""

from __future__ import annotations

import os
import re

from qdoctor.findings import Finding
from qdoctor.rules import rule
from qdoctor.rules.common import (
    bnb,
    bnb_version,
    matches,
    python_version,
    torch_minors,
    torch_version,
    wheels,
)


def vt(v) -> tuple[int, ...] | None:
    if not isinstance(v, str):
        return None
    parts = re.findall(r"\d+", v)
    return tuple(int(p) for p in parts) if parts else None


def _native(matrix) -> dict:
    return matrix.get("native") or {}


def _glibc(facts) -> str | None:
    m = re.match(r"glibc\s+(\d+\.\d+)", (facts.get("platform") or {}).get("libc") or "")
    return m.group(1) if m else None


def _bnb_needs(facts, matrix, family: str) -> tuple[str, str] | None:
    """(library label, version) the library bitsandbytes loads needs of `family` (GLIBC, GLIBCXX)."""
    b = bnb(facts)
    sel = b.get("selected")
    if not sel or not b.get("installed"):
        return None
    entry = (b.get("binaries") or {}).get(sel) or {}
    need = (entry.get("requires_versions") or {}).get(family)
    if need is None and family == "GLIBC":
        for row in _native(matrix).get("glibc_needs", []):
            if row.get("package") == "bitsandbytes" and sel in row.get("libs", []) and \
                    matches(bnb_version(facts), row.get("versions")):
                need = row["glibc"]
    return (f"libbitsandbytes_{sel} (bitsandbytes {bnb_version(facts)})", need) if need else None


def _torch_needs(facts, family: str) -> tuple[str, str] | None:
    need = ((facts.get("torch") or {}).get("requires_versions") or {}).get(family)
    return (f"torch {torch_version(facts)}", need) if need else None


def _without_dir(facts, d: str) -> str:
    parts = [p for p in ((facts.get("env") or {}).get("LD_LIBRARY_PATH") or "").split(":") if p]
    return ":".join(p for p in parts if p.rstrip("/") != d.rstrip("/"))


@rule("QD104", "glibc-too-old", "platform")
def glibc_too_old(facts, matrix):
    """A native library of the stack needs a newer glibc than this system has (its .gnu.version_r names
    GLIBC_x.y): loading it fails with "version `GLIBC_2.34' not found (required by
    ...libbitsandbytes_cuda126.so)". bitsandbytes 0.45.4-0.45.5's cuda126/cuda128 libraries need 2.34
    although the wheel is tagged manylinux_2_24. Error, with a release whose libraries need less, or an
    OS image that has it."""
    have = _glibc(facts)
    if not have:
        return []
    bad = [x for x in (_bnb_needs(facts, matrix, "GLIBC"), _torch_needs(facts, "GLIBC"))
           if x and vt(x[1]) > vt(have)]
    if not bad:
        return []
    need = max((x[1] for x in bad), key=vt)
    fixes = []
    if any(w.startswith("libbitsandbytes") for w, _ in bad):
        ok = [r for r in _native(matrix).get("glibc_needs", []) if r.get("package") == "bitsandbytes"
              and vt(r["glibc"]) <= vt(have) and r["versions"].startswith("==")]
        if ok:
            v = ok[-1]["versions"][2:]
            low = ok[-1]["glibc"]
            fixes.append(f"pip install -U 'bitsandbytes>={v}'  # its libraries need glibc <= {low}")
    images = [r for r in _native(matrix).get("os_glibc", []) if vt(r["glibc"]) >= vt(need)]
    if images:
        fixes.append("or use a newer OS / container image: "
                     + ", ".join(f"{r['image']} (glibc {r['glibc']})" for r in images[:3]))
    ev = [f"platform.libc = glibc {have}"] + [f"{w} needs GLIBC_{v} (.gnu.version_r)" for w, v in bad]
    ev.append(f"error users see: version `GLIBC_{need}' not found (required by ...)")
    return [Finding("QD104", "error", f"{bad[0][0]} needs glibc {bad[0][1]}, this system has {have}", ev,
                    "\n".join(fixes) or f"use an OS with glibc >= {need}", "platform")]


@rule("QD105", "libstdcxx-too-old", "platform")
def libstdcxx_too_old(facts, matrix):
    """A native library of the stack needs a newer libstdc++ (GLIBCXX_x.y.z / CXXABI) than the one this
    process loads first: often a conda environment's own old libstdc++, or one on LD_LIBRARY_PATH, in front
    of a newer system one ("version `GLIBCXX_3.4.32' not found"). Error, with the fix for where that
    libstdc++ comes from."""
    lib = (facts.get("native") or {}).get("libstdcxx") or {}
    provides = lib.get("provides") or {}
    bad = []
    for fam in ("GLIBCXX", "CXXABI"):
        have = provides.get(fam)
        if not have:
            continue
        for x in (_bnb_needs(facts, matrix, fam), _torch_needs(facts, fam)):
            if x and vt(x[1]) > vt(have):
                bad.append((x[0], f"{fam}_{x[1]}", fam, x[1]))
    if not bad:
        return []
    path, origin = lib.get("path"), lib.get("origin")
    need = max((b[3] for b in bad if b[2] == "GLIBCXX"), key=vt, default=None)
    gcc = next((r["gcc"] for r in sorted(_native(matrix).get("libstdcxx", []), key=lambda r: vt(r["glibcxx"]))
                if need and vt(r["glibcxx"]) >= vt(need)), None)
    if origin == "conda":
        fix = f"conda install -c conda-forge 'libstdcxx-ng>={gcc or '13'}'  # the environment's own libstdc++"
    elif origin == "LD_LIBRARY_PATH":
        d = os.path.dirname(path or "")
        fix = f"export LD_LIBRARY_PATH={_without_dir(facts, d)}  # drop {d}: its libstdc++ is older"
    else:
        fix = (f"install the libstdc++ of GCC >= {gcc or '13'} (Ubuntu: sudo apt-get install -y libstdc++6 "
               "from the ubuntu-toolchain-r PPA), or use a newer OS / container image")
    ev = [f"libstdc++ loaded first: {path} ({origin}), provides GLIBCXX_{provides.get('GLIBCXX')}, "
          f"CXXABI_{provides.get('CXXABI')}"]
    ev += [f"{w} needs {name}" for w, name, _, _ in bad]
    return [Finding("QD105", "error", f"{bad[0][0]} needs {bad[0][1]}, which the libstdc++ at {path} lacks",
                    ev, fix, "platform")]


def _jitlink_need(missing) -> str | None:
    vs = [m.group(1).replace("_", ".") for s in missing or [] if (m := re.search(r"_(\d+_\d+)$", s))]
    return max(vs, key=vt) if vs else None


@rule("QD609", "cuda-libs-shadowed", "environment")
def cuda_libs_shadowed(facts, matrix):
    """A CUDA library on LD_LIBRARY_PATH (or the system's) shadows the one from the pip nvidia-* wheels torch
    was built against: the loader takes LD_LIBRARY_PATH before torch's RUNPATH. An older libnvJitLink breaks
    `import torch` ("libcusparse.so.12: undefined symbol: __nvJitLinkComplete_12_4, version
    libnvJitLink.so.12"): checked symbol by symbol (error). Other shadowed libraries older than their wheel:
    warning."""
    nat = facts.get("native") or {}
    nj = nat.get("nvjitlink") or {}
    out = []
    if nj.get("missing") and nj.get("origin") in ("LD_LIBRARY_PATH", "system"):
        d = os.path.dirname(nj.get("nvjitlink") or "")
        need = _jitlink_need(nj["missing"])
        ev = [f"pip wheel libcusparse ({nj.get('cusparse')}) needs {', '.join(nj['missing'][:3])}",
              f"libnvJitLink that loads first: {nj.get('nvjitlink')} ({nj.get('origin')}, "
              f"{nj.get('version') or 'version unknown'}) does not define it",
              f"error users see: libcusparse.so.12: undefined symbol: {nj['missing'][0]}, version "
              "libnvJitLink.so.12"]
        if nj["origin"] == "LD_LIBRARY_PATH":
            fix = (f"export LD_LIBRARY_PATH={_without_dir(facts, d)}  # drop {d}; torch brings its own "
                   "CUDA libraries")
        else:
            fix = f"pip install -U 'nvidia-nvjitlink-cu12>={need or '12'}'  # then the wheel's copy loads"
        out.append(Finding("QD609", "error", f"the libnvJitLink in {d} is older than the pip CUDA libraries "
                           "torch uses: `import torch` fails", ev, fix, "environment"))
    pk = facts.get("packages") or {}
    for s in nat.get("shadowed_cuda_libs") or []:
        base = s["soname"].split(".so")[0] + ".so"
        row = next((r for r in _native(matrix).get("cuda_wheel", []) if r["soname"] == base), None)
        dists = (row or {}).get("dists", [])
        wheel_v = s.get("wheel_version") or next((pk[d] for d in dists if d in pk), None)
        mine = s.get("version")
        if not (vt(mine) and vt(wheel_v) and vt(mine)[:2] < vt(wheel_v)[:2]):
            continue
        if out and base == "libnvJitLink.so":
            continue
        d = os.path.dirname(s["path"])
        out.append(Finding("QD609", "warning", f"LD_LIBRARY_PATH's {s['soname']} ({mine}) shadows the newer "
                           f"pip wheel's ({wheel_v})",
                           [f"{s['path']} -> {mine}", f"pip wheel: {s.get('wheel_path')} ({wheel_v})"],
                           f"export LD_LIBRARY_PATH={_without_dir(facts, d)}  # drop {d}", "environment"))
    return out


@rule("QD506", "nvidia-wheels-disagree", "packages")
def nvidia_wheels_disagree(facts, matrix):
    """The pip nvidia-* CUDA wheels disagree with each other: the installed nvidia-cusparse needs
    __nvJitLink* symbols of a newer CUDA than the installed nvidia-nvjitlink defines (one upgraded without
    the other): `import torch` fails with "undefined symbol: __nvJitLinkComplete_12_x". Error."""
    nj = (facts.get("native") or {}).get("nvjitlink") or {}
    if not nj.get("missing") or nj.get("origin") != "wheel":
        return []
    need = _jitlink_need(nj["missing"])
    pk = facts.get("packages") or {}
    dist = next((d for d in ("nvidia-nvjitlink-cu12", "nvidia-nvjitlink") if d in pk),
                "nvidia-nvjitlink-cu12")
    cus = next((f"{d} {pk[d]}" for d in ("nvidia-cusparse-cu12", "nvidia-cusparse") if d in pk),
               "nvidia-cusparse")
    return [Finding("QD506", "error",
                    f"{cus} needs nvJitLink {need or '?'}, but {dist} {pk.get(dist, '?')} is installed",
                    [f"{nj.get('cusparse')} needs {', '.join(nj['missing'][:3])}",
                     f"{nj.get('nvjitlink')} does not define it"],
                    f"pip install -U '{dist}>={need}'" if need else f"pip install -U {dist}", "packages")]


@rule("QD106", "python-without-wheels", "platform")
def python_without_wheels(facts, matrix):
    """No torch release in the matrix publishes wheels for this Python (too new, or too old): `pip install
    torch` fails with "No matching distribution found for torch". Error while torch is not installed (an
    installed torch evidently found a build)."""
    py = python_version(facts)
    if not py or (facts.get("torch") or {}).get("installed") or (facts.get("packages") or {}).get("torch"):
        return []
    ws = wheels(matrix)
    if not ws or any(matches(py, w.get("python")) for w in ws):
        return []
    newest = torch_minors(matrix)[:1]
    spans = sorted({w.get("python") for w in ws if newest and matches(newest[0] + ".0", w.get("torch"))})
    return [Finding("QD106", "error", f"no torch release publishes wheels for Python {py}",
                    [f"platform.python = {py}",
                     f"torch {newest[0] if newest else '?'} wheels: Python {', '.join(spans) or '?'}",
                     "error users see: ERROR: No matching distribution found for torch"],
                    "python3.12 -m venv ~/qlora && . ~/qlora/bin/activate  # a Python the stack ships wheels "
                    "for", "platform")]
