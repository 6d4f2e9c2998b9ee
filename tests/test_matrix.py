"""The matrix is data the rules trust: every entry cites a source and every field is machine-usable."""

from __future__ import annotations

import re

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from qdoctor import matrix
from qdoctor.rules.common import bnb_pick, cc_tuple, cuda_tuple, driver_min, first_bnb_with_lib

M = matrix.load()
SM = re.compile(r"sm_\d{2,3}[af]?$")


def entries():
    """(file, path, table) for every table in every matrix file: arrays of tables and plain tables."""
    for stem, doc in M.items():
        for key, val in doc.items():
            if isinstance(val, list) and val and all(isinstance(x, dict) for x in val):
                for i, x in enumerate(val):
                    yield stem, f"{key}[{i}]", x
            elif isinstance(val, dict):
                yield stem, key, val


def test_matrix_files_present():
    assert {"gpus", "cuda_drivers", "torch_wheels", "bitsandbytes", "packages"} <= set(M)


@pytest.mark.parametrize("stem,path,table", list(entries()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_entry_has_a_source(stem, path, table):
    src = table.get("source")
    assert isinstance(src, str) and src.strip(), f"{stem}.toml {path} has no source"


def test_specifiers_parse():
    for w in M["torch_wheels"]["wheel"]:
        SpecifierSet(w["torch"]), SpecifierSet(w["python"])
        assert all(SM.match(a) for a in w["sass"] + w["ptx"]), w
        assert w["variant"] == "cpu" or cuda_tuple(w["cuda"]) == cuda_tuple(w["variant"]), w
    for r in M["bitsandbytes"]["release"]:
        SpecifierSet(r["versions"])
        for k in ("torch", "python"):
            if k in r:
                SpecifierSet(r[k])
        assert all(re.fullmatch(r"cuda\d{3}", x) for x in r["cuda_libs"]), r
    for a in M["bitsandbytes"]["libarchs"]:
        SpecifierSet(a["versions"])
        assert all(SM.match(x) for x in a["sass"] + a["ptx"]), a
    for kb in M["packages"]["known_bad"]:
        assert kb["severity"] in ("info", "warning", "error")
        assert kb["error"] and kb["fix"], kb["id"]
        for spec in kb["when"].values():
            SpecifierSet(spec)
    for pf in M["packages"]["python_floor"]:
        SpecifierSet(pf["versions"]), SpecifierSet(pf["python"])


def test_bnb_release_ranges_do_not_overlap():
    probes = [f"0.{m}.{p}" for m in range(39, 52) for p in range(0, 6)]
    for v in probes:
        hits = [
            r["versions"] for r in M["bitsandbytes"]["release"] if Version(v) in SpecifierSet(r["versions"])
        ]
        assert len(hits) <= 1, (v, hits)


def test_gpu_families_cover_distinct_capabilities():
    seen = {}
    for f in M["gpus"]["family"]:
        for cc in f["cc"]:
            assert cc_tuple(cc), cc
            assert cc not in seen, (cc, f["name"], seen.get(cc))
            seen[cc] = f["name"]
            assert f["bf16_native"] == (cc_tuple(cc) >= (8, 0)), (cc, f["name"])


def test_driver_minimums_grow_with_cuda():
    rows = sorted(M["cuda_drivers"]["cuda"], key=lambda r: cuda_tuple(r["version"]))
    mins = [tuple(int(x) for x in r["linux_min"].split(".")) for r in rows]
    assert mins == sorted(mins)
    assert driver_min(M, "12.6") == "560.28.03" and driver_min(M, "12.6", windows=True) == "560.76"


def test_bnb_tables_answer_known_questions():
    # the first release with a library for each torch CUDA
    assert first_bnb_with_lib(M, (12, 4)) == "0.43.1"
    assert first_bnb_with_lib(M, (12, 8)) == "0.45.3"
    assert first_bnb_with_lib(M, (13, 0)) == "0.48.0"
    assert first_bnb_with_lib(M, (13, 2)) == "0.50.0"
    libs = ["cuda118", "cuda121", "cuda124", "cuda126", "cuda128", "cuda130", "cuda132"]
    assert bnb_pick(M, "0.50.2", libs, (12, 9)) == "cuda128"
    assert bnb_pick(M, "0.49.2", libs, (12, 9)) is None  # exact only before 0.50
    assert bnb_pick(M, "0.50.2", libs, (13, 1)) == "cuda130"
    assert bnb_pick(M, "0.50.2", libs, (11, 7)) == "cuda118"
    assert bnb_pick(M, "0.50.2", libs, (14, 0)) is None
