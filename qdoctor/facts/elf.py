"""Read what a shared library needs and which GPUs it has code for, without loading it.

Only headers are read, with seeks: a CUDA library can be over a gigabyte and the `check` process
must stay fast and must never dlopen it. Plain `struct` instead of pyelftools because importing
pyelftools alone costs ~0.1 s here (the tests cross-check this reader against pyelftools).

The CUDA fat binary (section `.nv_fatbin`) is a run of containers; each container is a 16-byte
header (magic 0xBA55ED50, version u16, header size u16, size of the entries u64) followed by
entries. Each entry starts with kind u16 (1 = PTX, 2 = ELF/SASS cubin), version u16, entry-header
size u32, payload size u64, ..., the SM number u32 at byte 28 and flags u64 at byte 40; the next
entry starts after header + payload. Compressed payloads keep the same plain header. Layout:
reverse-engineered descriptions (n-eiling/cuda-fatbin-decompression fatbin-decompress.h;
GrigoryEvko/nvopen-tools fatbin/FORMAT_SPECIFICATION.md), checked against `cuobjdump --list-elf`
on bitsandbytes 0.50.2 (see tests/test_facts_elf.py).
`__nv_relfatbin` (relocatable device code for -rdc linking) is not what the driver loads, so it is
not read.
"""

from __future__ import annotations

import os
import struct

FATBIN_MAGIC = 0xBA55ED50
KIND_PTX, KIND_ELF = 1, 2
DT_NEEDED, DT_RPATH, DT_RUNPATH, DT_SONAME = 1, 15, 29, 14
SHT_DYNAMIC, SHT_DYNSYM = 6, 11
SHT_GNU_VERDEF, SHT_GNU_VERNEED = 0x6FFFFFFD, 0x6FFFFFFE
MAX_FATBIN_ENTRIES = 500_000  # a sanity bound against a corrupt size field looping forever


class ElfError(ValueError):
    pass


def _read(fd: int, offset: int, size: int) -> bytes:
    if hasattr(os, "pread"):
        data = os.pread(fd, size, offset)
    else:  # Windows
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, size)
    if len(data) != size:
        raise ElfError(f"truncated file (wanted {size} bytes at {offset})")
    return data


