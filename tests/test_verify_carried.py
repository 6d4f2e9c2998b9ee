"""scripts/verify_matrix.py on the offline GPU machine: trimmed bitsandbytes installs (`carry`), the check
that a grid measures releases and not the trimming, `run --carried` layering a release over the base
interpreter (run here against a stub interpreter), and what the rules predict for each combination of the
H200 grid."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import stat
import sys
from pathlib import Path

import pytest

from qdoctor import bnb_loader, matrix
from qdoctor.facts.schema import normalize
from qdoctor.rules import judge

ROOT = Path(__file__).resolve().parent.parent
GRIDS = ROOT / "scripts" / "grids"
SNAP = ROOT / "tests" / "snapshots"


def _script():
    spec = importlib.util.spec_from_file_location("verify_matrix", ROOT / "scripts" / "verify_matrix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MANIFEST = {"bitsandbytes": {
    "0.50.2": {"dir": "bitsandbytes-0.50.2", "shipped": ["cpu", "cuda126", "cuda128", "cuda130", "cuda132"],
               "kept": ["cpu", "cuda126", "cuda130"], "dropped": ["cuda128", "cuda132"]},
    "0.47.0": {"dir": "bitsandbytes-0.47.0", "shipped": ["cpu", "cuda126", "cuda128", "cuda129"],
               "kept": ["cpu"], "dropped": ["cuda126", "cuda128", "cuda129"]}}}


def combo(ver, **env):
    return {"versions": {"bitsandbytes": ver}, "env": env}


def test_trim_artefact_refuses_what_the_trimming_would_change():
    vm = _script()
    rules = bnb_loader.rules(matrix.load())
    ok = [combo("0.50.2"), combo("0.50.2", BNB_CUDA_VERSION="126"), combo("0.50.2", BNB_CUDA_VERSION="125"),
          combo("0.47.0")]  # 12.5 never shipped; 0.47.0 looks for cuda130 whether or not cuda12x travel
    assert [vm.trim_artefact(c, MANIFEST, "13.0", rules) for c in ok] == [None] * 4
    assert "dropped" in vm.trim_artefact(combo("0.50.2", BNB_CUDA_VERSION="132"), MANIFEST, "13.0", rules)
    assert "dropped" in vm.trim_artefact(combo("0.50.2", BNB_CUDA_VERSION="132"), MANIFEST, None, rules)
    # on a CUDA 12.8 torch the whole 0.50.2 wheel loads cuda128; the trimmed one would fall back to cuda126
    why = vm.trim_artefact(combo("0.50.2"), MANIFEST, "12.8", rules)
    assert why and "loads cuda128" in why and "cuda126" in why
    assert vm.trim_artefact(combo("0.48.2"), MANIFEST, "13.0", rules) == "bitsandbytes 0.48.2 was not carried"


def test_the_h200_grid_loads_only_libraries_that_travel():
    """The tracked manifest is the grid's [carry] table as built: kept + dropped = the wheel's libraries, and
    no combination of the grid measures a dropped one (on the H200's CUDA 13.0 torch, or at all)."""
    vm = _script()
    import tomllib

    carry = tomllib.loads((GRIDS / "h200.toml").read_text())["carry"]
    man = json.loads((GRIDS / "h200-carried.json").read_text())
    grid = vm.load_grid(str(GRIDS / "h200.toml"))
    assert len(grid) >= 6 and len({vm.combo_id(c) for c in grid}) == len(grid)
    assert {c["versions"]["bitsandbytes"] for c in grid} == set(carry["keep"]) == set(man["bitsandbytes"])
    assert all(set(c["versions"]) == {"bitsandbytes"} for c in grid)  # the rest is the machine's own
    for ver, e in man["bitsandbytes"].items():
        assert e["kept"] == sorted(carry["keep"][ver]) and "cpu" in e["kept"]
        assert sorted(e["kept"] + e["dropped"]) == e["shipped"], ver
        assert re.fullmatch(r"[0-9a-f]{64}", e["sha256"])
    assert vm.grid_artefacts(grid, man, man["torch_cuda"]) == []
    assert vm.grid_artefacts(grid, man, None) == []
    assert {d: e["modules"] for d, e in man["deps"].items()}.keys() == {"click", "packaging", "psutil",
                                                                       "nvidia-ml-py"}


# ---------------------------------------------------------------- run --carried against a stub interpreter
STUB = r'''#!{python}
"""Stands in for the GPU machine's python3: `-m qdoctor check|smoke --json` answer from the H200 snapshot
with the bitsandbytes found first on PYTHONPATH, and log how they were called; anything else is real."""
import json, os, re, sys
if sys.argv[1:3] != ["-m", "qdoctor"]:
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
path = os.environ.get("PYTHONPATH", "").split(os.pathsep)
ver = None
init = os.path.join(path[0], "bitsandbytes", "__init__.py")
if os.path.isfile(init):
    ver = re.search(r'__version__ = "(.+)"', open(init).read()).group(1)
ov = os.environ.get("BNB_CUDA_VERSION")
with open(os.environ["STUB_LOG"], "a") as fh:
    fh.write(json.dumps({{"cmd": sys.argv[3], "path": path, "ov": ov, "cwd": os.getcwd()}}) + "\n")
facts = json.load(open(os.environ["STUB_FACTS"]))["facts"]
facts["packages"]["bitsandbytes"] = ver
if ver is None:
    facts["packages"].pop("bitsandbytes")
facts["env"]["BNB_CUDA_VERSION"] = ov
bad = ov == "125"
if sys.argv[3] == "check":
    f = [{{"code": "QD403", "severity": "error", "title": "BNB_CUDA_VERSION=125 names a library ..."}}]
    print(json.dumps({{"facts": facts, "findings": f if bad else []}}))
    sys.exit(1 if bad else 0)
probes = [{{"probe": "imports", "status": "pass", "duration_s": 1.0}},
          {{"probe": "nf4", "status": "fail" if bad else "pass", "duration_s": 0.1,
           "reason": "raised RuntimeError: No compatible CUDA binary" if bad else None,
           "error": "RuntimeError: No compatible CUDA binary found at /x/site-packages/bitsandbytes/l.so"
                    if bad else None}}]
print(json.dumps({{"device": "cuda", "probes": probes}}))
sys.exit(1 if bad else 0)
'''


def _release(root: Path, name: str, version: str) -> None:
    pkg = root / name / "bitsandbytes"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f'__version__ = "{version}"\n')


