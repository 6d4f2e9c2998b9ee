"""Verified results (matrix/verified/<platform>.json): the platform key, matching the installed stack,
QD510/QD511, `qdoctor matrix`, and scripts/verify_matrix.py's grid and output handling."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
from cli_support import qd

from qdoctor import causes, matrix, verified
from qdoctor.facts.schema import normalize
from qdoctor.rules import judge

ROOT = Path(__file__).resolve().parent.parent
SNAP = ROOT / "tests" / "snapshots"


def load(name):
    return normalize(json.loads((SNAP / f"{name}.json").read_text()))


def result(status, bnb="0.46.1", probes=None, env=None):
    return {"id": f"x-{bnb}", "status": status, "date": "2026-11-29T08:00:00Z", "env": env or {},
            "versions": {"torch": "2.13.0+cpu", "bitsandbytes": bnb, "transformers": "5.24.0",
                         "peft": "0.21.2", "accelerate": "1.15.0"},
            "check": {"predicted": "working"},
            "smoke": {"probes": probes or [{"probe": "imports", "status": "pass"}]}}


BROKEN_PROBES = [
    {"probe": "imports", "status": "pass"},
    {"probe": "nf4", "status": "fail",
     "reason": "raised RuntimeError: quant_type must be nf4 on CPU, got fp4",
     "error": "  torch._check_is_size(blocksize)", "known_failure": None},
    {"probe": "optim8bit", "status": "fail", "reason": "raised  [(torch.Size([512]) ...",
     "error": "RuntimeError: All input tensors need to be on the same GPU"},
]


@pytest.fixture
def data(tmp_path, monkeypatch):
    d = tmp_path / "verified"
    d.mkdir()
    doc = {"schema": verified.SCHEMA, "platform": "linux-x86_64-cpu", "date": "2026-11-29",
           "machine": {"description": "2-core x86_64 CPU, no GPU"},
           "results": [result("broken", "0.46.1", BROKEN_PROBES), result("working", "0.50.2")]}
    (d / "linux-x86_64-cpu.json").write_text(json.dumps(doc))
    monkeypatch.setattr(verified, "verified_dir", lambda: d)
    verified.load.cache_clear()
    yield doc
    verified.load.cache_clear()


def test_platform_key():
    assert verified.platform_key(load("cpu-only-machine")) == "linux-x86_64-cpu"
    assert verified.platform_key(load("h200-cu130")) == "linux-x86_64-cuda-sm_90"
    assert verified.platform_key(load("t4")) == "linux-x86_64-cuda-sm_75"
    assert verified.platform_key({}) == "unknown-unknown-cpu"


def test_match_needs_every_version_and_the_same_loader_settings(data):
    facts = load("cpu-only-machine")  # bitsandbytes 0.50.2, transformers 5.24.0, peft 0.21.2, accelerate 1.15
    assert verified.match(facts, data)["status"] == "working"
    other = copy.deepcopy(facts)
    other["packages"]["accelerate"] = "1.14.0"
    assert verified.match(other, data) is None
    other = copy.deepcopy(facts)
    other["env"]["BNB_CUDA_VERSION"] = "126"
    assert verified.match(other, data) is None  # measured without the override
    other["packages"].pop("peft")
    assert verified.match(other, data) is None


def test_verified_broken_is_an_error_naming_the_probe_and_its_message(data):
    facts = load("cpu-only-machine")
    facts["packages"]["bitsandbytes"] = "0.46.1"
    fs = [f for f in judge(facts, matrix.load()) if f.code in ("QD510", "QD511")]
    assert [(f.code, f.severity) for f in fs] == [("QD510", "error")]
    f = fs[0]
    assert f.title == ("verified broken on linux-x86_64-cpu: probe nf4 fail: "
                       "RuntimeError: quant_type must be nf4 on CPU, got fp4")
    assert any("2-core x86_64 CPU, no GPU" in e for e in f.evidence)
    assert "bitsandbytes 0.50.2" in f.fix  # the verified working combination to move to


def test_verified_working_is_shown_as_info(data):
    fs = [f for f in judge(load("cpu-only-machine"), matrix.load()) if f.code in ("QD510", "QD511")]
    assert [(f.code, f.severity) for f in fs] == [("QD511", "info")]
    assert "verified working on linux-x86_64-cpu" in fs[0].title
    # elsewhere nothing was measured: silence, not a verdict
    assert not [f for f in judge(load("h200-cu130"), matrix.load()) if f.code in ("QD510", "QD511")]


def test_message_prefers_the_exception():
    assert verified.message(BROKEN_PROBES[1]) == "RuntimeError: quant_type must be nf4 on CPU, got fp4"
    p = {"probe": "imports", "status": "fail", "reason": "peft_ok = False, expected True",
         "error": "peft: ImportError: cannot import name 'HybridCache' from 'transformers'"}
    assert verified.message(p) == "peft: ImportError: cannot import name 'HybridCache' from 'transformers'"
    assert verified.message({"status": "crash", "reason": "killed by SIGSEGV"}) == "killed by SIGSEGV"


def test_matrix_command_prints_the_table(data):
    r = qd("matrix", "--platform", "linux-x86_64-cpu")
    assert r.exit_code == 0
    assert "1 working, 1 broken" in r.output
    row = next(ln for ln in r.output.splitlines() if ln.startswith("0.46.1"))
    assert "broken" in row and "nf4 fail: RuntimeError: quant_type must be nf4 on CPU" in row
    md = qd("matrix", "--platform", "linux-x86_64-cpu", "--format", "markdown").output
    assert "| 0.50.2 | 0.21.2 | 5.24.0 | 1.15.0 | 2.13.0+cpu | - | working |" in md
    r = qd("matrix", "--platform", "windows-arm64-cpu")
    assert r.exit_code == 2 and "nothing verified on platform" in r.output


def test_shipped_results_are_well_formed():
    """The shipped files: each result has its versions, a status, and a broken one names a failing probe."""
    plats = verified.platforms()
    assert "linux-x86_64-cpu" in plats
    for p in plats:
        doc = verified.load.__wrapped__(p)
        assert doc["schema"] == verified.SCHEMA and doc["platform"] == p
        for r in doc["results"]:
            assert set(verified.GRID) <= set(r["versions"]), r["id"]
            assert r["status"] in ("working", "broken", "not-installable"), r["id"]
            if r["status"] == "broken":
                assert verified.failing(r) is not None, r["id"]
            text = json.dumps(r)
            assert not re.search(r"/wor[k]/|/tmp/|/root", text), r["id"]  # no machine paths recorded


def _script():
    spec = importlib.util.spec_from_file_location("verify_matrix", ROOT / "scripts" / "verify_matrix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_grid_is_a_cross_product_per_block_and_ids_are_unique(tmp_path):
    vm = _script()
    cpu = vm.load_grid(str(ROOT / "scripts" / "grids" / "cpu.toml"))
    assert len(cpu) >= 30 and len({vm.combo_id(c) for c in cpu}) == len(cpu)
    h200 = vm.load_grid(str(ROOT / "scripts" / "grids" / "h200.toml"))
    assert len(h200) >= 4 and {c["env"].get("BNB_CUDA_VERSION") for c in h200} >= {None, "126"}
    g = tmp_path / "g.toml"
    g.write_text('[[block]]\nbitsandbytes = ["1", "2"]\npeft = "3"\ntransformers = ["4"]\n'
                 'accelerate = ["5"]\nenv = [{}, { BNB_CUDA_VERSION = "126" }]\n')
    ids = [vm.combo_id(c) for c in vm.load_grid(str(g))]
    assert ids == ["bnb-1_peft-3_tf-4_acc-5", "bnb-2_peft-3_tf-4_acc-5",
                   "bnb-1_peft-3_tf-4_acc-5_BNB_CUDA_VERSION-126",
                   "bnb-2_peft-3_tf-4_acc-5_BNB_CUDA_VERSION-126"]


def test_output_resumes_and_scrubs_machine_paths(tmp_path):
    vm = _script()
    out = tmp_path / "v.json"
    o = vm.Output(out, {"schema": verified.SCHEMA, "platform": "p"})
    o.add({"id": "a", "status": "broken", "date": "2026-11-29T00:00:00Z"})
    o.add({"id": "b", "status": "harness-error", "date": "2026-11-29T00:00:00Z"})
    again = vm.Output(out, {"schema": verified.SCHEMA, "platform": "p"})
    assert again.done("a") and not again.done("b") and not again.done("c")  # b and c run again
    vm._PATHS.update({"/x/venvs/envs": "<envs>"})
    s = vm.scrub("File /x/venvs/envs/c1/lib/python3.11/site-packages/peft/x.py, "
                 "/usr/lib/python3/site-packages/y")
    assert s == "File <site-packages>/peft/x.py, <site-packages>/y"


def facts_for(r: dict) -> dict:
    """The recorded CPU machine with a verified combination's versions installed."""
    facts = load("cpu-only-machine")
    for k, v in r["versions"].items():
        facts["packages"][k] = v
    facts["bitsandbytes"]["version"] = r["versions"]["bitsandbytes"]
    facts["torch"]["version"] = r["versions"]["torch"]
    return facts


