"""The matrix is data the rules trust: every entry cites a source and every field is machine-usable."""

from __future__ import annotations

import re
from pathlib import Path

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


ROOT = Path(__file__).parent.parent
URL = re.compile(r"https?://[^\s;,)]+")
# a public repository reference: owner/repo with an issue, PR, tag, commit or file; or GitHub's name#N
PUBLIC = re.compile(r"\b[\w.-]+/[\w.-]+(?:#\d+| (?:tags?|commit|at|PR|issues?|releases?)\b|: | [\w./-]+\.\w+)"
                    r"|\b[\w.-]+#\d+")
PATH = re.compile(r"(?<![\w/.:-])(?:\.{1,2}/|/|~/)?(?:[\w.-]+/)+[\w.-]+"
                  r"\.(?:md|py|toml|json|txt|yml|yaml|sh|mdx|png)\b")
OUTSIDE = re.compile(r"(?<![\w/.-])(?:/wor[k]/|/tmp/|\.\./|~/|shared/)")


def source_problem(src: str) -> str | None:
    """Why a `source` cannot be checked by a reader of this repository, or None."""
    rest = URL.sub(" ", src)
    if OUTSIDE.search(rest):
        return "points at a file outside the repository"
    here = [p for p in PATH.findall(rest) if (ROOT / p).exists()]
    if URL.search(src) or here or PUBLIC.search(rest):
        return None
    return "is neither a URL, a public repository reference, nor a path in this repository"


def test_source_check_catches_what_it_should():
    assert source_problem("https://github.com/x/y/blob/1.0/a.py") is None
    assert source_problem("measured by qdoctor/smoke/probes/quant.py") is None
    assert source_problem("huggingface/transformers setup.py at d6a6c82680") is None
    assert source_problem("bitsandbytes#1492") is None
    assert source_problem("qdoctor design") is not None
    assert source_problem("measured here; shared/facts/h200.md") is not None
    assert source_problem("see qdoctor/no_such_file.py") is not None


@pytest.mark.parametrize("stem,path,table", list(entries()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_source_can_be_followed(stem, path, table):
    problem = source_problem(table.get("source") or "")
    assert problem is None, f"{stem}.toml {path}: source {table.get('source')!r} {problem}"


# Which torch minors have wheels for a Python on PyPI (pip index versions torch --python-version X
# --only-binary=:all:, 2026-11-29): the first and last minor per Python.
PYPI_TORCH = {"3.8": ("2.0", "2.4"), "3.9": ("2.0", "2.8"), "3.10": ("2.0", "2.14"),
              "3.11": ("2.0", "2.15"), "3.12": ("2.2", "2.15"), "3.13": ("2.5", "2.15"),
              "3.14": ("2.9", "2.15"), "3.15": ("2.15", "2.15")}


def test_torch_wheel_rows_claim_only_pythons_the_release_shipped():
    for w in M["torch_wheels"]["wheel"]:
        if w["variant"] == "cpu":
            continue
        for minor in range(0, 15):
            if not SpecifierSet(w["torch"]).contains(f"2.{minor}.0"):
                continue
            for py, (lo, hi) in PYPI_TORCH.items():
                shipped = Version(lo) <= Version(f"2.{minor}") <= Version(hi)
                claimed = SpecifierSet(w["python"]).contains(py + ".0")
                assert claimed == shipped, (w["torch"], w["variant"], f"torch 2.{minor}", f"Python {py}")
