"""Root causes, not symptoms: consequences name their cause (caused_by), lose their own fix, and are folded
under it in the text and markdown views; the verdict names the root cause; probe failures carry the real
exception text and the known failure's fix."""

from __future__ import annotations

import copy
import json

from test_rules_snapshots import load, run, variant

from qdoctor import matrix
from qdoctor.causes import link
from qdoctor.findings import Finding, roots
from qdoctor.report import render_json, render_markdown, render_text, verdict_line
from qdoctor.smoke.result import findings_for, to_finding
from qdoctor.smoke.runner import build_result

MX = matrix.load()
ASCII = {"ok": "[+]", "info": "[i]", "warning": "[!]", "error": "[x]", "then": "->"}
NON_FIXES = ("python -m bitsandbytes", "rerun", "--force-reinstall", "reinstall")

ERR_802 = ("UserWarning: CUDA initialization: Unexpected error from cudaGetDeviceCount(). Did you run some "
           "cuda functions before calling NumCudaDevices() that might have already set an error? Error 802: "
           "system not yet initialized (Triggered internally at /pytorch/c10/cuda/CUDAFunctions.cpp:119.)")


def by_code(fs):
    return {f.code: f for f in fs}


# ---------------------------------------------------------------- issue example 1: CUDA initialisation

def test_fabric_manager_is_the_one_root_cause():
    fs = run(load("hgx-fabric-manager-stopped"))
    errs = [f for f in fs if f.severity == "error"]
    assert [f.code for f in roots(errs)] == ["QD205"]
    b = by_code(fs)
    assert b["QD306"].caused_by == "QD205"
    assert b["QD305"].caused_by in ("QD306", "QD205") and b["QD407"].caused_by in ("QD306", "QD205", "QD305")
    for code in ("QD305", "QD306", "QD407"):
        assert b[code].fix is None, code  # no fix that contradicts the cause's
    assert "nvidia-fabricmanager-570" in b["QD205"].fix


def test_cuda_init_error_without_driver_facts_still_names_the_cause():
    """An older snapshot (no driver section, no fabric state): the 802 text alone gives the root and fix."""
    d = load("hgx-fabric-manager-stopped")
    d.pop("driver")
    for g in d["nvidia"]["gpus"]:
        g.pop("fabric_state")
    fs = run(d)
    errs = [f for f in fs if f.severity == "error"]
    assert [f.code for f in roots(errs)] == ["QD306"]
    assert "nvidia-fabricmanager" in by_code(fs)["QD306"].fix
    text = render_text(fs, marks=ASCII)
    assert "Verdict: NOT READY (3 errors): root cause QD306" in text
    assert not any(n in text for n in NON_FIXES), text


def test_cuda_init_error_raised_by_is_available_is_not_an_import_failure():
    """When is_available() raised, torch.error holds the CUDA error: no 'reinstall torch' (QD304)."""
    d = load("hgx-fabric-manager-stopped")
    d["runtime"]["warnings"] = []
    cuda_err = ERR_802.split("UserWarning: ")[1]
    d["torch"]["error"] = "torch.cuda.is_available() failed: RuntimeError: " + cuda_err
    fs = run(d)
    assert "QD304" not in by_code(fs)
    assert {f.code for f in roots([f for f in fs if f.severity == "error"])} == {"QD205"}
    assert "QD306" in by_code(fs)


def test_text_view_folds_consequences_under_the_cause():
    fs = run(load("hgx-fabric-manager-stopped"))
    text = render_text(fs, marks=ASCII)
    lines = text.splitlines()
    i = next(i for i, ln in enumerate(lines) if "QD205" in ln and "[x]" in ln)
    block = lines[i:i + 12]
    assert any(ln.strip().startswith("-> QD306") for ln in block)
    assert any(ln.strip().startswith("-> QD407") for ln in block)
    assert text.count("fix:") == 1  # only the root cause has a fix
    assert "bitsandbytes: QD407 follows from QD205" in text
    assert lines[-1].startswith("Verdict: NOT READY (4 errors): root cause QD205 the NVSwitch fabric manager")
    assert "reinstall" not in text


