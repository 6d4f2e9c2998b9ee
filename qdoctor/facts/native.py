"""Which libstdc++ a Python process here loads first, and the newest GLIBCXX/CXXABI versions it provides.

Native libraries (bitsandbytes', torch's, flash-attn's) record the libstdc++ versions they need in
.gnu.version_r (facts.elf.version_needs); whether they load depends on the *first* libstdc++.so.6 the
process maps, since a soname is loaded once. That is LD_LIBRARY_PATH's, else a conda environment's own
(its python carries RPATH $ORIGIN/../lib, and conda packages load it early), else the system's. Read from
the file's .gnu.version_d; nothing is loaded.
"""

from __future__ import annotations

import os
import re
import sys

from qdoctor.facts import elf, libsearch

SONAME = "libstdc++.so.6"
# CUDA libraries torch loads from the pip nvidia-* wheels, which a directory on LD_LIBRARY_PATH can shadow
CUDA_SONAME = re.compile(r"^lib(cudart|cublas|cublasLt|cusparse|nvJitLink|cufft|curand|cusolver|cudnn|nccl)"
                         r"\.so\.\d+$")
_FILE_VERSION = re.compile(r"\.so\.(\d+(?:\.\d+)+)$")


def conda_prefix(executable: str | None, environ) -> str | None:
    """The conda environment this interpreter belongs to (its prefix has conda-meta/), if any."""
    cands = []
    if executable:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(executable))))
        cands.append(os.path.dirname(os.path.dirname(executable)))
    if environ.get("CONDA_PREFIX"):
        cands.append(environ["CONDA_PREFIX"])
    for c in cands:
        if os.path.isdir(os.path.join(c, "conda-meta")):
            return c
    return None


def resolve_libstdcxx(environ, ld_cache: dict, executable: str | None = None,
                      defaults=None) -> tuple[str, str] | None:
    """(path, origin) of the libstdc++.so.6 loaded first; origin: LD_LIBRARY_PATH, conda or system."""
    for d in (environ.get("LD_LIBRARY_PATH") or "").split(":"):
        if d and os.path.exists(os.path.join(d, SONAME)):
            return os.path.join(d, SONAME), "LD_LIBRARY_PATH"
    prefix = conda_prefix(executable, environ)
    if prefix and os.path.exists(os.path.join(prefix, "lib", SONAME)):
        return os.path.join(prefix, "lib", SONAME), "conda"
    for p in ld_cache.get(SONAME, []):
        if os.path.exists(p):
            return p, "system"
    for d in libsearch.default_dirs() if defaults is None else defaults:
        if os.path.exists(os.path.join(d, SONAME)):
            return os.path.join(d, SONAME), "system"
    return None


def _file_version(path: str) -> str | None:
    """libnvJitLink.so.12 -> its target libnvJitLink.so.12.1.105 -> '12.1.105' (None for a plain file)."""
    m = _FILE_VERSION.search(os.path.basename(os.path.realpath(path)))
    return m.group(1) if m else None


def shadowed_cuda_libs(environ, wheel_dirs) -> list[dict]:
    """CUDA libraries in LD_LIBRARY_PATH directories that the pip nvidia-* wheels also ship: the loader
    takes LD_LIBRARY_PATH's copy before torch's RUNPATH, whatever its version."""
    in_wheels: dict[str, str] = {}
    for d in wheel_dirs:
        try:
            for n in os.listdir(d):
                if CUDA_SONAME.match(n):
                    in_wheels.setdefault(n, os.path.join(d, n))
        except OSError:
            continue
    out = []
    for d in (environ.get("LD_LIBRARY_PATH") or "").split(":"):
        if not d or not os.path.isdir(d) or d in wheel_dirs:
            continue
        try:
            names = sorted(n for n in os.listdir(d) if CUDA_SONAME.match(n))
        except OSError:
            continue
        for n in names:
            if n in in_wheels and not any(x["soname"] == n for x in out):
                path = os.path.join(d, n)
                out.append({"soname": n, "path": path, "version": _file_version(path),
                            "wheel_path": in_wheels[n], "wheel_version": _file_version(in_wheels[n])})
    return out