def test_the_rules_agree_with_every_measurement_on_the_cpu_machine():
    """Measurement wins: with the verified results set aside (QD510/QD511), the rules alone flag every
    combination that was measured broken (an error, or a warning that names the failing probes) and raise no
    error on one measured working. A new disagreement fails here, before it reaches a user."""
    doc = verified.load.__wrapped__("linux-x86_64-cpu")
    mx = matrix.load()
    results = [r for r in doc["results"] if r["status"] in ("working", "broken")]
    assert len(results) >= 30
    wrong = []
    for r in results:
        fs = [f for f in judge(facts_for(r), mx) if f.code not in ("QD510", "QD511")]
        errors = [f.code for f in fs if f.severity == "error"]
        flagged = errors + [f.code for f in fs
                            if f.severity == "warning" and f.area in ("packages", "bitsandbytes")]
        if (r["status"] == "broken") != bool(flagged) or (r["status"] == "working" and errors):
            wrong.append((r["id"], r["status"], flagged))
    assert not wrong, wrong


def test_a_package_pip_replaced_is_hidden_from_the_base(tmp_path, monkeypatch):
    """transformers 4.42 pins numpy<2: the venv gets numpy 1.26 and the base's numpy 2 must vanish from that
    environment (else `check` sees two numpys, which a real install never has)."""
    vm = _script()
    real = tmp_path / "site"
    (real / "numpy-2.4.6.dist-info").mkdir(parents=True)
    (real / "numpy-2.4.6.dist-info" / "top_level.txt").write_text("numpy\n")
    (real / "numpy").mkdir()
    (real / "torch-2.13.0.dist-info").mkdir()
    (real / "torch-2.13.0.dist-info" / "RECORD").write_text("torch/__init__.py,,\nfunctorch/x.py,,\n")
    for d in ("torch", "functorch"):
        (real / d).mkdir()
    env = tmp_path / "env"
    (env / "base").mkdir(parents=True)
    for e in real.iterdir():
        (env / "base" / e.name).symlink_to(e)
    monkeypatch.setattr(vm, "installed_in", lambda env_dir: {"numpy": "1.26.4", "peft": "0.13.2"})
    assert vm.hide_shadowed(env) == ["numpy"]
    left = sorted(p.name for p in (env / "base").iterdir())
    assert left == ["functorch", "torch", "torch-2.13.0.dist-info"]
    assert vm._top_level(real / "torch-2.13.0.dist-info") == {"torch", "functorch"}


def test_the_h200_measurement_folds_under_the_loader_rule_that_predicts_it():
    """The recorded H200 result for bitsandbytes 0.47.0 on a CUDA 13.0 torch (no cuda130 library) is an
    error of its own, with the version-table rule (QD402) named as its cause."""
    from test_rules_snapshots import VARIANTS

    doc = verified.load("linux-x86_64-cuda-sm_90")
    assert doc["machine"] and len(doc["results"]) >= 4 and all(r.get("agrees") for r in doc["results"])
    facts = normalize(copy.deepcopy(VARIANTS["bnb-no-lib-facts"][0]))
    m = matrix.load()
    fs = {f.code: f for f in causes.link(judge(facts, m), m)}
    assert fs["QD510"].severity == "error" and fs["QD510"].caused_by == "QD402", fs.get("QD510")
    assert "bnb_native_loaded" in fs["QD510"].title and fs["QD510"].fix is None
