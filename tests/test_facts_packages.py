"""Installed distributions: conflicts and unmet requirements on invented installs, and the on-disk scan."""

from __future__ import annotations

from qdoctor.facts import packages
from qdoctor.facts.packages import Dist


def no_ns(location, module):
    return False


def test_two_distributions_providing_one_module_conflict():
    ds = [Dist("bitsandbytes", "0.50.2", top_level=("bitsandbytes",), location="/site"),
          Dist("bitsandbytes-cuda117", "0.26.0", top_level=("bitsandbytes",), location="/site"),
          Dist("torch", "2.11.0", top_level=("torch", "functorch"), location="/site")]
    c = packages.find_conflicts(ds, namespace=no_ns)
    assert c == [{"module": "bitsandbytes", "distributions": ["bitsandbytes", "bitsandbytes-cuda117"],
                  "versions": ["0.50.2", "0.26.0"], "locations": ["/site", "/site"]}]


def test_namespace_packages_are_no_conflict(tmp_path):
    (tmp_path / "nvidia").mkdir()  # no __init__.py: PEP 420 namespace shared by the nvidia-* wheels
    (tmp_path / "pynvml").mkdir()
    (tmp_path / "pynvml" / "__init__.py").write_text("")
    ds = [Dist("nvidia-cublas-cu12", "12.8", top_level=("nvidia",), location=str(tmp_path)),
          Dist("nvidia-cudnn-cu12", "9.1", top_level=("nvidia",), location=str(tmp_path)),
          Dist("pynvml", "11.5", top_level=("pynvml",), location=str(tmp_path)),
          Dist("nvidia-ml-py", "12.5", top_level=("pynvml",), location=str(tmp_path))]
    assert [c["module"] for c in packages.find_conflicts(ds)] == ["pynvml"]


def test_same_distribution_installed_twice_is_a_conflict():
    ds = [Dist("torch", "2.11.0", top_level=("torch",), location="/user-site"),
          Dist("torch", "2.4.0", top_level=("torch",), location="/venv-site")]
    c = packages.find_conflicts(ds, namespace=no_ns)
    assert c[0]["distributions"] == ["torch", "torch"] and c[0]["versions"] == ["2.11.0", "2.4.0"]


def test_unmet_requirements():
    ds = [Dist("peft", "0.14.0", requires=("transformers>=4.43", "torch>=1.13.0", "accelerate>=0.21.0",
                                            "pytest; extra == 'test'", "pywin32; sys_platform == 'win32'",
                                            "safetensors")),
          Dist("transformers", "4.39.3", requires=("huggingface-hub<1.0,>=0.19.3",)),
          Dist("torch", "2.4.0+cu121", requires=()),
          Dist("huggingface-hub", "0.20.0"),
          Dist("accelerate", "garbage-version")]
    got = packages.unmet_requirements(ds)
    assert {"package": "peft", "version": "0.14.0", "requirement": "transformers>=4.43",
            "installed": "4.39.3"} in got
    assert {"package": "peft", "version": "0.14.0", "requirement": "safetensors", "installed": None} in got
    reqs = {r["requirement"] for r in got}
    assert not any("pytest" in r or "pywin32" in r or "accelerate" in r or "torch" in r for r in reqs)
    assert len(got) == 2


def test_local_versions_and_prereleases_satisfy_ranges():
    ds = [Dist("bitsandbytes", "0.50.2", requires=("torch<3,>=2.4", "numpy>=1.17")),
          Dist("torch", "2.13.0+cpu"), Dist("numpy", "2.5.0rc1")]
    assert packages.unmet_requirements(ds) == []


def test_only_the_stack_is_checked():
    ds = [Dist("matplotlib", "3.0", requires=("not-installed-anywhere",))]
    assert packages.unmet_requirements(ds) == []


def _dist_info(site, dirname, metadata, top_level=None, record=None):
    d = site / dirname
    d.mkdir(parents=True)
    (d / "METADATA").write_text(metadata + "\n\nLong description\nRequires-Dist: not-a-header\n")
    if top_level is not None:
        (d / "top_level.txt").write_text(top_level)
    if record is not None:
        (d / "RECORD").write_text(record)


def test_scan_of_a_site_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path / "cache"))
    site = tmp_path / "site"
    _dist_info(site, "bitsandbytes-0.45.0.dist-info",
               "Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.45.0\nRequires-Dist: torch\n"
               "Requires-Dist: numpy ; extra == 'dev'", record="bitsandbytes/__init__.py,,\n")
    _dist_info(site, "bitsandbytes_cuda117-0.26.0.dist-info",
               "Name: bitsandbytes-cuda117\nVersion: 0.26.0", top_level="bitsandbytes\n")
    _dist_info(site, "Some_Thing-1.0.dist-info", "Name: Some_Thing\nVersion: 1.0",
               record="some_thing.py,,\n_some_native.cpython-311-x86_64-linux-gnu.so,,\n"
                      "../../bin/x,,\nsome_thing-1.0.dist-info/RECORD,,\n")
    egg = site / "transformers.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Name: transformers\nVersion: 4.30.0\n")
    (egg / "requires.txt").write_text("torch>=9\n\n[dev]\npytest\n\n[:sys_platform == 'nope']\nfoo\n")
    (site / "bitsandbytes").mkdir()
    (site / "bitsandbytes" / "__init__.py").write_text("")

    dists = {d.name: d for d in packages.list_dists([str(site)])}
    assert dists["transformers"].version == "4.30.0"
    assert dists["some-thing"].version == "1.0"
    assert packages.read_top_level(dists["some-thing"].path) == ("_some_native", "some_thing")
    meta = packages.read_metadata(dists["bitsandbytes"].path)
    assert meta["requires"] == ["torch", "numpy ; extra == 'dev'"]
    assert packages.read_metadata(str(egg))["requires"] == ["torch>=9", "foo; sys_platform == 'nope'"]

    res = packages.collect([str(site)])
    assert res["packages"] == {"bitsandbytes": "0.45.0", "bitsandbytes-cuda117": "0.26.0",
                               "transformers": "4.30.0"}
    assert [c["module"] for c in res["conflicts"]] == ["bitsandbytes"]
    assert {(r["package"], r["requirement"], r["installed"]) for r in res["requirements"]} == {
        ("bitsandbytes", "torch", None), ("transformers", "torch>=9", None)}
    assert res["cached"] is False
    again = packages.collect([str(site)])
    assert again["cached"] is True and again["conflicts"] == res["conflicts"]


def test_normalize_name():
    assert packages.normalize_name("Hugging_Face.Hub") == "hugging-face-hub"
    assert packages.is_reported("nvidia-cublas-cu12") and packages.is_reported("torch")
    assert not packages.is_reported("matplotlib")