@pytest.fixture
def carried(tmp_path, monkeypatch):
    stub = tmp_path / "python3"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    root = tmp_path / "carried"
    _release(root, "bitsandbytes-0.50.2", "0.50.2")
    _release(root, "bitsandbytes-0.48.2", "0.47.0")  # mislabelled: the run must notice
    for d in ("click", "qd-absent-dep"):
        (root / "deps" / d).mkdir(parents=True)
    man = {"grid": "g.toml", "torch_cuda": "13.0",
           "bitsandbytes": {
               "0.50.2": {"dir": "bitsandbytes-0.50.2", "shipped": ["cpu", "cuda126", "cuda130"],
                          "kept": ["cpu", "cuda130"], "dropped": ["cuda126"]},
               "0.48.2": {"dir": "bitsandbytes-0.48.2", "shipped": ["cpu", "cuda130"],
                          "kept": ["cpu", "cuda130"], "dropped": []}},
           "deps": {"click": {"dir": "deps/click", "modules": ["click"]},
                    "qd-absent-dep": {"dir": "deps/qd-absent-dep", "modules": ["qd_absent_dep"]}}}
    (root / "carried.json").write_text(json.dumps(man))
    log = tmp_path / "log.jsonl"
    monkeypatch.setenv("STUB_LOG", str(log))
    monkeypatch.setenv("STUB_FACTS", str(SNAP / "h200-cu130.json"))
    monkeypatch.setenv("BNB_CUDA_VERSION", "999")  # the caller's own setting never leaks into a combination
    return tmp_path, stub, root, log


def _run(vm, tmp, stub, root, grid_text, monkeypatch):
    grid = tmp / "g.toml"
    grid.write_text(grid_text)
    monkeypatch.setattr(vm, "render", lambda path: None)
    out = tmp / "out.json"
    rc = vm.main(["run", "--grid", str(grid), "--carried", str(root), "--base-python", str(stub),
                  "--work", str(tmp / "work"), "--out", str(out), "-j", "2", "--timeout", "5"])
    return rc, out


