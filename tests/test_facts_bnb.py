"""The bitsandbytes loader mirror (pure) and the shipped-library scan with dependency resolution."""

from __future__ import annotations

import os
import shutil
import struct

import pytest

from qdoctor import bnb_loader, matrix
from qdoctor.facts import bnb, libsearch
from qdoctor.facts.torch_build import find_package

RULES = bnb_loader.rules(matrix.load())
SHIPPED_0502 = ["cpu", "cuda118", "cuda121", "cuda124", "cuda126", "cuda128", "cuda130", "cuda132",
                "rocm64", "rocm70", "rocm71", "rocm714", "rocm715", "rocm72", "xpu2025", "xpu2026"]


def sel(version="0.50.2", cuda="13.0", hip=None, available=SHIPPED_0502, env=None, **kw):
    return bnb.select_library(version, cuda, hip, available, env or {}, RULES, **kw)


def test_exact_match():
    r = sel(cuda="13.0")
    assert (r["selected"], r["selected_exists"]) == ("cuda130", True)
    assert "exact" in r["selected_reason"]


def test_same_major_lower_fallback():
    r = sel(cuda="12.9")
    assert (r["selected"], r["selected_exists"]) == ("cuda128", True)
    assert "12.8" in r["selected_reason"]


def test_same_major_higher_fallback():
    r = sel(cuda="12.0", available=["cpu", "cuda121", "cuda124", "cuda130"])
    assert (r["selected"], r["selected_exists"]) == ("cuda121", True)


def test_never_crosses_majors():
    r = sel(cuda="13.0", available=["cpu", "cuda118", "cuda128"])
    assert (r["selected"], r["selected_exists"]) == ("cuda130", False)
    r = sel(cuda="11.7", available=["cpu", "cuda121", "cuda130"])
    assert (r["selected"], r["selected_exists"]) == ("cuda117", False)


def test_before_050_only_exact_match_counts():
    r = sel(version="0.49.2", cuda="12.9", available=["cpu", "cuda126", "cuda128", "cuda130"])
    assert (r["selected"], r["selected_exists"]) == ("cuda129", False)
    r = sel(version="0.49.2", cuda="12.8", available=["cpu", "cuda126", "cuda128", "cuda130"])
    assert (r["selected"], r["selected_exists"]) == ("cuda128", True)


def test_override_naming_an_absent_library():
    r = sel(cuda="13.0", env={"BNB_CUDA_VERSION": "125"})
    assert (r["selected"], r["selected_exists"], r["override"]) == ("cuda125", False, "125")
    assert "BNB_CUDA_VERSION" in r["selected_reason"]


def test_override_naming_a_present_library_wins_over_exact():
    r = sel(cuda="13.0", env={"BNB_CUDA_VERSION": "128"})
    assert (r["selected"], r["selected_exists"]) == ("cuda128", True)


def test_non_digit_override():
    r = sel(cuda="13.0", env={"BNB_CUDA_VERSION": "12.8"})
    assert r["selected"] is None and r["selected_exists"] is False
    assert "digits only" in r["error"]
    # before 0.50 the value was pasted into the file name as it is
    old = sel(version="0.49.2", cuda="12.8", env={"BNB_CUDA_VERSION": "12.8"})
    assert (old["selected"], old["selected_exists"], old["error"]) == ("cuda12.8", False, None)


def test_cpu_torch_selects_cpu_library():
    r = sel(cuda=None)
    assert (r["selected"], r["selected_exists"]) == ("cpu", True)
    r = sel(cuda=None, available=["cuda130"])
    assert (r["selected"], r["selected_exists"]) == ("cpu", False)


def test_cuda_torch_without_a_visible_gpu_loads_cpu_library():
    r = sel(cuda="13.0", cuda_available=False)
    assert r["selected"] == "cpu"
    assert "cannot see a GPU" in r["selected_reason"]


def test_rocm_selection_and_its_own_override():
    r = sel(cuda=None, hip="7.1.52802")
    assert (r["selected"], r["selected_exists"]) == ("rocm71", True)
    r = sel(cuda=None, hip="7.1.52802", env={"BNB_ROCM_VERSION": "72", "BNB_CUDA_VERSION": "118"})
    assert (r["selected"], r["override"]) == ("rocm72", "72")
    r = sel(cuda=None, hip="6.3.1")
    assert (r["selected"], r["selected_exists"]) == ("rocm64", True)  # lowest higher, same major


def test_nocublaslt_variant_for_old_gpus_on_old_releases():
    avail = ["cpu", "cuda121", "cuda121_nocublaslt"]
    old_gpu = sel(version="0.44.1", cuda="12.1", available=avail, highest_cc="7.0")
    assert old_gpu["selected"] == "cuda121_nocublaslt"
    assert sel(version="0.44.1", cuda="12.1", available=avail, highest_cc="8.0")["selected"] == "cuda121"
    assert sel(version="0.50.2", cuda="12.1", available=avail, highest_cc="7.0")["selected"] == "cuda121"


def test_missing_torch_or_unknown_version():
    assert sel(torch_installed=False)["selected"] is None
    assert sel(version="not-a-version")["selected"] is None


