"""The collectors behind the failure classes: ELF version needs and symbols (cross-checked with pyelftools
on the installed libraries), the libstdc++ that loads first, /proc//sys//dev reads on a fake tree, and the
flash-attn symbol check against torch's own libraries."""

from __future__ import annotations

import os
import shutil

import pytest

from qdoctor.facts import driver, elf, extensions, native
from qdoctor.facts.bnb import wheel_tag
from qdoctor.facts.torch_build import find_package

BNB_DIR = find_package("bitsandbytes")
TORCH_DIR = find_package("torch")
needs_bnb = pytest.mark.skipif(BNB_DIR is None, reason="needs bitsandbytes installed (CI installs it)")
needs_torch = pytest.mark.skipif(TORCH_DIR is None, reason="needs torch installed (CI installs it)")


@needs_bnb
def test_version_needs_agree_with_pyelftools():
    from elftools.elf.elffile import ELFFile
    from elftools.elf.gnuversions import GNUVerNeedSection

    for f in sorted(os.listdir(BNB_DIR)):
        if not f.startswith("libbitsandbytes_") or not f.endswith(".so"):
            continue
        path = os.path.join(BNB_DIR, f)
        fd = os.open(path, os.O_RDONLY)
        try:
            mine = elf.version_needs(fd, elf._read_elf(fd))
        finally:
            os.close(fd)
        with open(path, "rb") as fh:
            sec = next(s for s in ELFFile(fh).iter_sections() if isinstance(s, GNUVerNeedSection))
            theirs = {v.name: [a.name for a in it] for v, it in sec.iter_versions()}
        assert mine == theirs, f
        assert elf.inspect(path)["requires_versions"]["GLIBC"]


def test_highest_versions_compares_numerically():
    needs = {"libc.so.6": ["GLIBC_2.2.5", "GLIBC_2.34", "GLIBC_2.17", "GLIBC_PRIVATE"],
             "libstdc++.so.6": ["GLIBCXX_3.4.9", "GLIBCXX_3.4.32", "CXXABI_1.3.13", "GLIBCXX_3.4"]}
    assert elf.highest_versions(needs) == {"CXXABI": "1.3.13", "GLIBC": "2.34", "GLIBCXX": "3.4.32"}


def test_system_libstdcxx_defines_its_versions():
    path = next((p for p in ("/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/usr/lib64/libstdc++.so.6",
                             "/usr/lib/aarch64-linux-gnu/libstdc++.so.6") if os.path.exists(p)), None)
    if path is None:
        pytest.skip("no system libstdc++ at the usual places")
    got = elf.provided_versions(path)
    assert elf.highest_versions({"x": [f"GLIBCXX_{got['GLIBCXX']}"]}) and got["GLIBCXX"].startswith("3.4.")


@needs_torch
def test_dynamic_symbols_agree_with_pyelftools_and_torch_is_self_consistent():
    from elftools.elf.elffile import ELFFile

    path = os.path.join(TORCH_DIR, "lib", "libtorch_python.so")
    fd = os.open(path, os.O_RDONLY)
    try:
        defined, undefined = elf.dynamic_symbols(fd, elf._read_elf(fd), extensions.C10)
    finally:
        os.close(fd)
    with open(path, "rb") as fh:
        syms = [s for s in ELFFile(fh).get_section_by_name(".dynsym").iter_symbols()
                if s.name.startswith(extensions.C10)]
    assert undefined == {s.name for s in syms if s["st_shndx"] == "SHN_UNDEF"}
    assert defined == {s.name for s in syms if s["st_shndx"] != "SHN_UNDEF"}
    # torch's own extension needs only what torch exports: the flash-attn check would pass on it
    exports = extensions.torch_c10_exports(os.path.join(TORCH_DIR, "lib"))
    n, missing = extensions.undefined_against(path, exports)
    assert n > 50 and missing == []