def nvjitlink_check(environ, wheel_dirs, ld_cache: dict) -> dict | None:
    """Does the libnvJitLink that loads define every __nvJitLink* symbol the wheels' libcusparse needs?
    (libcusparse.so.12 from CUDA 12.4 needs __nvJitLinkComplete_12_4, which a 12.1 libnvJitLink lacks.)"""
    cusparse = next((os.path.join(d, n) for d in wheel_dirs if os.path.isdir(d)
                     for n in sorted(os.listdir(d)) if re.match(r"^libcusparse\.so\.\d+$", n)), None)
    if cusparse is None:
        return None
    fd = os.open(cusparse, os.O_RDONLY)
    try:
        info = elf._read_elf(fd)
        _, needed = elf.dynamic_symbols(fd, info, ("__nvJitLink",))
        sonames = [n for n in info["needed"] if n.startswith("libnvJitLink.so")]
    finally:
        os.close(fd)
    if not needed or not sonames:
        return None
    so = sonames[0]
    where = None
    for d in (environ.get("LD_LIBRARY_PATH") or "").split(":"):
        if d and os.path.exists(os.path.join(d, so)):
            where = (os.path.join(d, so), "wheel" if d in wheel_dirs else "LD_LIBRARY_PATH")
            break
    if where is None:
        for d in wheel_dirs:
            if os.path.exists(os.path.join(d, so)):
                where = (os.path.join(d, so), "wheel")
                break
    if where is None:
        hits = [p for p in ld_cache.get(so, []) if os.path.exists(p)]
        where = (hits[0], "system") if hits else None
    out = {"cusparse": cusparse, "needed": sorted(needed), "nvjitlink": None, "origin": None, "missing": None}
    if where:
        fd = os.open(where[0], os.O_RDONLY)
        try:
            defined, _ = elf.dynamic_symbols(fd, elf._read_elf(fd), ("__nvJitLink",))
        finally:
            os.close(fd)
        out.update(nvjitlink=where[0], origin=where[1], version=_file_version(where[0]),
                   missing=sorted(needed - defined))
    return out


def python_headers() -> bool | None:
    """Is Python.h there for this interpreter (Triton and source builds compile against it)?"""
    import sysconfig

    inc = sysconfig.get_paths().get("include")
    return os.path.exists(os.path.join(inc, "Python.h")) if inc else None


def collect(environ=None, ld_cache=None, executable=None, paths=None) -> dict:
    environ = os.environ if environ is None else environ
    found = resolve_libstdcxx(environ, libsearch.ld_cache() if ld_cache is None else ld_cache,
                              sys.executable if executable is None else executable)
    out = {"libstdcxx": None}
    if found:
        path, origin = found
        entry = {"path": path, "origin": origin, "provides": None}
        try:
            entry["provides"] = elf.provided_versions(path)
        except (OSError, elf.ElfError) as e:
            entry["error"] = f"cannot read {path}: {e}"
        out["libstdcxx"] = entry
    from qdoctor.facts.packages import site_dirs

    wheel_dirs = [d for d in libsearch.wheel_lib_dirs(site_dirs(paths)) if os.sep + "nvidia" + os.sep in d]
    out["shadowed_cuda_libs"] = shadowed_cuda_libs(environ, wheel_dirs)
    out["python_headers"] = python_headers()  # the C compiler is platform.c_compiler
    try:
        out["nvjitlink"] = nvjitlink_check(environ, wheel_dirs, ld_cache if ld_cache is not None
                                           else libsearch.ld_cache())
    except (OSError, elf.ElfError) as e:
        out["nvjitlink"] = {"error": f"{type(e).__name__}: {e}"}
    return out
