"""Installed distributions, read from their *.dist-info / *.egg-info directories (never imported).

Why not importlib.metadata: importing it plus packaging costs ~0.1 s on a small machine, and its
per-distribution email parsing more; the directory names already carry name and version. The
costly part (requirements, top-level modules of every distribution) is a pure function of the
installed set, so it is computed once and cached, keyed by that set.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass, field

# reported besides the stack (qdoctor.matrix.stack(): the QLoRA stack itself lives in matrix/packages.toml)
NEIGHBOURS = (
    "triton", "pytorch-triton", "pytorch-triton-rocm", "pytorch-triton-xpu", "numpy", "safetensors",
    "tokenizers", "huggingface-hub", "hf-xet", "hf-transfer", "trl", "datasets", "xformers", "flash-attn",
    "flash-attn-3", "deepspeed", "unsloth", "unsloth-zoo", "optimum", "auto-gptq", "gptqmodel", "autoawq",
    "torchvision", "torchaudio", "torchao", "sentencepiece", "protobuf", "scipy", "nvidia-ml-py", "pynvml",
    "pyelftools", "packaging", "psutil", "click", "qdoctor", "intel-extension-for-pytorch", "liger-kernel",
    "vllm", "setuptools", "typing-extensions", "sympy", "jinja2", "filelock", "fsspec", "regex", "tqdm",
    "cupy", "cuda-python", "cuda-bindings", "ninja", "wheel", "pip", "llamafactory", "axolotl",
)
PREFIXES = ("nvidia-", "bitsandbytes", "torch", "triton", "cupy-", "cuda-", "flash-attn", "unsloth")
# whose requirements are checked besides the stack (the ML packages around it; qdoctor's own too)
CHECKED_NEIGHBOURS = (
    "triton", "trl", "safetensors", "tokenizers", "huggingface-hub", "datasets", "torchvision", "torchaudio",
    "torchao", "xformers", "flash-attn", "deepspeed", "unsloth", "unsloth-zoo", "optimum", "qdoctor",
    "llamafactory", "axolotl", "liger-kernel",
)
CACHE_FORMAT = 2  # 2: trainer frameworks joined CHECKED

_NORM = re.compile(r"[-_.]+")
_DIR = re.compile(r"^(?P<name>.+?)(?:-(?P<version>[^-]+?))?(?:-py\d[^-]*)?\.(?P<kind>dist-info|egg-info)$")


def normalize_name(name: str) -> str:
    return _NORM.sub("-", name).lower()


def stack() -> tuple[str, ...]:
    from qdoctor import matrix

    return matrix.stack()


def checked_names() -> tuple[str, ...]:
    return stack() + CHECKED_NEIGHBOURS


def is_reported(name: str) -> bool:
    return name in stack() or name in NEIGHBOURS or name.startswith(PREFIXES)


@dataclass(frozen=True)
class Dist:
    """One installed distribution; tests build these directly (a recorded or invented install)."""
    name: str
    version: str | None
    requires: tuple[str, ...] = ()
    top_level: tuple[str, ...] = ()
    location: str = ""
    path: str = field(default="", compare=False)


def site_dirs(paths=None) -> list[str]:
    """Where distributions can live: the import path's existing directories ('' i.e. cwd excluded)."""
    out, seen = [], set()
    for p in sys.path if paths is None else paths:
        if not p or p in seen or not os.path.isdir(p):
            continue
        seen.add(p)
        out.append(p)
    return out


def list_dists(paths=None) -> list[Dist]:
    """Name and version from the directory names only (cheap); metadata files are read on demand."""
    out = []
    for site in site_dirs(paths):
        try:
            entries = sorted(os.listdir(site))
        except OSError:
            continue
        for entry in entries:
            m = _DIR.match(entry)
            if not m:
                continue
            path = os.path.join(site, entry)
            version = m.group("version")
            if not version:
                version = read_metadata(path).get("version")
            out.append(Dist(normalize_name(m.group("name")), version, location=site, path=path))
    return out


def read_metadata(path: str) -> dict:
    """Name, Version and Requires-Dist from METADATA / PKG-INFO headers (the body is not read)."""
    meta = {"name": None, "version": None, "requires": []}
    for fname in ("METADATA", "PKG-INFO"):
        try:
            headers = _headers(os.path.join(path, fname))
        except OSError:
            continue
        for key, val in headers:
            if key == "name":
                meta["name"] = val
            elif key == "version":
                meta["version"] = val
            elif key == "requires-dist":
                meta["requires"].append(val)
        break
    if path.endswith(".egg-info") and not meta["requires"]:
        meta["requires"] = _egg_requires(os.path.join(path, "requires.txt"))
    return meta


