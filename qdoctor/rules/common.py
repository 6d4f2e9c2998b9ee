"""Shared helpers for rules: tolerant parsing of facts, and lookups in the matrix tables.

Every helper returns None for "unknown" instead of raising, because a missing fact is never bad:
a rule that cannot decide stays silent.
"""

from __future__ import annotations

import functools
import re

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from qdoctor import bnb_loader, devices
from qdoctor.arch import arch_runs, arch_span, cc_tuple, sm  # noqa: F401 - re-exported for the rules
from qdoctor.devices import all_gpus  # noqa: F401 - re-exported for the rules

TORCH_INDEX = "https://download.pytorch.org/whl/{variant}"


# ---------------------------------------------------------------- versions
# Parsing is cached: a judge asks the same few dozen (version, specifier) questions thousands of times
# (pick_wheel walks every torch minor x wheel x driver mode), and a SpecifierSet costs ~20 us to build.
def version(s) -> Version | None:
    if not isinstance(s, str) or not s.strip():
        return None
    return _version(s.strip())


@functools.lru_cache(maxsize=2048)
def _version(s: str) -> Version | None:
    try:
        return Version(s)
    except InvalidVersion:
        m = re.match(r"\d+(\.\d+)*", s)
        try:
            return Version(m.group(0)) if m else None
        except InvalidVersion:
            return None


@functools.lru_cache(maxsize=1024)
def specifier(spec: str) -> SpecifierSet | None:
    try:
        return SpecifierSet(spec)
    except InvalidSpecifier:
        return None


def matches(ver, spec: str | None) -> bool | None:
    """Does version string `ver` satisfy SpecifierSet `spec`? None when either is unknown."""
    if not spec:
        return None
    if isinstance(ver, Version):
        ver = str(ver)
    if not isinstance(ver, str):
        return None
    return _matches(ver.strip(), spec)


@functools.lru_cache(maxsize=8192)
def _matches(ver: str, spec: str) -> bool | None:
    v, sp = version(ver), specifier(spec)
    if v is None or sp is None:
        return None
    return sp.contains(Version(v.public), prereleases=True)


def base(ver) -> str | None:
    """'2.11.0+cu130' -> '2.11.0'."""
    v = version(ver)
    return v.base_version if v else None


def minor(ver) -> str | None:
    """'2.11.0+cu130' -> '2.11'."""
    v = version(ver)
    return f"{v.major}.{v.minor}" if v else None


def int_tuple(s) -> tuple[int, ...] | None:
    """Driver versions like '580.159.04' -> (580, 159, 4)."""
    if not isinstance(s, str):
        return None
    parts = re.findall(r"\d+", s)
    return tuple(int(p) for p in parts) if parts else None


def cuda_tuple(s) -> tuple[int, int] | None:
    """'12.6' / '12.6.77' / '126' (bnb lib style) -> (12, 6)."""
    if not isinstance(s, str) or not s:
        return None
    return _cuda_tuple(s)


@functools.lru_cache(maxsize=1024)
def _cuda_tuple(s: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"(\d+)\.(\d+)(\.\d+)?", s.strip())
    if m:
        return int(m.group(1)), int(m.group(2))
    m = re.fullmatch(r"(?:cuda|cu)?(\d{2,3})", s.strip())
    if m:
        d = m.group(1)
        return int(d[:-1]), int(d[-1])
    return None


def cuda_str(t) -> str:
    return f"{t[0]}.{t[1]}"


# ---------------------------------------------------------------- GPUs and architectures
def visible_gpus(facts: dict) -> list[dict]:
    """GPUs the training process will see, in CUDA ordinal order (qdoctor.devices decides)."""
    return list(devices.visible(facts).gpus)


def family(matrix: dict, cc) -> dict | None:
    c = cc_tuple(cc)
    if c is None:
        return None
    for f in (matrix.get("gpus") or {}).get("family", []):
        if cuda_str(c) in f.get("cc", []):
            return f
    # unknown minor: the family of the same major
    for f in (matrix.get("gpus") or {}).get("family", []):
        if any(cc_tuple(x) and cc_tuple(x)[0] == c[0] for x in f.get("cc", [])):
            return f
    return None


def cap(matrix: dict, key: str, default: str) -> tuple[int, int]:
    return cc_tuple(((matrix.get("gpus") or {}).get("capabilities") or {}).get(key, default)) or cc_tuple(
        default
    )


# ---------------------------------------------------------------- driver
def is_windows(facts: dict) -> bool:
    return ((facts.get("platform") or {}).get("system") or "").lower() == "windows"


def driver_min(matrix: dict, cuda, windows: bool = False) -> str | None:
    """Minimum driver for a CUDA runtime (exact toolkit row), or None if the table has no row."""
    c = cuda_tuple(cuda) if not isinstance(cuda, tuple) else cuda
    key = "windows_min" if windows else "linux_min"
    for row in (matrix.get("cuda_drivers") or {}).get("cuda", []):
        if cuda_tuple(row.get("version")) == c:
            return row.get(key)
    return None


