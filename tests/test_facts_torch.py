"""torch's build read from files: version.py parsing, the fatbin arch list, missing or broken installs."""

from __future__ import annotations

import os
import shutil

import pytest

from qdoctor.facts import torch_build
from qdoctor.facts.torch_build import build_targets, parse_version_py

CUDA_VERSION_PY = """from typing import Optional

__all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip', 'rocm', 'xpu']
__version__ = '2.11.0+cu130'
debug = False
cuda: Optional[str] = '13.0'
git_version = 'abc'
hip: Optional[str] = None
"""


def test_parse_version_py():
    v = parse_version_py(CUDA_VERSION_PY)
    assert (v["__version__"], v["cuda"], v["hip"], v["debug"]) == ("2.11.0+cu130", "13.0", None, False)
    with pytest.raises(ValueError):
        parse_version_py("\x00\x01 this is not python")


def test_build_targets_keep_the_common_archs():
    counts = {"sm_75": 400, "sm_80": 400, "sm_90": 410, "sm_89": 3, "sm_100": 399}
    assert build_targets(counts, 410) == ["sm_75", "sm_80", "sm_90", "sm_100"]
    assert build_targets({}, 0) == []


def fake_torch(site, version_py, lib=None):
    pkg = site / "torch"
    (pkg / "lib").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('this fake torch must never be imported')\n")
    (pkg / "version.py").write_text(version_py)
    if lib:
        shutil.copy(lib, pkg / "lib" / "libtorch_cuda.so")
    return pkg


def test_absent_torch(tmp_path):
    t = torch_build.collect([str(tmp_path)], {})
    assert t["installed"] is False and t["version"] is None and t["error"] is None


def test_garbage_version_py(tmp_path):
    fake_torch(tmp_path, "<<<garbage>>>")
    t = torch_build.collect([str(tmp_path)], {"torch": "2.5.0"})
    assert t["installed"] is True
    assert t["version"] == "2.5.0"  # from the distribution metadata
    assert "version.py" in t["error"]
    assert t["cuda"] is None and t["arch_list"] is None  # unknown, not "CPU build"


def test_cpu_build(tmp_path):
    fake_torch(tmp_path, "__version__ = '2.13.0+cpu'\ncuda = None\nhip = None\n")
    t = torch_build.collect([str(tmp_path)], {})
    assert (t["version"], t["cuda"], t["arch_list"], t["source"]) == ("2.13.0+cpu", None, [], "static")


BNB130 = None
_bnb = torch_build.find_package("bitsandbytes")
if _bnb and os.path.exists(os.path.join(_bnb, "libbitsandbytes_cuda130.so")):
    BNB130 = os.path.join(_bnb, "libbitsandbytes_cuda130.so")


@pytest.mark.skipif(BNB130 is None, reason="needs a CUDA library with a fatbinary (bitsandbytes' cuda130)")
def test_cuda_build_arch_list_from_the_fatbinary(tmp_path, monkeypatch):
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path / "cache"))
    fake_torch(tmp_path, CUDA_VERSION_PY, lib=BNB130)  # any CUDA ELF serves as libtorch_cuda.so
    t = torch_build.collect([str(tmp_path)], {})
    assert (t["version"], t["cuda"]) == ("2.11.0+cu130", "13.0")
    assert t["arch_list"] == ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"]


def test_unreadable_cuda_library_is_an_error_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path / "cache"))
    pkg = fake_torch(tmp_path, CUDA_VERSION_PY)
    (pkg / "lib" / "libtorch_cuda.so").write_bytes(b"not an elf")
    t = torch_build.collect([str(tmp_path)], {})
    assert t["cuda"] == "13.0" and t["arch_list"] is None
    assert "fatbinary" in t["error"]