def test_loader_table_covers_every_release_once_and_has_sources():
    assert all(r.get("source") for r in RULES)
    for v in ("0.39.0", "0.41.3", "0.43.1", "0.44.1", "0.45.0", "0.49.2", "0.50.0", "0.50.2", "1.2.0"):
        hits = [r for r in RULES if bnb_loader.rule_for(v, [r])]
        assert len(hits) == 1, v


# ---------------------------------------------------------------- dependency resolution


def test_missing_uses_dirs_cache_and_defaults(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "libfoo.so.1").write_bytes(b"")
    (tmp_path / "cached.so").write_bytes(b"")
    cache = {"libcached.so.2": [str(tmp_path / "cached.so")], "libstale.so": [str(tmp_path / "gone.so")]}
    got = libsearch.missing(["libfoo.so.1", "libcached.so.2", "libstale.so", "libbar.so", "/abs/libz.so"],
                            [str(tmp_path / "a")], cache, defaults=[])
    assert got == ["libstale.so", "libbar.so", "/abs/libz.so"]


def test_search_dirs_origin_rpath_runpath_and_ld_library_path(tmp_path):
    d = libsearch.search_dirs("/pkg", ["$ORIGIN/../lib"], [], "/x:/y", ["/wheel"])
    assert d == ["/pkg/../lib", "/x", "/y", "/wheel"]
    # DT_RPATH is ignored when DT_RUNPATH is present (ld.so(8))
    d = libsearch.search_dirs("/pkg", ["/rpath"], ["${ORIGIN}/rt"], None)
    assert d == ["/pkg/rt"]


def test_parse_ld_cache_new_format():
    strings = b"libfoo.so.1\0/opt/lib/libfoo.so.1\0"
    header_len = 48
    entry_len = 24
    str_off = header_len + entry_len
    header = b"glibc-ld.so.cache1.1" + struct.pack("<II", 1, len(strings)) + b"\0" * (header_len - 28)
    entry = struct.pack("<iIIIQ", 0x0303, str_off, str_off + 12, 0, 0)
    assert libsearch.parse_ld_cache(header + entry + strings) == {"libfoo.so.1": ["/opt/lib/libfoo.so.1"]}
    assert libsearch.parse_ld_cache(b"ld.so-1.7.0 old only") == {}


def test_wheel_lib_dirs_finds_nvidia_wheels(tmp_path):
    (tmp_path / "nvidia" / "cublas" / "lib").mkdir(parents=True)
    (tmp_path / "nvidia" / "cu13" / "lib").mkdir(parents=True)
    (tmp_path / "torch" / "lib").mkdir(parents=True)
    dirs = libsearch.wheel_lib_dirs([str(tmp_path)])
    assert str(tmp_path / "nvidia" / "cublas" / "lib") in dirs
    assert str(tmp_path / "nvidia" / "cu13" / "lib") in dirs
    assert str(tmp_path / "torch" / "lib") in dirs


BNB_DIR = find_package("bitsandbytes")


HAS_CUDA130 = BNB_DIR is not None and os.path.exists(os.path.join(BNB_DIR, "libbitsandbytes_cuda130.so"))


@pytest.mark.skipif(not HAS_CUDA130, reason="needs the bitsandbytes wheel with its CUDA 13.0 library")
def test_scan_binaries_resolves_cuda_libs_from_nvidia_wheels(tmp_path):
    pkg = tmp_path / "site" / "bitsandbytes"
    pkg.mkdir(parents=True)
    shutil.copy(os.path.join(BNB_DIR, "libbitsandbytes_cuda130.so"), pkg)
    shutil.copy(os.path.join(BNB_DIR, "libbitsandbytes_cpu.so"), pkg)
    empty_site = tmp_path / "bare"
    empty_site.mkdir()
    without = bnb.scan_binaries(str(pkg), [str(empty_site)], {}, ld_cache={})
    # the RUNPATH (/usr/local/cuda-13.0/...) may exist on a build machine; everything else must be missing
    expect = {n for n in ("libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13")
              if not os.path.exists(f"/usr/local/cuda-13.0/targets/x86_64-linux/lib/{n}")}
    assert set(without["cuda130"]["missing_deps"]) == expect
    site = tmp_path / "site"
    wheels = (("cuda_runtime", ["libcudart.so.13"]), ("cublas", ["libcublas.so.13", "libcublasLt.so.13"]))
    for sub, names in wheels:
        d = site / "nvidia" / sub / "lib"
        d.mkdir(parents=True)
        for n in names:
            (d / n).write_bytes(b"")
    found = bnb.scan_binaries(str(pkg), [str(site)], {}, ld_cache={})
    assert found["cuda130"]["missing_deps"] == []
    assert found["cuda130"]["archs"][0] == "sm_75"
    assert (found["cpu"]["archs"], found["cpu"]["ptx"]) == ([], [])
    env = {"LD_LIBRARY_PATH": str(site / "nvidia" / "cublas" / "lib")}
    via_env = bnb.scan_binaries(str(pkg), [str(empty_site)], env, ld_cache={})
    assert "libcublas.so.13" not in via_env["cuda130"]["missing_deps"]
