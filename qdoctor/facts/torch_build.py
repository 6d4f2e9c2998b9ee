"""What torch build is installed, read from its files: torch/version.py and the CUDA fatbinary.

Importing torch takes seconds and can crash; reading version.py as text and walking the
fatbinary headers of libtorch_cuda.so takes milliseconds (cached per file identity after that).
"""

from __future__ import annotations

import os
import re

from qdoctor.facts import elf

# libraries that hold torch's CUDA kernels (older wheels split libtorch_cuda into _cu/_cpp)
CUDA_LIBS = ("libtorch_cuda.so", "libtorch_cuda_cu.so", "libc10_cuda.so")
# an SM counts as a build target when at least this share of the kernel containers carry it; the
# rest are a few special kernels (e.g. sm_90a-only attention) that do not make the build "support" a GPU
TARGET_SHARE = 0.5

_ASSIGN = re.compile(r"^(?P<name>[A-Za-z_]\w*)\s*(?::[^=]+)?=\s*(?P<value>.+?)\s*$", re.M)


def find_package(name: str, paths=None) -> str | None:
    """Directory of a top-level package without importing it (find_spec on a top-level name doesn't)."""
    import importlib.machinery
    import importlib.util

    try:
        if paths is None:
            spec = importlib.util.find_spec(name)
        else:
            spec = importlib.machinery.PathFinder.find_spec(name, list(paths))
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locs = list(spec.submodule_search_locations or [])
    if locs:  # a str: an imported package's __path__ may hold PathLike entries (transformers' does)
        return os.fspath(locs[0])
    if spec.origin and os.path.basename(spec.origin) == "__init__.py":
        return os.path.dirname(spec.origin)
    return None


def parse_version_py(text: str) -> dict:
    """`__version__`, `cuda`, `hip`, ... from torch/version.py text; raises ValueError if it is not one."""
    out = {}
    for m in _ASSIGN.finditer(text):
        raw = m.group("value")
        if raw == "None":
            out[m.group("name")] = None
        elif len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
            out[m.group("name")] = raw[1:-1]
        elif raw in ("True", "False"):
            out[m.group("name")] = raw == "True"
    if not isinstance(out.get("__version__"), str):
        raise ValueError("torch/version.py has no __version__ string")
    return out


def build_targets(sass_counts: dict, containers: int) -> list[str]:
    """SMs carried by most kernel containers: the build's architecture list."""
    if not sass_counts:
        return []
    top = max(sass_counts.values())
    floor = max(1, int(TARGET_SHARE * top))
    return sorted((a for a, n in sass_counts.items() if n >= floor), key=lambda a: int(a.split("_")[1]))


def scan_arch(lib_dir: str) -> dict | None:
    """SASS/PTX targets of torch's CUDA libraries, or None when there is no ELF CUDA library to read."""
    counts: dict[str, int] = {}
    ptx: set[str] = set()
    containers = 0
    seen = []
    for name in CUDA_LIBS:
        path = os.path.join(lib_dir, name)
        if not os.path.exists(path):
            continue
        info = elf.inspect_cached(path)
        seen.append(name)
        containers += info.get("fatbin_containers") or 0
        for arch, n in (info.get("sass_counts") or {}).items():
            counts[arch] = counts.get(arch, 0) + n
        ptx.update(info.get("ptx") or [])
    if not seen:
        return None
    ptx_sorted = sorted(ptx, key=lambda a: int(a.split("_")[1]))
    return {"arch_list": build_targets(counts, containers), "ptx": ptx_sorted, "arch_counts": counts,
            "libraries": seen}


HOST_LIBS = ("libtorch_python.so", "libtorch_cpu.so", "libc10.so")


def requires_versions(lib_dir: str) -> dict | None:
    """The newest glibc / libstdc++ versions torch's own libraries need (.gnu.version_r), or None."""
    best: dict[str, str] = {}
    for name in HOST_LIBS + CUDA_LIBS:
        path = os.path.join(lib_dir, name)
        if not os.path.exists(path):
            continue
        for fam, ver in (elf.inspect_cached(path).get("requires_versions") or {}).items():
            if fam not in best or _vt(ver) > _vt(best[fam]):
                best[fam] = ver
    return best or None


def _vt(v: str) -> tuple:
    return tuple(int(x) for x in v.split(".") if x.isdigit())


NCCL_WHEELS = ("nvidia-nccl-cu13", "nvidia-nccl-cu12", "nvidia-nccl-cu11", "nvidia-nccl")
_LIBNCCL = re.compile(r"^libnccl\.so\.(\d+\.\d+\.\d+)$")


def nccl(packages: dict | None, lib_dir: str | None) -> dict | None:
    """The NCCL a CUDA torch will load, without importing it: the nvidia-nccl wheel its pip build depends on
    (its version is NCCL's), else a libnccl.so.X.Y.Z shipped in torch/lib. None when neither is there (a
    build that links NCCL statically: `check --deep` asks torch.cuda.nccl.version())."""
    for name in NCCL_WHEELS:
        v = (packages or {}).get(name)
        if v:
            return {"version": v, "source": f"{name} wheel"}
    try:
        names = sorted(os.listdir(lib_dir)) if lib_dir else []
    except OSError:
        names = []
    for f in names:
        m = _LIBNCCL.match(f)
        if m:
            return {"version": m.group(1), "source": f"torch/lib/{f}"}
    return None


def collect(paths=None, packages: dict | None = None) -> dict:
    out = {"installed": False, "version": None, "cuda": None, "hip": None, "xpu": None, "arch_list": None,
           "ptx": None, "cuda_available": None, "device_count": None, "bf16_supported": None, "error": None,
           "source": "static", "path": None}
    pkg_dir = find_package("torch", paths)
    meta_version = (packages or {}).get("torch")
    if pkg_dir is None:
        out["version"] = meta_version
        out["installed"] = meta_version is not None
        if meta_version:
            out["error"] = "torch is listed as installed but its package directory was not found"
        return out
    out["installed"] = True
    out["path"] = pkg_dir
    try:
        with open(os.path.join(pkg_dir, "version.py"), encoding="utf-8", errors="replace") as fh:
            ver = parse_version_py(fh.read())
        out["version"] = ver["__version__"]
        out["cuda"] = ver.get("cuda")
        out["hip"] = ver.get("hip")
        out["xpu"] = ver.get("xpu")
    except (OSError, ValueError) as e:
        out["version"] = meta_version
        out["error"] = f"cannot read torch/version.py: {e}"
        return out
    try:
        out["requires_versions"] = requires_versions(os.path.join(pkg_dir, "lib"))
    except (OSError, elf.ElfError):
        out["requires_versions"] = None
    if out["cuda"]:
        out["nccl"] = nccl(packages, os.path.join(pkg_dir, "lib"))
        try:
            scanned = scan_arch(os.path.join(pkg_dir, "lib"))
        except (OSError, elf.ElfError) as e:
            scanned = None
            out["error"] = f"cannot read torch's CUDA fatbinary: {e}"
        if scanned:
            out["arch_list"] = scanned["arch_list"]
            out["ptx"] = scanned["ptx"]
            out["arch_counts"] = scanned["arch_counts"]
    elif not out["hip"] and not out["xpu"]:
        out["arch_list"], out["ptx"] = [], []  # a CPU build: no GPU code at all (known, not unknown)
    return out
