"""The ELF reader and the fatbin walker, on the real bitsandbytes libraries and on crafted bytes."""

from __future__ import annotations

import os
import shutil
import struct

import pytest

from qdoctor.facts import elf
from qdoctor.facts.packages import list_dists
from qdoctor.facts.torch_build import find_package

BNB_DIR = find_package("bitsandbytes")
BNB_VERSION = next((d.version for d in list_dists() if d.name == "bitsandbytes"), None)
needs_bnb_0502 = pytest.mark.skipif(BNB_DIR is None or BNB_VERSION != "0.50.2",
                                    reason="needs the bitsandbytes 0.50.2 wheel (CI installs it)")

# Read with `cuobjdump --list-elf` on the H200 machine (shared/facts/h200-2026-11-28.md)
CUOBJDUMP = {
    "cuda130": ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"],
    "cuda128": ["sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"],
}


@needs_bnb_0502
@pytest.mark.parametrize("name", sorted(CUOBJDUMP))
def test_fatbin_archs_match_cuobjdump(name):
    info = elf.inspect(os.path.join(BNB_DIR, f"libbitsandbytes_{name}.so"))
    assert info["has_fatbin"]
    assert info["archs"] == CUOBJDUMP[name]


@needs_bnb_0502
def test_every_cuda_library_has_gpu_code_and_the_cpu_one_has_none():
    libs = sorted(f for f in os.listdir(BNB_DIR) if f.startswith("libbitsandbytes_"))
    cuda = [f for f in libs if f.startswith("libbitsandbytes_cuda")]
    assert len(cuda) >= 5
    for f in cuda:
        info = elf.inspect(os.path.join(BNB_DIR, f))
        assert info["archs"], f
        assert all(a.startswith("sm_") and a[3:].isdigit() for a in info["archs"])
        assert any(n.startswith("libcudart.so") for n in info["needed"]), f
    cpu = elf.inspect(os.path.join(BNB_DIR, "libbitsandbytes_cpu.so"))
    assert cpu["has_fatbin"] is False and cpu["archs"] == []


@needs_bnb_0502
def test_elf_reader_agrees_with_pyelftools():
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile

    for f in ("libbitsandbytes_cuda130.so", "libbitsandbytes_cpu.so", "libbitsandbytes_rocm72.so"):
        path = os.path.join(BNB_DIR, f)
        mine = elf.read_elf(path)
        with open(path, "rb") as fh:
            ef = ELFFile(fh)
            theirs = {s.name: (s["sh_offset"], s["sh_size"]) for s in ef.iter_sections()}
            dyn = next(s for s in ef.iter_sections() if isinstance(s, DynamicSection))
            needed = [t.needed for t in dyn.iter_tags() if t.entry.d_tag == "DT_NEEDED"]
            runpath = [t.runpath for t in dyn.iter_tags() if t.entry.d_tag == "DT_RUNPATH"]
        assert mine["sections"] == theirs
        assert mine["needed"] == needed
        assert mine["runpath"] == (runpath[0].split(":") if runpath else [])


def _entry(kind, sm, payload, header_size=64):
    head = struct.pack("<HHIQ", kind, 0x0101, header_size, len(payload))
    head += b"\0" * (28 - len(head)) + struct.pack("<I", sm)
    head += b"\0" * (header_size - len(head))
    return head + payload


def _container(*entries):
    body = b"".join(entries)
    return struct.pack("<IHHQ", elf.FATBIN_MAGIC, 1, 16, len(body)) + body


def test_walk_fatbin_counts_kinds_across_containers_and_padding(tmp_path):
    first = _container(_entry(2, 80, b"x" * 24), _entry(1, 90, b"ptx" * 5 + b"\0"),
                       _entry(2, 90, b"y" * 8, 112))
    second = _container(_entry(2, 80, b"z" * 16), _entry(2, 120, b"w" * 8, 80))
    blob = first + b"\0" * 8 + second
    p = tmp_path / "fat.bin"
    p.write_bytes(b"JUNK" + blob)
    fd = os.open(p, os.O_RDONLY)
    try:
        res = elf.walk_fatbin(fd, 4, len(blob))
    finally:
        os.close(fd)
    assert res["containers"] == 2
    assert res["sass"] == {80: 2, 90: 1, 120: 1}
    assert res["ptx"] == {90: 1}


def test_walk_fatbin_rejects_garbage(tmp_path):
    p = tmp_path / "bad.bin"
    p.write_bytes(struct.pack("<IHHQ", 0xDEADBEEF, 1, 16, 0))
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(elf.ElfError):
            elf.walk_fatbin(fd, 0, 16)
    finally:
        os.close(fd)


def test_not_an_elf_file(tmp_path):
    p = tmp_path / "x.so"
    p.write_bytes(b"MZ" + b"\0" * 100)
    with pytest.raises(elf.ElfError):
        elf.inspect(str(p))


@needs_bnb_0502
def test_inspect_cached_reads_the_file_once(tmp_path, monkeypatch):
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path / "cache"))
    lib = tmp_path / "libx.so"
    shutil.copy(os.path.join(BNB_DIR, "libbitsandbytes_cuda130.so"), lib)
    first = elf.inspect_cached(str(lib))
    monkeypatch.setattr(elf, "inspect", lambda path: (_ for _ in ()).throw(AssertionError("not cached")))
    assert elf.inspect_cached(str(lib)) == first
    os.utime(lib, ns=(1, 1))  # a changed file identity must miss the cache
    with pytest.raises(AssertionError, match="not cached"):
        elf.inspect_cached(str(lib))