def read_elf(path: str) -> dict:
    """Section table + dynamic section of an ELF file: {'sections': {name: (offset, size)}, 'needed', ...}."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        info = _read_elf(fd)
    finally:
        os.close(fd)
    return {k: v for k, v in info.items() if not k.startswith("_")}


def _read_elf(fd: int) -> dict:
    ident = _read(fd, 0, 16)
    if ident[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    is64 = ident[4] == 2
    end = "<" if ident[5] == 1 else ">"
    if is64:
        hdr = struct.unpack(end + "HHIQQQIHHHHHH", _read(fd, 16, 48))
        e_machine, e_shoff, e_shentsize, e_shnum, e_shstrndx = hdr[1], hdr[5], hdr[10], hdr[11], hdr[12]
        sh_fmt, dyn_fmt = end + "IIQQQQIIQQ", end + "qQ"
    else:
        hdr = struct.unpack(end + "HHIIIIIHHHHHH", _read(fd, 16, 36))
        e_machine, e_shoff, e_shentsize, e_shnum, e_shstrndx = hdr[1], hdr[5], hdr[10], hdr[11], hdr[12]
        sh_fmt, dyn_fmt = end + "IIIIIIIIII", end + "iI"
    if e_shoff == 0 or e_shnum == 0:
        raise ElfError("no section headers")
    raw = _read(fd, e_shoff, e_shentsize * e_shnum)
    shdrs = [struct.unpack_from(sh_fmt, raw, i * e_shentsize) for i in range(e_shnum)]
    # (name, type, flags, addr, offset, size, link, info, align, entsize)
    strtab = shdrs[e_shstrndx]
    names = _read(fd, strtab[4], strtab[5])
    sections, dynamic, typed = {}, None, {}
    for sh in shdrs:
        name = names[sh[0]:names.index(b"\0", sh[0])].decode("ascii", "replace")
        sections[name] = (sh[4], sh[5])
        if sh[1] == SHT_DYNAMIC:
            dynamic = sh
        if sh[1] in (SHT_GNU_VERNEED, SHT_GNU_VERDEF, SHT_DYNSYM):
            typed[sh[1]] = (sh[4], sh[5], shdrs[sh[6]][4], shdrs[sh[6]][5], sh[9])  # + its string table
    out = {"class": 64 if is64 else 32, "machine": e_machine, "sections": sections,
           "needed": [], "rpath": [], "runpath": [], "soname": None, "_typed": typed, "_end": end}
    if dynamic is not None:
        dstr = shdrs[dynamic[6]]
        strs = _read(fd, dstr[4], dstr[5])
        entsize = struct.calcsize(dyn_fmt)
        data = _read(fd, dynamic[4], dynamic[5])

        def s(off):
            return strs[off:strs.index(b"\0", off)].decode("utf-8", "replace")

        for i in range(0, len(data) - entsize + 1, entsize):
            tag, val = struct.unpack_from(dyn_fmt, data, i)
            if tag == 0:
                break
            if tag == DT_NEEDED:
                out["needed"].append(s(val))
            elif tag == DT_RPATH:
                out["rpath"] = [p for p in s(val).split(":") if p]
            elif tag == DT_RUNPATH:
                out["runpath"] = [p for p in s(val).split(":") if p]
            elif tag == DT_SONAME:
                out["soname"] = s(val)
    return out


def _strings(fd: int, off: int, size: int):
    data = _read(fd, off, size)

    def s(o: int) -> str:
        return data[o:data.index(b"\0", o)].decode("utf-8", "replace")

    return s


def version_needs(fd: int, info: dict) -> dict[str, list[str]]:
    """`.gnu.version_r`: the symbol versions a library needs, per providing file:
    {'libc.so.6': ['GLIBC_2.2.5', 'GLIBC_2.34'], 'libstdc++.so.6': ['GLIBCXX_3.4.29', ...]}.

    Verneed entries are (vn_version u16, vn_cnt u16, vn_file u32, vn_aux u32, vn_next u32), each followed
    (at vn_aux) by vn_cnt Vernaux (vna_hash u32, vna_flags u16, vna_other u16, vna_name u32, vna_next u32).
    """
    sec = info["_typed"].get(SHT_GNU_VERNEED)
    if not sec:
        return {}
    off, size, soff, ssize, _ = sec
    data, s, end = _read(fd, off, size), _strings(fd, soff, ssize), info["_end"]
    out: dict[str, list[str]] = {}
    pos, guard = 0, 0
    while pos + 16 <= len(data) and guard < 10_000:
        _ver, cnt, vfile, aux, nxt = struct.unpack_from(end + "HHIII", data, pos)
        names = out.setdefault(s(vfile), [])
        a = pos + aux
        for _ in range(cnt):
            if a + 16 > len(data):
                break
            _h, _f, _o, name, anext = struct.unpack_from(end + "IHHII", data, a)
            names.append(s(name))
            if not anext:
                break
            a += anext
        guard += 1
        if not nxt:
            break
        pos += nxt
    return out


def version_defs(fd: int, info: dict) -> list[str]:
    """`.gnu.version_d`: the symbol versions a library provides (libstdc++: GLIBCXX_3.4 ... GLIBCXX_3.4.33).

    Verdef entries are (vd_version u16, vd_flags u16, vd_ndx u16, vd_cnt u16, vd_hash u32, vd_aux u32,
    vd_next u32); the first Verdaux (vda_name u32, vda_next u32) names the version.
    """
    sec = info["_typed"].get(SHT_GNU_VERDEF)
    if not sec:
        return []
    off, size, soff, ssize, _ = sec
    data, s, end = _read(fd, off, size), _strings(fd, soff, ssize), info["_end"]
    out, pos, guard = [], 0, 0
    while pos + 20 <= len(data) and guard < 10_000:
        _v, flags, _ndx, cnt, _hash, aux, nxt = struct.unpack_from(end + "HHHHIII", data, pos)
        if cnt and pos + aux + 8 <= len(data) and not flags & 1:  # VER_FLG_BASE names the file itself
            (name, _n) = struct.unpack_from(end + "II", data, pos + aux)
            out.append(s(name))
        guard += 1
        if not nxt:
            break
        pos += nxt
    return out


def dynamic_symbols(fd: int, info: dict, prefixes: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """(defined, undefined) names in `.dynsym` that start with one of `prefixes` (e.g. c10's mangled
    '_ZN3c10'): enough to tell whether an extension needs symbols its torch does not export."""
    sec = info["_typed"].get(SHT_DYNSYM)
    if not sec:
        return set(), set()
    off, size, soff, ssize, entsize = sec
    is64 = info["class"] == 64
    entsize = entsize or (24 if is64 else 16)
    strtab = _read(fd, soff, ssize)
    data = _read(fd, off, size)
    fmt = info["_end"] + ("IBBHQQ" if is64 else "IIIBBH")
    defined, undefined = set(), set()
    pfx = tuple(p.encode() for p in prefixes)
    for i in range(0, len(data) - entsize + 1, entsize):
        fields = struct.unpack_from(fmt, data, i)
        name_off = fields[0]
        shndx = fields[3] if is64 else fields[5]
        if not strtab.startswith(pfx, name_off):
            continue
        name = strtab[name_off:strtab.index(b"\0", name_off)].decode("utf-8", "replace")
        (defined if shndx else undefined).add(name)
    return defined, undefined


def highest_versions(needs: dict[str, list[str]]) -> dict[str, str]:
    """{"GLIBC": "2.34", "GLIBCXX": "3.4.29", ...}: the newest version of each family needed."""
    best: dict[str, tuple] = {}
    for names in needs.values():
        for n in names:
            fam, _, ver = n.partition("_")
            if fam not in ("GLIBC", "GLIBCXX", "CXXABI") or not ver[:1].isdigit():
                continue
            try:
                t = tuple(int(x) for x in ver.split("."))
            except ValueError:
                continue
            if fam not in best or t > best[fam]:
                best[fam] = t
    return {fam: ".".join(str(x) for x in t) for fam, t in sorted(best.items())}


def provided_versions(path: str) -> dict[str, str]:
    """The newest GLIBCXX / CXXABI / GLIBC versions a library (libstdc++.so.6, libc.so.6) defines."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        info = _read_elf(fd)
        return highest_versions({"self": version_defs(fd, info)})
    finally:
        os.close(fd)