def test_markdown_and_json_carry_the_links():
    fs = run(load("hgx-fabric-manager-stopped"))
    md = render_markdown(fs, None, "check")
    rows = [ln for ln in md.splitlines() if ln.startswith("| error")]
    assert "QD205" in rows[0] and "nvidia-fabricmanager" in rows[0]
    assert all("↳" in r and "(follows from QD205)" in r for r in rows[1:]), rows
    doc = json.loads(render_json(fs, None, "check"))
    links = {f["code"]: f["caused_by"] for f in doc["findings"]}
    assert links["QD205"] is None and links["QD306"] == "QD205"


def test_link_never_closes_a_cycle_and_keeps_unrelated_findings():
    fs = [Finding("QD305", "error", "a"), Finding("QD306", "error", "b"), Finding("QD303", "error", "c")]
    table = {"causes": {"link": [{"consequence": "QD305", "causes": ["QD306"]},
                                 {"consequence": "QD306", "causes": ["QD305"]}]}}
    out = by_code(link(fs, table))
    assert out["QD305"].caused_by == "QD306" and out["QD306"].caused_by is None
    assert out["QD303"].caused_by is None and out["QD303"].fix is None  # untouched
    # a warning never explains an error
    out = by_code(link([Finding("QD305", "error", "a"), Finding("QD306", "warning", "b")], table))
    assert out["QD305"].caused_by is None


def test_verdict_names_several_roots_by_code():
    fs = run(load("v100-cu130"))
    assert verdict_line(fs) == "Verdict: NOT READY (2 errors, 1 warning): root causes QD303, QD404"
    assert verdict_line(run(load("h200-cu130"))) == "Verdict: READY"


def test_driver_module_mismatch_explains_the_nvml_warning():
    err = "nvmlInit failed: Driver/library version mismatch"
    fs = run(variant("h200-synthetic", **{"nvidia.status": "error", "nvidia.gpus": [], "nvidia.error": err}))
    b = by_code(fs)
    assert b["QD206"].severity == "error" and b["QD201"].caused_by == "QD206" and b["QD201"].fix is None


# ---------------------------------------------------------------- issue example 2: the imports probe

PEFT_ERR = ("ImportError: cannot import name 'HybridCache' from 'transformers' "
            "(/venv/lib/python3.12/site-packages/transformers/__init__.py)")


def imports_raw():
    m = {"modules": {"torch": {"ok": True, "error": None}, "bitsandbytes": {"ok": True, "error": None},
                     "transformers": {"ok": True, "error": None}, "peft": {"ok": False, "error": PEFT_ERR}},
         "torch_ok": True, "bitsandbytes_ok": True, "transformers_ok": True, "peft_ok": False,
         "bnb_native_loaded": True, "warnings": [], "logs": []}
    return {"kind": "ok", "duration_s": 2.0, "payload": {"measurements": m}}


def test_imports_probe_carries_the_import_error_and_its_fix():
    r = build_result("imports", imports_raw(), MX)
    assert r.status == "fail" and r.finding["code"] == "KF33"
    assert "HybridCache" in r.error
    f = to_finding(r)
    assert f.fix == "pip install -U 'peft>=0.18.0'"
    assert any("HybridCache" in e for e in f.evidence)
    assert "rerun" not in f.fix


def test_imports_probe_failure_folds_under_the_check_finding_that_predicted_it():
    d = variant("h200-synthetic", **{"packages.peft": "0.17.1"})
    check = run(d)
    assert "QD503" in by_code(check)
    r = build_result("imports", imports_raw(), MX)
    fs = check + findings_for([r], check)
    probe = by_code(fs)["QD711"]
    assert probe.caused_by == "QD503" and probe.fix is None
    text = render_text(fs, marks=ASCII)
    assert "-> QD711" in text and "QD711 follows from QD503" in text


def test_unknown_probe_failures_say_what_to_look_at():
    for raw in ({"kind": "crash", "signal": "SIGSEGV", "duration_s": 0.2,
                 "output_tail": "Fatal Python error: Segmentation fault"},
                {"kind": "timeout", "timeout": 5, "duration_s": 5.0},
                {"kind": "ok", "payload": {"measurements": {}, "error": "ValueError: something odd"}}):
        f = to_finding(build_result("nf4", copy.deepcopy(raw), MX))
        assert f.fix and "rerun" not in f.fix and "report it" in f.fix