def test_carried_run_layers_each_release_over_the_base_interpreter(carried, monkeypatch, capsys):
    tmp, stub, root, log = carried
    vm = _script()
    rc, out = _run(vm, tmp, stub, root, '[[block]]\nbitsandbytes = ["0.50.2"]\n'
                   'env = [{}, { BNB_CUDA_VERSION = "125" }]\n[[block]]\nbitsandbytes = ["0.48.2"]\n',
                   monkeypatch)
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["platform"] == "linux-x86_64-cuda-sm_90" and "NVIDIA H200" in doc["machine"]["description"]
    assert "--carried" in doc["method"]
    res = {r["id"]: r for r in doc["results"]}
    assert sorted(res) == ["bnb-0.48.2", "bnb-0.50.2", "bnb-0.50.2_BNB_CUDA_VERSION-125"]
    ok, bad, wrong = res["bnb-0.50.2"], res["bnb-0.50.2_BNB_CUDA_VERSION-125"], res["bnb-0.48.2"]
    # the versions the grid left to the base come from check's facts: the machine's own stack
    assert ok["versions"] == {"bitsandbytes": "0.50.2", "torch": "2.11.0", "transformers": "5.17.0",
                              "peft": "0.21.0", "accelerate": "1.15.0"}
    assert (ok["status"], ok["check"]["predicted"], ok["agrees"]) == ("working", "working", True)
    assert ok["env"] == {}
    assert ok["carried"] == {"kept": ["cpu", "cuda130"], "dropped": ["cuda126"]}
    assert (bad["status"], bad["check"]["predicted"], bad["agrees"]) == ("broken", "broken", True)
    assert bad["error"].startswith("nf4: raised RuntimeError: No compatible CUDA binary")
    assert "/x/" not in json.dumps(bad) and "<site-packages>/bitsandbytes" in json.dumps(bad)
    assert wrong["status"] == "harness-error"
    assert wrong["error"] == "check saw bitsandbytes 0.47.0 (asked for 0.48.2)" and "smoke" not in wrong
    calls = [json.loads(ln) for ln in log.read_text().splitlines()]
    base_call = calls[0]  # the base interpreter's own facts: qdoctor and the deps it lacks, no bitsandbytes
    assert base_call["path"] == [str(ROOT), str(root / "deps" / "qd-absent-dep")] and base_call["ov"] is None
    runs = [c for c in calls[1:] if c["path"][0].endswith("bitsandbytes-0.50.2")]
    assert sorted((c["cmd"], c["ov"] or "-") for c in runs) == [("check", "-"), ("check", "125"),
                                                                ("smoke", "-"), ("smoke", "125")]
    for c in runs:  # the release first, then qdoctor, then only the dependencies the base lacks
        assert c["path"] == [str(root / "bitsandbytes-0.50.2"), str(ROOT),
                             str(root / "deps" / "qd-absent-dep")]
        assert Path(c["cwd"]).parent == (tmp / "work" / "envs").resolve()
    assert "carried dependencies: qd-absent-dep" in capsys.readouterr().out


def test_carried_run_refuses_a_grid_that_measures_the_trimming(carried, monkeypatch, capsys):
    tmp, stub, root, log = carried
    vm = _script()
    rc, out = _run(vm, tmp, stub, root, '[[block]]\nbitsandbytes = ["0.50.2"]\n'
                   'env = [{ BNB_CUDA_VERSION = "126" }]\n', monkeypatch)
    assert rc == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "bnb-0.50.2_BNB_CUDA_VERSION-126: BNB_CUDA_VERSION=126 names libbitsandbytes_cuda126" in err


def test_carried_run_stops_on_another_platform_than_expected(carried, monkeypatch, capsys):
    tmp, stub, root, log = carried
    vm = _script()
    grid = tmp / "g.toml"
    grid.write_text('[[block]]\nbitsandbytes = ["0.50.2"]\n')
    out = tmp / "out.json"
    rc = vm.main(["run", "--grid", str(grid), "--carried", str(root), "--base-python", str(stub),
                  "--work", str(tmp / "work"), "--out", str(out), "--expect-platform", "linux-x86_64-cpu"])
    assert rc == 2 and not out.exists()
    assert "this machine is linux-x86_64-cuda-sm_90, not linux-x86_64-cpu" in capsys.readouterr().err


def test_carried_folder_unpacks_its_tarball_once(tmp_path):
    vm = _script()
    import tarfile

    src = tmp_path / "stage"
    (src / "bitsandbytes-1.0" / "bitsandbytes").mkdir(parents=True)
    (src / "carried.json").write_text('{"bitsandbytes": {}}')
    (tmp_path / "gpu").mkdir()
    with tarfile.open(tmp_path / "gpu" / vm.TARBALL, "w:xz") as tf:
        for e in src.iterdir():
            tf.add(e, arcname=e.name)
    root, man = vm.unpack_carried(tmp_path / "gpu", tmp_path / "work")
    assert root == tmp_path / "work" / "carried" and man == {"bitsandbytes": {}}
    assert (root / "bitsandbytes-1.0" / "bitsandbytes").is_dir()
    (root / "marker").write_text("")
    assert vm.unpack_carried(tmp_path / "gpu", tmp_path / "work")[0] == root and (root / "marker").exists()
    assert vm.unpack_carried(root, tmp_path / "elsewhere")[0] == root  # an unpacked folder is used as is
    with pytest.raises(SystemExit, match="no carried.json"):
        vm.unpack_carried(tmp_path / "work" / "envs-none", tmp_path / "w2")


