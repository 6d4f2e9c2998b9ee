"""bitsandbytes as shipped: its native libraries, their GPU code and dependencies, and the one it would load.

`select_library` mirrors bitsandbytes' own loader (cextension.py) as a pure function; which rule
applies to which release is data in matrix/bnb_loader.toml. Nothing here imports bitsandbytes.
"""

from __future__ import annotations

import os
import re

from qdoctor.facts import elf, libsearch
from qdoctor.facts.packages import site_dirs
from qdoctor.facts.torch_build import find_package

_LIB = re.compile(r"^libbitsandbytes_(?P<name>.+?)\.(?:so|dll|dylib)$")
_VERSION = re.compile(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", re.M)
BIG_FILE = 64 << 20  # inspect files above this through the cache; small ones are quicker to re-read


def load_rules() -> list[dict]:
    """matrix/bnb_loader.toml (through matrix.load's cache, which `check` reads anyway)."""
    from qdoctor import matrix

    return matrix.load()["bnb_loader"]["loader"]


def rule_for(version: str | None, rules: list[dict]) -> dict | None:
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if not version:
        return None
    try:
        v = Version(version)
    except InvalidVersion:
        return None
    for r in rules:
        if SpecifierSet(r["versions"]).contains(v, prereleases=True):
            return r
    return None


def _split(compact: str, hip: bool) -> tuple[int, int] | None:
    """'130' -> (13, 0); ROCm '72' -> (7, 2), '714' -> (7, 14) (cextension._split_cuda_version)."""
    if not compact.isdigit() or len(compact) < 2:
        return None
    return (int(compact[:1]), int(compact[1:])) if hip else (int(compact[:2]), int(compact[2:]))


def _version_tuple(text: str | None) -> tuple[int, int] | None:
    parts = (text or "").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return None


def select_library(bnb_version, torch_cuda, torch_hip, available, environ, rules, *, torch_installed=True,
                   cuda_available=None, highest_cc=None, torch_xpu=None) -> dict:
    """Which libbitsandbytes_* the installed bitsandbytes would load on this torch.

    `available`: shipped library names ('cuda130', 'cpu', 'rocm72', ...). `cuda_available`: False when
    torch cannot see a GPU (bitsandbytes then loads its CPU library), None when unknown (assume it can).
    Returns {'selected', 'selected_reason', 'selected_exists', 'override', 'error'}.
    """
    available = set(available)
    out = {"selected": None, "selected_reason": None, "selected_exists": None, "override": None,
           "error": None}
    if not torch_installed:
        out["selected_reason"] = "torch is not installed; bitsandbytes cannot load without it"
        return out
    rule = rule_for(bnb_version, rules)
    if rule is None:
        out["selected_reason"] = f"no loader rule known for bitsandbytes {bnb_version!r}"
        return out
    hip = bool(torch_hip)
    if torch_xpu and not torch_cuda and not hip:
        versioned = f"xpu{str(torch_xpu)[:4]}"
        name = versioned if versioned in available else "xpu"
        return {**out, "selected": name, "selected_exists": name in available,
                "selected_reason": f"torch is an XPU build ({torch_xpu})"}
    if not torch_cuda and not hip:
        return {**out, "selected": "cpu", "selected_exists": "cpu" in available,
                "selected_reason": "torch is a CPU-only build"}
    if cuda_available is False and rule.get("cpu_library_when_no_cuda", True):
        return {**out, "selected": "cpu", "selected_exists": "cpu" in available,
                "selected_reason": "torch cannot see a GPU, so bitsandbytes loads its CPU library"}
    prefix = "rocm" if hip else "cuda"
    runtime = _version_tuple(torch_hip if hip else torch_cuda)
    runtime_str = f"{runtime[0]}{runtime[1]}" if runtime else None
    suffix = ""
    below = rule.get("nocublaslt_below_cc")
    cc = _version_tuple(highest_cc)
    if below and not hip and cc and cc < _version_tuple(below):
        suffix = "_nocublaslt"
    var = rule.get("rocm_override") if hip else rule.get("override_var")
    value = environ.get(var) if var else None
    if value is not None and (rule.get("override_digits_only") or value != ""):
        out["override"] = value
        if rule.get("override_digits_only") and not value.isdigit():
            out["error"] = f"{var}={value!r}: value must be digits only (e.g. '124' for 12.4)"
            out["selected_reason"] = f"{var} is set to a non-digit value; the loader raises"
            out["selected_exists"] = False
            return out
        name = f"{prefix}{value}{suffix}"
        return {**out, "selected": name, "selected_exists": name in available,
                "selected_reason": f"{var}={value} overrides the automatic choice"}
    if runtime is None:
        what = "HIP" if hip else "CUDA"
        out["selected_reason"] = f"cannot parse torch's {what} version {torch_hip or torch_cuda!r}"
        return out
    exact = f"{prefix}{runtime_str}{suffix}"
    label = f"torch {'ROCm' if hip else 'CUDA'} {runtime[0]}.{runtime[1]}"
    if exact in available or rule["strategy"] == "exact":
        return {**out, "selected": exact, "selected_exists": exact in available,
                "selected_reason": f"exact match for {label}" if exact in available
                else f"bitsandbytes {bnb_version} needs the exact library for {label}; it does not ship it"}
    shipped = {}
    for name in available:
        if name.startswith(prefix):
            v = _split(name[len(prefix):], hip)
            if v:
                shipped[v] = name
    lower = [v for v in shipped if v[0] == runtime[0] and v < runtime]
    higher = [v for v in shipped if v[0] == runtime[0] and v > runtime]
    if lower:
        v = max(lower)
        reason = f"no library for {label}; the highest lower one of the same major ({v[0]}.{v[1]})"
    elif higher:
        v = min(higher)
        reason = f"no library for {label}; the lowest higher one of the same major ({v[0]}.{v[1]})"
    else:
        return {**out, "selected": exact, "selected_exists": False,
                "selected_reason": f"no library of the same major as {label} (never across majors)"}
    return {**out, "selected": shipped[v], "selected_exists": True, "selected_reason": reason}


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
        m = _LIB.match(fname)
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


def collect(paths=None, packages=None, environ=None, rules=None) -> dict:
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
    sel = select_library(bnb.get("version"), torch.get("cuda"), torch.get("hip"),
                         list(bnb.get("binaries") or ()),
                         environ, rules if rules is not None else load_rules(),
                         torch_installed=bool(torch.get("installed")), cuda_available=cuda_available,
                         highest_cc=highest_cc, torch_xpu=torch.get("xpu"))
    out = dict(bnb)
    out.update(sel)
    if sel.get("error") and not bnb.get("error"):
        out["error"] = sel["error"]
    return out
