"""Would the dynamic loader find a library's DT_NEEDED entries? Answered without loading anything.

Mirrors glibc's search (ld.so(8)): DT_RPATH (when there is no DT_RUNPATH), LD_LIBRARY_PATH,
DT_RUNPATH, /etc/ld.so.cache, then the default directories; `$ORIGIN` is the library's own
directory. Two additions describe how bitsandbytes is really loaded: torch has already loaded the
CUDA runtime from the nvidia-* pip wheels (site-packages/nvidia/*/lib) and its own torch/lib, so
those directories count as found too.
"""

from __future__ import annotations

import functools
import glob
import os
import struct
import subprocess
import sys

LD_CACHE = "/etc/ld.so.cache"
_NEW_MAGIC = b"glibc-ld.so.cache1.1"


def parse_ld_cache(data: bytes) -> dict[str, list[str]]:
    """soname -> paths from the binary /etc/ld.so.cache (the new glibc format, alone or after the old one)."""
    at = data.find(_NEW_MAGIC)
    if at < 0:
        return {}
    nlibs, _strlen = struct.unpack_from("<II", data, at + 20)
    out: dict[str, list[str]] = {}
    base = at + 48
    for i in range(nlibs):
        off = base + 24 * i
        if off + 24 > len(data):
            break
        _flags, key, value = struct.unpack_from("<iII", data, off)

        def s(o):
            o += at
            return data[o:data.index(b"\0", o)].decode("utf-8", "replace")

        try:
            out.setdefault(s(key), []).append(s(value))
        except ValueError:
            break
    return out


@functools.lru_cache(maxsize=4)
def ld_cache(path: str = LD_CACHE, timeout: float = 2.0) -> dict[str, list[str]]:
    """The loader cache, from the file, else from `ldconfig -p` (short timeout); {} when neither works.
    Read once per process (several collectors ask); callers must not modify the result."""
    try:
        with open(path, "rb") as fh:
            parsed = parse_ld_cache(fh.read())
        if parsed:
            return parsed
    except OSError:
        pass
    out: dict[str, list[str]] = {}
    for exe in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            text = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=timeout).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in text.splitlines():
            if "=>" in line:
                left, right = line.split("=>", 1)
                out.setdefault(left.strip().split(" ")[0], []).append(right.strip())
        return out
    return out


def default_dirs() -> list[str]:
    multiarch = getattr(sys.implementation, "_multiarch", None)
    dirs = ["/lib64", "/usr/lib64", "/lib", "/usr/lib"]
    if multiarch:
        dirs = [f"/lib/{multiarch}", f"/usr/lib/{multiarch}", *dirs]
    return dirs


def wheel_lib_dirs(site_dirs) -> list[str]:
    """Library dirs of the nvidia-* CUDA wheels and torch/lib: loaded by `import torch` before bnb."""
    out = []
    for site in site_dirs:
        if not site or not os.path.isdir(site):
            continue
        out += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib")))
        out += sorted(glob.glob(os.path.join(site, "nvidia", "*", "*", "lib")))
        if os.path.isdir(os.path.join(site, "torch", "lib")):
            out.append(os.path.join(site, "torch", "lib"))
    return out


def _expand(dirs, origin):
    return [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in dirs]


def search_dirs(origin: str, rpath, runpath, ld_library_path: str | None, extra_dirs=()) -> list[str]:
    """The directories glibc would try for one library, in order, before the cache."""
    dirs = [] if runpath else _expand(rpath, origin)
    dirs += [d for d in (ld_library_path or "").split(":") if d]
    dirs += _expand(runpath, origin)
    dirs += list(extra_dirs)
    return dirs


def missing(needed, dirs, cache: dict, defaults=None, exists=os.path.exists) -> list[str]:
    """DT_NEEDED names that none of `dirs`, the loader cache or the default dirs provide."""
    defaults = default_dirs() if defaults is None else defaults
    out = []
    for name in needed:
        if "/" in name:
            if not exists(name):
                out.append(name)
            continue
        if name in cache and any(exists(p) for p in cache[name]):
            continue
        if any(exists(os.path.join(d, name)) for d in (*dirs, *defaults)):
            continue
        out.append(name)
    return out