def compat_floor(matrix: dict, major: int, windows: bool = False) -> str | None:
    key = "windows_min" if windows else "linux_min"
    for row in (matrix.get("cuda_drivers") or {}).get("minor_compat", []):
        if row.get("major") == major:
            return row.get(key)
    return None


def driver_cuda(facts: dict, matrix: dict) -> tuple[int, int] | None:
    """The highest CUDA the driver supports: nvidia.cuda_driver, else derived from the driver version."""
    nv = facts.get("nvidia") or {}
    t = cuda_tuple(nv.get("cuda_driver"))
    if t:
        return t
    d = int_tuple(nv.get("driver"))
    if not d:
        return None
    win = is_windows(facts)
    best = None
    for row in (matrix.get("cuda_drivers") or {}).get("cuda", []):
        m = int_tuple(row.get("windows_min" if win else "linux_min"))
        c = cuda_tuple(row.get("version"))
        if m and c and d >= m and (best is None or c > best):
            best = c
    return best


def driver_runs(facts: dict, matrix: dict, cuda) -> str | None:
    """'full' if the driver supports runtime `cuda`, 'minor-compat' if only through minor-version
    compatibility, 'no' if not at all, None if unknown."""
    c = cuda_tuple(cuda) if not isinstance(cuda, tuple) else cuda
    dc = driver_cuda(facts, matrix)
    if c is None or dc is None:
        return None
    if dc >= c:
        return "full"
    if dc[0] == c[0]:
        d = int_tuple((facts.get("nvidia") or {}).get("driver"))
        floor = int_tuple(compat_floor(matrix, c[0], is_windows(facts)))
        if d is None or floor is None or d >= floor:
            return "minor-compat"
    return "no"


# ---------------------------------------------------------------- torch wheels
def torch_cuda(facts: dict) -> tuple[int, int] | None:
    return cuda_tuple((facts.get("torch") or {}).get("cuda"))


def torch_version(facts: dict) -> str | None:
    t = facts.get("torch") or {}
    return t.get("version") or (facts.get("packages") or {}).get("torch")


def wheels(matrix: dict) -> list[dict]:
    return [w for w in (matrix.get("torch_wheels") or {}).get("wheel", []) if w.get("variant") != "cpu"]


def wheels_for(matrix: dict, torch_ver) -> list[dict]:
    return [w for w in wheels(matrix) if matches(torch_ver, w.get("torch"))]


def cited(entry: dict) -> str:
    """How sure the matrix is of an entry, for the evidence: ' (matrix, confidence: inferred)'."""
    c = entry.get("confidence")
    return f" (matrix, confidence: {c})" if c else " (matrix)"


def wheel_entry(matrix: dict, torch_ver, cuda) -> dict | None:
    c = cuda_tuple(cuda) if not isinstance(cuda, tuple) else cuda
    for w in wheels_for(matrix, torch_ver):
        if cuda_tuple(w.get("cuda")) == c:
            return w
    return None


def torch_minors(matrix: dict) -> list[str]:
    """Every torch minor the matrix describes, newest first."""
    return list(_torch_minors(tuple(w.get("torch") or "" for w in wheels(matrix))))


@functools.lru_cache(maxsize=8)
def _torch_minors(specs: tuple[str, ...]) -> tuple[str, ...]:
    out = {f"2.{x}" for spec in set(specs) for x in range(0, 30) if matches(f"2.{x}.0", spec)}
    return tuple(sorted(out, key=lambda s: tuple(int(p) for p in s.split(".")), reverse=True))


def pick_wheel(facts: dict, matrix: dict, ccs, torch_ver=None, python=None, accept=None):
    """The torch wheel to recommend: prefer the installed torch minor, then newer ones, then older ones;
    within one minor the highest CUDA the driver fully supports, else one it runs by minor-version
    compatibility. Every GPU in `ccs` must be covered, and `accept(wheel)` hold when given.
    Returns (wheel, torch_minor, driver_mode) or None."""
    minors = torch_minors(matrix)
    cur = minor(torch_ver) if torch_ver else None
    order = ([cur] if cur in minors else []) + [m for m in minors if m != cur]
    if cur in minors:
        newer = [m for m in minors if version(m) > version(cur)]
        older = [m for m in minors if version(m) < version(cur)]
        order = [cur] + sorted(newer, key=version) + older
    for m in order:
        for strict in (True, False):  # cubins for every GPU first; PTX-only (JIT) coverage second
            for mode in ("full", "minor-compat"):
                cands = []
                for w in wheels_for(matrix, m + ".0"):
                    if python and matches(python, w.get("python")) is False:
                        continue
                    ptx = [] if strict else w.get("ptx")
                    if not all(arch_runs(cc, w.get("sass"), ptx) for cc in ccs):
                        continue
                    if accept is not None and not accept(w):
                        continue
                    runs = driver_runs(facts, matrix, w.get("cuda"))
                    if runs is None and mode == "full" or runs == mode:
                        cands.append(w)
                if cands:  # fully supported: the newest CUDA; by minor-version compat: the nearest one
                    pick = max if mode == "full" else min
                    w = pick(cands, key=lambda w: cuda_tuple(w.get("cuda")))
                    return w, m, mode
    return None