def walk_fatbin(fd: int, offset: int, size: int) -> dict:
    """Count entries per (kind, sm) in a `.nv_fatbin` region, reading only the headers."""
    end = offset + size
    pos = offset
    containers, entries = 0, 0
    sass: dict[int, int] = {}
    ptx: dict[int, int] = {}
    while pos + 16 <= end:
        magic, _ver, hsize, fsize = struct.unpack("<IHHQ", _read(fd, pos, 16))
        if magic != FATBIN_MAGIC:
            # containers are 8-aligned in practice; skip zero padding between them, stop on anything else
            if magic == 0:
                pos += 8
                continue
            raise ElfError(f"bad fatbin container magic {magic:#x} at section offset {pos - offset}")
        containers += 1
        cend = min(pos + hsize + fsize, end)
        e = pos + hsize
        while e + 32 <= cend:
            head = _read(fd, e, 32)
            kind, _v, ehsize, psize = struct.unpack_from("<HHIQ", head, 0)
            (sm,) = struct.unpack_from("<I", head, 28)
            if ehsize < 32:
                raise ElfError(f"bad fatbin entry header size {ehsize}")
            if kind == KIND_ELF:
                sass[sm] = sass.get(sm, 0) + 1
            elif kind == KIND_PTX:
                ptx[sm] = ptx.get(sm, 0) + 1
            entries += 1
            if entries > MAX_FATBIN_ENTRIES:
                raise ElfError("too many fatbin entries (corrupt size field?)")
            e += ehsize + psize
        pos = pos + hsize + fsize
    return {"containers": containers, "entries": entries, "sass": sass, "ptx": ptx}


def sm_name(sm: int) -> str:
    return f"sm_{sm}"


def inspect(path: str) -> dict:
    """What qdoctor needs from one library: DT_NEEDED/RPATH/RUNPATH, its fatbin architectures, and the
    newest glibc / libstdc++ symbol versions it needs (`requires_versions`, from .gnu.version_r).

    `archs`/`ptx` list every SM with at least one entry; `sass_counts` keeps the per-SM container
    counts so a caller can tell a build target from a handful of special kernels.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        info = _read_elf(fd)
        fat = info["sections"].get(".nv_fatbin")
        if fat:
            walked = walk_fatbin(fd, fat[0], fat[1])
        else:
            walked = {"containers": 0, "entries": 0, "sass": {}, "ptx": {}}
        requires = highest_versions(version_needs(fd, info))
    finally:
        os.close(fd)
    return {
        "class": info["class"], "machine": info["machine"], "soname": info["soname"],
        "needed": info["needed"], "rpath": info["rpath"], "runpath": info["runpath"],
        "has_fatbin": bool(fat),
        "fatbin_containers": walked["containers"],
        "archs": [sm_name(s) for s in sorted(walked["sass"])],
        "ptx": [sm_name(s) for s in sorted(walked["ptx"])],
        "sass_counts": {sm_name(s): n for s, n in sorted(walked["sass"].items())},
        "requires_versions": requires,
    }


def inspect_cached(path: str) -> dict:
    """`inspect`, cached per (path, size, mtime): a torch CUDA library has thousands of containers."""
    from qdoctor import cache

    key = cache.file_key(path)
    if key is not None:
        hit = cache.load("elf", key)
        if isinstance(hit, dict) and "requires_versions" in hit:  # older entries lack the version needs
            return hit
    res = inspect(path)
    if key is not None:
        cache.store("elf", key, res)
    return res
