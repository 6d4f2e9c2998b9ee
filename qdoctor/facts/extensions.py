"""Compiled extensions built against torch (flash-attn, xformers): were they built for the torch installed?

flash-attn's wheel carries no record of the torch it was built for, but its library does: every c10 symbol
it needs must be exported by this torch's libraries. A wheel for another torch minor or C++ ABI needs names
this torch does not have, and `import flash_attn` fails with "undefined symbol: _ZN3c10...". The dynamic
symbol tables are read without loading anything; torch's exports are cached per file identity.
xformers writes the torch it was built for into xformers/cpp_lib.json.
"""

from __future__ import annotations

import glob
import json
import os

from qdoctor.facts import elf

C10 = ("_ZN3c10", "_ZNK3c10")
TORCH_EXPORTERS = ("libc10.so", "libc10_cuda.so", "libtorch_cpu.so", "libtorch_cuda.so")


def _symbols(path: str) -> tuple[set[str], set[str]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return elf.dynamic_symbols(fd, elf._read_elf(fd), C10)
    finally:
        os.close(fd)


def torch_c10_exports(torch_lib: str) -> set[str]:
    """c10 symbols this torch's libraries define (cached per file identity: libtorch_cpu takes ~50 ms)."""
    from qdoctor import cache

    out: set[str] = set()
    for name in TORCH_EXPORTERS:
        path = os.path.join(torch_lib, name)
        if not os.path.exists(path):
            continue
        key = cache.file_key(path)
        hit = cache.load("c10-exports", key) if key else None
        if isinstance(hit, list):
            out.update(hit)
            continue
        defined, _ = _symbols(path)
        if key:
            cache.store("c10-exports", key, sorted(defined))
        out.update(defined)
    return out


def undefined_against(lib: str, exports: set[str]) -> tuple[int, list[str]]:
    """(c10 symbols `lib` needs, those `exports` lacks)."""
    _, needed = _symbols(lib)
    return len(needed), sorted(needed - exports)


def flash_attn(sites, torch_lib: str | None) -> dict | None:
    libs = []
    for site in sites:
        libs += sorted(glob.glob(os.path.join(site, "flash_attn_2_cuda*.so")))
    if not libs:
        return None
    out = {"library": os.path.basename(libs[0]), "c10_needed": None, "c10_missing": None}
    if torch_lib and os.path.isdir(torch_lib):
        try:
            n, missing = undefined_against(libs[0], torch_c10_exports(torch_lib))
            out["c10_needed"], out["c10_missing"] = n, missing[:10]
            out["c10_missing_count"] = len(missing)
        except (OSError, elf.ElfError) as e:
            out["error"] = f"cannot read {out['library']}: {e}"
    return out


def xformers(pkg_dir: str | None) -> dict | None:
    """The torch / CUDA / Python xformers' C++ library was built for (xformers/cpp_lib.json)."""
    if not pkg_dir:
        return None
    try:
        with open(os.path.join(pkg_dir, "cpp_lib.json"), encoding="utf-8") as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return {"built_for_torch": None}
    ver = meta.get("version") or {}
    return {"built_for_torch": ver.get("torch"), "built_for_cuda": ver.get("cuda"),
            "built_for_python": ver.get("python")}


def collect(paths=None, torch_dir: str | None = None) -> dict:
    from qdoctor.facts.packages import site_dirs
    from qdoctor.facts.torch_build import find_package

    sites = site_dirs(paths)
    torch_lib = os.path.join(torch_dir, "lib") if torch_dir else None
    return {"flash_attn": flash_attn(sites, torch_lib), "xformers": xformers(find_package("xformers", paths))}
