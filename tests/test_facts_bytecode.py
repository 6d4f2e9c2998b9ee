"""The bytecode facts on fake site-packages trees: cached, uncached, a pycache prefix, a read-only directory,
and CPython's own reading of the variables (checked against a real interpreter)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from qdoctor.facts import bytecode

TAG = sys.implementation.cache_tag
MODULES = ("__init__", "functional", "serialization")


def fake_package(site, name="torch", modules=MODULES):
    pkg = site / name
    (pkg / "nn").mkdir(parents=True)
    for m in modules:
        (pkg / f"{m}.py").write_text("X = 1\n")
    (pkg / "nn" / "deep.py").write_text("Y = 2\n")  # below the top level: not sampled
    (pkg / "libtorch.so").write_bytes(b"")
    return pkg


def compileall(target, env_extra):
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", **env_extra)
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", str(target)], check=True, env=env,
                   timeout=120)


def test_uncached_package(tmp_path):
    pkg = fake_package(tmp_path)
    st = bytecode.package_state(str(pkg), TAG)
    assert st == {"path": str(pkg), "sampled": 3, "cached": 0, "writable": True}


def test_compileall_writes_bytecode_although_the_variable_is_set(tmp_path):
    """QD613's fix: `python -m compileall` writes .pyc with PYTHONDONTWRITEBYTECODE=1 set, where the
    interpreter looks for them (the collector counts them as cached)."""
    pkg = fake_package(tmp_path)
    compileall(pkg, {"PYTHONPYCACHEPREFIX": ""})
    assert (pkg / "__pycache__" / f"functional.{TAG}.pyc").is_file()
    assert bytecode.package_state(str(pkg), TAG)["cached"] == 3
    assert bytecode.package_state(str(pkg), TAG, optimize=1)["cached"] == 0  # -O reads .opt-1.pyc


def test_a_prefix_hides_the_pycache_beside_the_sources(tmp_path):
    pkg = fake_package(tmp_path / "site")
    compileall(pkg, {"PYTHONPYCACHEPREFIX": ""})
    prefix = tmp_path / "prefix"
    st = bytecode.package_state(str(pkg), TAG, str(prefix))
    assert (st["cached"], st["cached_in_pycache"], st["writable"]) == (0, 3, True)  # prefix not there yet
    compileall(pkg, {"PYTHONPYCACHEPREFIX": str(prefix)})
    assert bytecode.package_state(str(pkg), TAG, str(prefix))["cached"] == 3


def test_cache_paths_match_importlib(tmp_path, monkeypatch):
    src = str(tmp_path / "torch" / "functional.py")
    monkeypatch.setattr(sys, "pycache_prefix", None)
    for opt in (0, 1, 2):
        want = importlib.util.cache_from_source(src, optimization=opt or "")
        got = bytecode.pyc_name("functional", TAG, opt)
        assert os.path.join(bytecode.cache_dir(os.path.dirname(src), None), got) == want
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "pfx"))
    want = importlib.util.cache_from_source(src)
    assert os.path.join(bytecode.cache_dir(os.path.dirname(src), str(tmp_path / "pfx")),
                        bytecode.pyc_name("functional", TAG)) == want


def test_read_only_directory(tmp_path, monkeypatch):
    pkg = fake_package(tmp_path)
    ro = str(pkg)
    real = os.access
    monkeypatch.setattr(bytecode.os, "access", lambda p, mode: False if p == ro else real(p, mode))
    assert bytecode.package_state(ro, TAG)["writable"] is False  # no __pycache__: the package dir decides
    (pkg / "__pycache__").mkdir()
    assert bytecode.package_state(ro, TAG)["writable"] is True  # an existing, writable __pycache__ decides


@pytest.mark.parametrize("value", ["1", "0", "", "yes", "-1", "2"])
def test_env_flag_reads_the_variable_as_cpython_does(value):
    real = subprocess.run([sys.executable, "-c", "import sys; print(int(sys.dont_write_bytecode))"],
                          env=dict(os.environ, PYTHONDONTWRITEBYTECODE=value), capture_output=True, text=True,
                          check=True).stdout.strip()
    assert bool(bytecode.env_flag(value)) == (real == "1")
    assert bytecode.env_flag(None) == 0


def test_collect_for_the_interpreter_this_environment_starts(tmp_path):
    site = tmp_path / "site"
    fake_package(site, "torch")
    peft = fake_package(site, "peft", ("__init__", "mapping"))
    compileall(peft, {"PYTHONPYCACHEPREFIX": ""})
    out = bytecode.collect([str(site)], {"PYTHONDONTWRITEBYTECODE": "1"})
    assert out["cache_tag"] == TAG and out["dont_write_bytecode"] is True and out["pycache_prefix"] is None
    assert out["PYTHONDONTWRITEBYTECODE"] == "1" and out["optimize"] == 0
    assert set(out["packages"]) == {"torch", "peft"}  # bitsandbytes, transformers, accelerate: not there
    assert (out["packages"]["torch"]["cached"], out["packages"]["peft"]["cached"]) == (0, 2)
    # -B of this process is not the environment's: a plain `python` started here writes bytecode
    out = bytecode.collect([str(site)], {"PYTHONDONTWRITEBYTECODE": "0", "PYTHONPYCACHEPREFIX": "rel"})
    assert out["dont_write_bytecode"] is False and out["pycache_prefix"] == os.path.abspath("rel")
    assert out["packages"]["peft"] == {"path": str(peft), "sampled": 2, "cached": 0, "cached_in_pycache": 2,
                                       "writable": True}


def test_an_imported_package_with_pathlike_path_entries(tmp_path, monkeypatch):
    """Once a package is imported, find_spec answers from its __spec__, whose search locations may be Path
    objects (seen with transformers in the full suite): the facts must still be JSON."""
    import json
    import types
    from pathlib import Path

    pkg = fake_package(tmp_path, "qd_fake_pkg")
    spec = importlib.util.spec_from_file_location("qd_fake_pkg", pkg / "__init__.py",
                                                  submodule_search_locations=[Path(pkg)])
    mod = types.ModuleType("qd_fake_pkg")
    mod.__spec__ = spec
    monkeypatch.setitem(sys.modules, "qd_fake_pkg", mod)
    out = bytecode.collect(None, {}, names=["qd_fake_pkg"])
    st = out["packages"]["qd_fake_pkg"]
    assert st["path"] == str(pkg) and st["sampled"] == 3
    json.dumps(out)