# ---------------------------------------------------------------- what the rules predict on the H200
# Needed sonames of the carried libraries (readelf -d) that the H200 machine lacks: it has CUDA 13 runtimes
# (torch 2.11.0+cu130's nvidia-* wheels) and cusparse 12.x (libcusparse.so.12), no CUDA 12 runtime; the
# snapshot records the same for 0.50.2's cuda126.
CUDA12_MISSING = {
    "0.50.2": ["libcudart.so.12", "libcublas.so.12", "libcublasLt.so.12"],
    "0.46.1": ["libcudart.so.12", "libcublas.so.12", "libcublasLt.so.12", "libnvJitLink.so.12"],
}
# What `check` says for each combination of scripts/grids/h200.toml: (predicted, error and warning codes).
H200_PREDICTED = {
    "bnb-0.50.2": ("working", []),
    "bnb-0.50.2_BNB_CUDA_VERSION-130": ("working", []),
    "bnb-0.50.2_BNB_CUDA_VERSION-132": ("warned", ["QD604"]),
    "bnb-0.50.2_BNB_CUDA_VERSION-126": ("broken", ["QD405", "QD604"]),
    "bnb-0.50.2_BNB_CUDA_VERSION-125": ("broken", ["QD403"]),
    "bnb-0.48.2": ("working", []),
    "bnb-0.49.2": ("working", []),
    "bnb-0.46.1": ("broken", ["QD402"]),
    "bnb-0.47.0": ("broken", ["QD402"]),
    "bnb-0.46.1_BNB_CUDA_VERSION-128": ("broken", ["QD405", "QD604"]),
}


def h200_facts(c: dict, man: dict) -> dict:
    """The recorded H200 machine with a carried release installed and the combination's environment."""
    facts = normalize(json.loads((SNAP / "h200-cu130.json").read_text()))
    ver = c["versions"]["bitsandbytes"]
    kept = man["bitsandbytes"][ver]["kept"]
    facts["packages"]["bitsandbytes"] = ver
    facts["env"]["BNB_CUDA_VERSION"] = c["env"].get("BNB_CUDA_VERSION")
    rec = facts["bitsandbytes"]["binaries"]
    bins = {}
    for lib in kept:
        major = lib[4:6] if lib.startswith("cuda") else None
        missing = CUDA12_MISSING.get(ver, CUDA12_MISSING["0.46.1"]) if major == "12" else []
        known = copy.deepcopy(rec[lib]) if ver == "0.50.2" else {"archs": None, "ptx": None}
        bins[lib] = {**known, "missing_deps": missing}
    b = {"installed": True, "version": ver, "path": "<carried>", "binaries": bins, "loads": None,
         "error": None, "wheel_tag": "py3-none-manylinux_2_24_x86_64"}
    sel = bnb_loader.select_library(ver, "13.0", None, kept, c["env"], bnb_loader.rules(matrix.load()),
                                    cuda_available=True, highest_cc="9.0")
    facts["bitsandbytes"] = {**b, **sel}
    return facts


def test_what_the_rules_predict_for_the_h200_grid():
    """Recorded so the measurement can be held against it: each combination judged on the H200 snapshot (no
    verified results for that platform yet). Where the measurement disagrees, the measurement wins and this
    table changes with the rule or the data that was wrong."""
    vm = _script()
    man = json.loads((GRIDS / "h200-carried.json").read_text())
    mx = matrix.load()
    got = {}
    for c in vm.load_grid(str(GRIDS / "h200.toml")):
        fs = [f for f in judge(h200_facts(c, man), mx) if f.code not in vm.VERIFIED_CODES]
        errs = [{"code": f.code} for f in fs if f.severity == "error"]
        warns = [{"code": f.code} for f in fs if f.severity == "warning"]
        got[vm.combo_id(c)] = (vm.predicted(errs, warns), sorted(f["code"] for f in errs + warns))
    assert got == H200_PREDICTED


def test_carried_manifest_names_no_machine_path():
    text = (GRIDS / "h200-carried.json").read_text()
    assert not re.search(r"/wor[k]/|/tmp/|/root", text)
    assert os.sep + "home" not in text