def _headers(path: str) -> list[tuple[str, str]]:
    """(lower-cased key, value) pairs of an RFC 822 header block; stops at the first blank line."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                break
            if line[0] in " \t" or ":" not in line:
                continue
            key, _, val = line.partition(":")
            out.append((key.strip().lower(), val.strip()))
    return out


def _egg_requires(path: str) -> list[str]:
    out, marker = [], None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return out
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            extra, _, mark = section.partition(":")
            marker = False if extra else mark  # an extra's section: not a base requirement
            continue
        if marker is False:
            continue
        out.append(f"{line}; {marker}" if marker else line)
    return out


def read_top_level(path: str) -> tuple[str, ...]:
    """Top-level import names a distribution installs: top_level.txt, else the first path parts of RECORD."""
    try:
        with open(os.path.join(path, "top_level.txt"), encoding="utf-8", errors="replace") as fh:
            return tuple(sorted({ln.strip().split("/")[0] for ln in fh if ln.strip()}))
    except OSError:
        pass
    names = set()
    try:
        with open(os.path.join(path, "RECORD"), encoding="utf-8", errors="replace") as fh:
            for line in fh:
                first = line.split(",", 1)[0].strip().strip('"')
                top = first.split("/", 1)[0]
                if not top or top.startswith("..") or top == "__pycache__" or top.endswith(
                        (".dist-info", ".data", ".pth", ".egg-info", ".egg-link")):
                    continue
                if "/" not in first:
                    if top.endswith(".py"):
                        names.add(top[:-3])
                    elif top.endswith((".so", ".pyd")):
                        names.add(top.split(".", 1)[0])
                    continue
                names.add(top)
    except OSError:
        pass
    return tuple(sorted(names))


def is_namespace(location: str, module: str) -> bool:
    """A PEP 420 namespace directory (e.g. `nvidia/` shared by every nvidia-* wheel) is no conflict."""
    d = os.path.join(location, module)
    return os.path.isdir(d) and not os.path.exists(os.path.join(d, "__init__.py"))


def find_conflicts(dists, namespace=is_namespace) -> list[dict]:
    """Modules provided by two installed distributions (or one distribution installed twice)."""
    by_module: dict[str, list[Dist]] = {}
    for d in dists:
        for mod in d.top_level:
            by_module.setdefault(mod, []).append(d)
    out = []
    for mod, ds in sorted(by_module.items()):
        if len(ds) < 2:
            continue
        if all(namespace(d.location, mod) for d in ds if d.location):
            continue
        out.append({"module": mod, "distributions": [d.name for d in ds],
                    "versions": [d.version for d in ds], "locations": [d.location for d in ds]})
    return out


def unmet_requirements(dists, checked=None, marker_env=None) -> list[dict]:
    """Requirements of the checked distributions that the installed set does not satisfy.

    Extras-only requirements are ignored; markers are evaluated for this interpreter. A version
    that cannot be parsed is not judged (unknown is never bad).
    """
    from packaging.markers import InvalidMarker, UndefinedComparison, UndefinedEnvironmentName
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version

    checked = checked_names() if checked is None else checked
    installed: dict[str, str | None] = {}
    for d in dists:
        installed.setdefault(d.name, d.version)
    out = []
    seen = set()
    for d in dists:
        if (d.name not in checked and not d.name.startswith("bitsandbytes")) or d.name in seen:
            continue
        seen.add(d.name)
        for text in d.requires:
            try:
                req = Requirement(text)
                if req.marker is not None:
                    env = dict(marker_env or {})
                    env["extra"] = ""
                    if not req.marker.evaluate(env):
                        continue
            except (InvalidRequirement, InvalidMarker, UndefinedComparison, UndefinedEnvironmentName):
                continue
            have = installed.get(normalize_name(req.name))
            ok = have is not None
            if ok and req.specifier:
                try:
                    ok = req.specifier.contains(Version(have), prereleases=True)
                except InvalidVersion:
                    ok = True
            if not ok:
                out.append({"package": d.name, "version": d.version,
                            "requirement": str(req).split(";")[0].strip(),
                            "installed": have})
    return out


def _signature(dists) -> str:
    text = "\n".join(f"{d.location}|{os.path.basename(d.path)}" for d in dists)
    machine = os.uname().machine if hasattr(os, "uname") else ""
    text += f"\n{sys.version}|{sys.platform}|{machine}|{CACHE_FORMAT}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def collect(paths=None, use_cache: bool = True) -> dict:
    """{'packages', 'conflicts', 'requirements'} for the distributions on `paths` (default sys.path)."""
    from qdoctor import cache

    listed = list_dists(paths)
    packages: dict[str, str | None] = {}
    for d in listed:
        if is_reported(d.name):
            packages.setdefault(d.name, d.version)
    key = _signature(listed)
    hit = cache.load("packages", key) if use_cache else None
    if isinstance(hit, dict) and "conflicts" in hit and "requirements" in hit:
        return {"packages": dict(sorted(packages.items())), "conflicts": hit["conflicts"],
                "requirements": hit["requirements"], "cached": True}
    full, check = [], checked_names()
    for d in listed:
        meta = read_metadata(d.path) if (d.name in check or d.name.startswith("bitsandbytes")) else {}
        full.append(Dist(d.name, d.version, tuple(meta.get("requires") or ()), read_top_level(d.path),
                         d.location, d.path))
    res = {"conflicts": find_conflicts(full), "requirements": unmet_requirements(full, check)}
    if use_cache:
        cache.store("packages", key, res)
    return {"packages": dict(sorted(packages.items())), **res, "cached": False}