@needs_torch
def test_flash_attn_built_for_another_torch_is_seen(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    # a library that needs c10 symbols: libtorch_python itself, checked against an empty "torch"
    src = os.path.join(TORCH_DIR, "lib", "libtorch_python.so")
    shutil.copy(src, site / "flash_attn_2_cuda.cpython-312.so")
    empty_torch = tmp_path / "torch-lib"
    empty_torch.mkdir()
    fa = extensions.flash_attn([str(site)], str(empty_torch))
    assert fa["c10_missing_count"] > 50 and fa["c10_missing"][0].startswith("_ZN")
    ok = extensions.flash_attn([str(site)], os.path.join(TORCH_DIR, "lib"))
    assert ok["c10_missing"] == []


def test_xformers_build_info(tmp_path):
    (tmp_path / "cpp_lib.json").write_text('{"version": {"torch": "2.10.0+cu128", "cuda": 1208, '
                                           '"python": "3.12.3"}, "env": {}}')
    assert extensions.xformers(str(tmp_path)) == {"built_for_torch": "2.10.0+cu128", "built_for_cuda": 1208,
                                                  "built_for_python": "3.12.3"}


def test_libstdcxx_resolution_order(tmp_path):
    def lib(d):
        d.mkdir(parents=True, exist_ok=True)
        (d / "libstdc++.so.6").write_bytes(b"")
        return str(d / "libstdc++.so.6")

    conda = tmp_path / "conda"
    (conda / "conda-meta").mkdir(parents=True)
    (conda / "bin").mkdir()
    conda_lib = lib(conda / "lib")
    ld = lib(tmp_path / "ld")
    system = lib(tmp_path / "sys")
    exe = str(conda / "bin" / "python")
    cache = {"libstdc++.so.6": [system]}
    env = {"LD_LIBRARY_PATH": str(tmp_path / "ld")}
    assert native.resolve_libstdcxx(env, cache, exe, defaults=[]) == (ld, "LD_LIBRARY_PATH")
    assert native.resolve_libstdcxx({}, cache, exe, defaults=[]) == (conda_lib, "conda")
    assert native.resolve_libstdcxx({}, cache, "/usr/bin/python3", defaults=[]) == (system, "system")


def test_shadowed_cuda_libs_are_listed(tmp_path):
    wheel = tmp_path / "site" / "nvidia" / "nvjitlink" / "lib"
    wheel.mkdir(parents=True)
    (wheel / "libnvJitLink.so.12").write_bytes(b"")
    sys_dir = tmp_path / "cuda-12.1" / "lib64"
    sys_dir.mkdir(parents=True)
    (sys_dir / "libnvJitLink.so.12.1.105").write_bytes(b"")
    os.symlink("libnvJitLink.so.12.1.105", sys_dir / "libnvJitLink.so.12")
    out = native.shadowed_cuda_libs({"LD_LIBRARY_PATH": str(sys_dir)}, [str(wheel)])
    assert [(x["soname"], x["version"]) for x in out] == [("libnvJitLink.so.12", "12.1.105")]
    assert native.shadowed_cuda_libs({}, [str(wheel)]) == []


def test_driver_facts_from_a_fake_tree(tmp_path):
    (tmp_path / "proc/driver/nvidia").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia/version").write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.90.07  Fri May 31 09:35:42 UTC 2024\n")
    (tmp_path / "proc/driver/nvidia-nvswitch/devices/0000:05:00.0").mkdir(parents=True)
    (tmp_path / "proc/1234").mkdir()
    (tmp_path / "proc/1234/comm").write_text("python3\n")
    (tmp_path / "sys/module/nvidia").mkdir(parents=True)
    (tmp_path / "dev").mkdir()
    for n in ("nvidia0", "nvidiactl", "nvidia-nvswitch0", "null"):
        (tmp_path / "dev" / n).write_text("")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(
        "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic\n")
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_text("NVIDIA Jetson AGX Orin Developer Kit\x00")
    d = driver.collect({}, root=str(tmp_path))
    assert d["kernel_module"] == "550.90.07"
    assert d["uvm_module"] is False and d["device_nodes"] == ["nvidia-nvswitch0", "nvidia0", "nvidiactl"]
    assert d["nvswitches"] == 1 and d["fabric_manager_running"] is False
    assert d["jetson"] == {"l4t": "36.4.3", "model": "NVIDIA Jetson AGX Orin Developer Kit"}
    (tmp_path / "proc/1234/comm").write_text("nv-fabricmanager\n")
    assert driver.collect({}, root=str(tmp_path))["fabric_manager_running"] is True


def test_wheel_tag_from_dist_info(tmp_path):
    pkg = tmp_path / "bitsandbytes"
    pkg.mkdir()
    di = tmp_path / "bitsandbytes-0.46.1.dist-info"
    di.mkdir()
    (di / "WHEEL").write_text("Wheel-Version: 1.0\nRoot-Is-Purelib: false\n"
                              "Tag: py3-none-manylinux_2_24_aarch64\n")
    assert wheel_tag(str(pkg), "0.46.1") == "py3-none-manylinux_2_24_aarch64"