def pip_torch(w: dict, torch_minor: str, installed=None) -> str:
    """A paste-able command that really switches the wheel: pinning the local version (+cu126) makes pip
    replace an installed 2.11.0+cu130, which a plain `torch==2.11.*` would leave in place."""
    url = TORCH_INDEX.format(variant=w["variant"])
    b = base(installed)
    if b and minor(installed) == torch_minor:
        return f"pip install 'torch=={b}+{w['variant']}' --index-url {url}"
    return f"pip install 'torch=={torch_minor}.*' --index-url {url}"


# ---------------------------------------------------------------- bitsandbytes
def bnb(facts: dict) -> dict:
    return facts.get("bitsandbytes") or {}


def bnb_version(facts: dict) -> str | None:
    return bnb(facts).get("version") or (facts.get("packages") or {}).get("bitsandbytes")


def bnb_release(matrix: dict, ver) -> dict | None:
    for r in (matrix.get("bitsandbytes") or {}).get("release", []):
        if matches(ver, r.get("versions")):
            return r
    return None


def bnb_feature(matrix: dict, key: str, default: str) -> str:
    return ((matrix.get("bitsandbytes") or {}).get("features") or {}).get(key, default)


def bnb_libs(facts: dict, matrix: dict, ver=None) -> list[str] | None:
    """CUDA libraries shipped: from facts (bitsandbytes.binaries) if known, else from the matrix."""
    b = bnb(facts)
    bins = b.get("binaries")
    if isinstance(bins, dict) and bins:
        return sorted((k for k in bins if cuda_tuple(k) and k.startswith("cuda")), key=cuda_tuple)
    r = bnb_release(matrix, ver or bnb_version(facts))
    return list(r.get("cuda_libs", [])) if r else None


def bnb_pick(matrix: dict, ver, libs, cuda) -> str | None:
    """The CUDA library bitsandbytes `ver` would load for torch CUDA `cuda` (no override), or None:
    qdoctor.bnb_loader decides, as it does for the facts."""
    return bnb_loader.pick(ver, libs, cuda, bnb_loader.rules(matrix))


def bnb_lib_archs(facts: dict, matrix: dict, lib: str, machine=None):
    """(sass, ptx, origin) of one bnb library: read from the binary (facts) when known, else the matrix."""
    bins = bnb(facts).get("binaries")
    if isinstance(bins, dict) and isinstance(bins.get(lib), dict):
        entry = bins[lib]
        if entry.get("archs") is not None:
            return list(entry.get("archs") or []), list(entry.get("ptx") or []), "read from the library"
    ver = bnb_version(facts)
    machine = machine or (facts.get("platform") or {}).get("machine") or "x86_64"
    for a in (matrix.get("bitsandbytes") or {}).get("libarchs", []):
        if (
            lib in a.get("libs", [])
            and matches(ver, a.get("versions"))
            and a.get("machine") in (machine, None)
        ):
            return list(a.get("sass", [])), list(a.get("ptx", [])), "from the matrix"
    return None, None, None


def first_bnb_with_lib(matrix: dict, cuda) -> str | None:
    """The first bitsandbytes release whose loader finds a library for torch CUDA `cuda`."""
    best = None
    for r in (matrix.get("bitsandbytes") or {}).get("release", []):
        lo = [sp.version for sp in SpecifierSet(r["versions"]) if sp.operator in (">=", "==")]
        v = version(lo[0].replace(".*", ".0")) if lo else None
        if v and bnb_pick(matrix, str(v), r.get("cuda_libs"), cuda) and (best is None or v < best):
            best = v
    return str(best) if best else None


def python_version(facts: dict) -> str | None:
    return (facts.get("platform") or {}).get("python")


def pkg(facts: dict, name: str) -> str | None:
    return (facts.get("packages") or {}).get(name)


def gib(mib) -> str:
    return f"{round(mib / 1024)} GiB" if isinstance(mib, (int, float)) else "? GiB"


def group_label(gpus: list[dict]) -> str:
    """'GPU 0, 1 (Tesla T4, sm_75)' or 'GPU 0 (Tesla V100, sm_70), GPU 1 (…)'."""
    keys = {}
    for g in gpus:
        keys.setdefault((g.get("name") or "unknown GPU", sm(g.get("compute_capability"))), []).append(g)
    parts = []
    for (name, arch), gs in keys.items():
        idx = ", ".join(str(g.get("index", "?")) for g in gs)
        parts.append(f"GPU {idx} ({name}, {arch})")
    return "; ".join(parts)
