"""bitsandbytes as shipped: its native libraries, their GPU code and dependencies, and the one it would load.

This module records what is shipped and the environment; which library the loader picks from them is
decided by qdoctor.bnb_loader (one function, shared with the rules). Nothing here imports bitsandbytes.
"""

from __future__ import annotations

import os
import re

from qdoctor.bnb_loader import LIB_RE, select_library
from qdoctor.facts import elf, libsearch
from qdoctor.facts.packages import site_dirs
from qdoctor.facts.torch_build import find_package

_VERSION = re.compile(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", re.M)
BIG_FILE = 64 << 20  # inspect files above this through the cache; small ones are quicker to re-read


def package_version(pkg_dir: str) -> str | None:
    for fname in ("__init__.py", "_version.py"):
        try:
            with open(os.path.join(pkg_dir, fname), encoding="utf-8", errors="replace") as fh:
                m = _VERSION.search(fh.read())
        except OSError:
            continue
        if m:
            return m.group(1)
    return None


def scan_binaries(pkg_dir: str, search_paths, environ, ld_cache=None) -> dict:
    """{name: {'archs', 'ptx', 'missing_deps'}} for every shipped libbitsandbytes_*."""
    out = {}
    cache = ld_cache if ld_cache is not None else libsearch.ld_cache()
    extra = libsearch.wheel_lib_dirs(search_paths)
    try:
        files = sorted(os.listdir(pkg_dir))
    except OSError:
        return out
    for fname in files:
        m = LIB_RE.match(fname)
        if not m:
            continue
        path = os.path.join(pkg_dir, fname)
        name = m.group("name")
        entry = {"archs": None, "ptx": None, "missing_deps": None}
        try:
            big = os.path.getsize(path) > BIG_FILE
            info = elf.inspect_cached(path) if big else elf.inspect(path)
        except (OSError, elf.ElfError) as e:
            entry["error"] = f"cannot read {fname}: {e}"
            out[name] = entry
            continue
        entry["requires_versions"] = info.get("requires_versions")
        if info["has_fatbin"]:
            entry["archs"], entry["ptx"] = info["archs"], info["ptx"]
        elif name.startswith("cpu"):
            entry["archs"], entry["ptx"] = [], []
        dirs = libsearch.search_dirs(pkg_dir, info["rpath"], info["runpath"], environ.get("LD_LIBRARY_PATH"),
                                     extra)
        entry["missing_deps"] = libsearch.missing(info["needed"], dirs, cache)
        out[name] = entry
    return out


def wheel_tag(pkg_dir: str, version: str | None) -> str | None:
    """The installed wheel's tag (dist-info/WHEEL 'Tag:'): 'py3-none-manylinux_2_24_aarch64' for a PyPI wheel,
    'cp310-cp310-linux_aarch64' for a local or Jetson build; None when unknown."""
    site = os.path.dirname(pkg_dir)
    names = [f"bitsandbytes-{version}.dist-info"] if version else []
    try:
        names += [n for n in os.listdir(site) if n.startswith("bitsandbytes-") and n.endswith(".dist-info")]
    except OSError:
        return None
    for n in names:
        try:
            with open(os.path.join(site, n, "WHEEL"), encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    if line.startswith("Tag:"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            continue
    return None


def collect(paths=None, packages=None, environ=None) -> dict:
    """The static part; `select` (below) is applied once torch and nvidia facts are known."""
    environ = os.environ if environ is None else environ
    out = {"installed": False, "version": (packages or {}).get("bitsandbytes"), "path": None, "binaries": {},
           "selected": None, "selected_reason": None, "selected_exists": None, "override": None,
           "loads": None, "error": None}
    pkg_dir = find_package("bitsandbytes", paths)
    if pkg_dir is None:
        out["installed"] = out["version"] is not None
        if out["installed"]:
            out["error"] = "bitsandbytes is listed as installed but its package directory was not found"
        return out
    out["installed"] = True
    out["path"] = pkg_dir
    out["version"] = out["version"] or package_version(pkg_dir)
    out["binaries"] = scan_binaries(pkg_dir, site_dirs(paths), environ)
    out["wheel_tag"] = wheel_tag(pkg_dir, out["version"])
    return out


def select(bnb: dict, torch: dict, environ, cuda_available=None, highest_cc=None, rules=None) -> dict:
    if not bnb.get("installed"):
        return bnb
    if rules is None:
        from qdoctor import bnb_loader, matrix

        rules = bnb_loader.rules(matrix.load())
    sel = select_library(bnb.get("version"), torch.get("cuda"), torch.get("hip"),
                         list(bnb.get("binaries") or ()), environ, rules,
                         torch_installed=bool(torch.get("installed")), cuda_available=cuda_available,
                         highest_cc=highest_cc, torch_xpu=torch.get("xpu"))
    out = dict(bnb)
    out.update(sel)
    if sel.get("error") and not bnb.get("error"):
        out["error"] = sel["error"]
    return out
