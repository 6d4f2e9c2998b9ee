"""`qdoctor check --facts` through click's runner: exit codes, output formats, selection, redaction,
and the generated rule reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_support import qd

SNAP = Path(__file__).parent / "snapshots"
DOCS = Path(__file__).parent.parent / "docs" / "rules.md"
SECRET = "hf_abcdefghijklmnopqrstuvwx123"
URL_PASSWORD = "s3cr3t-pa55word"


def snap(name: str) -> str:
    return str(SNAP / f"{name}.json")


@pytest.mark.parametrize(
    "name,code", [("h200-cu130", 0), ("cpu-only-machine", 0), ("v100-cu130", 1), ("old-driver", 1), ("t4", 0)]
)
def test_exit_codes(name, code):
    r = qd("check", "--facts", snap(name))
    assert r.exit_code == code, r.output
    assert ("NOT READY" in r.output) == (code == 1)


def test_strict_turns_warnings_into_exit_1():
    assert qd("check", "--facts", snap("t4")).exit_code == 0
    assert qd("check", "--facts", snap("t4"), "--strict").exit_code == 1


def test_bad_facts_files_exit_2(tmp_path):
    cases = {
        "missing": None,
        "truncated.json": '{"schema": "qdoctor.facts/1", "nvidia": {"gpus": [',
        "array.json": "[1, 2, 3]",
        "wrong-schema.json": json.dumps({"schema": "something.else/9", "facts": None}),
        "wrong-type.json": json.dumps({"schema": "qdoctor.facts/1", "nvidia": []}),
        "report-wrong-schema.json": json.dumps(
            {"schema": "qdoctor.report/1", "facts": {"schema": "other/1"}}
        ),
    }
    for name, text in cases.items():
        p = tmp_path / name
        if text is not None:
            p.write_text(text)
        r = qd("check", "--facts", str(p))
        assert r.exit_code == 2, (name, r.output)
        assert "Traceback" not in r.output
        assert len([x for x in r.output.splitlines() if x.strip()]) == 1, (name, r.output)


def test_json_shape_and_reload(tmp_path):
    r = qd("check", "--facts", snap("v100-cu130"), "--json")
    assert r.exit_code == 1
    doc = json.loads(r.output)
    assert {"schema", "qdoctor_version", "facts", "findings"} <= set(doc)
    assert doc["facts"]["nvidia"]["gpus"][0]["compute_capability"] == "7.0"
    for f in doc["findings"]:
        assert {"code", "severity", "title", "evidence", "fix"} <= set(f)
    assert {f["code"] for f in doc["findings"] if f["severity"] == "error"} == {"QD303", "QD404"}
    # a saved report is itself a valid --facts input and is judged the same
    p = tmp_path / "report.json"
    p.write_text(r.output)
    again = json.loads(qd("check", "--facts", str(p), "--json").output)
    assert [f["code"] for f in again["findings"]] == [f["code"] for f in doc["findings"]]


def test_markdown_format():
    r = qd("check", "--facts", snap("v100-cu130"), "--format", "markdown")
    assert r.exit_code == 1
    assert "| error | [QD303](" in r.output and "<details><summary>facts</summary>" in r.output


def test_select_and_ignore():
    r = qd("check", "--facts", snap("v100-cu130"), "--json", "--select", "QD4")
    codes = {f["code"] for f in json.loads(r.output)["findings"]}
    assert codes and all(c.startswith("QD4") for c in codes) and r.exit_code == 1
    r = qd("check", "--facts", snap("v100-cu130"), "--json", "--ignore", "QD303,QD404")
    codes = {f["code"] for f in json.loads(r.output)["findings"]}
    assert not codes & {"QD303", "QD404"} and r.exit_code == 0


@pytest.mark.parametrize("cmd,flag", [("check", "--select"), ("check", "--ignore"), ("smoke", "--select"),
                                      ("smoke", "--ignore")])
def test_unknown_code_or_prefix_is_a_usage_error(cmd, flag):
    """A typo in a CI gate (`--select QD999`) must not select nothing and pass (issue 7, item 8)."""
    args = ["--facts", snap("v100-cu130"), flag, "QD4,QD999"] if cmd == "check" else [flag, "QD999"]
    r = qd(cmd, *args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and f"{flag} QD999: no such code or prefix" in lines[0]
    assert "QD4xx bitsandbytes" in lines[0] and "KFxx" in lines[0] and "QD8xx" in lines[0]
    # every family the reference lists is accepted, in any case
    for ok in ("qd0", "QD7", "KF", "QD801", "QD208"):
        assert qd("check", "--facts", snap("t4"), "--select", ok).exit_code in (0, 1), ok


def test_unknown_gpu_architecture_is_not_a_silent_ready(tmp_path):
    """A GPU whose compute capability is null (or garbage) gets a warning naming it (issue 7, item 9)."""
    for cc in (None, "n/a"):
        facts = json.loads((SNAP / "h200-cu130.json").read_text())
        facts = facts.get("facts", facts)
        facts["nvidia"]["gpus"][0]["compute_capability"] = cc
        f = tmp_path / "cc.json"
        f.write_text(json.dumps(facts))
        r = qd("check", "--facts", str(f))
        assert r.exit_code == 0 and "QD208" in r.output and "architecture unknown" in r.output
        assert "Verdict: READY (1 warning)" in r.output
        assert qd("check", "--facts", str(f), "--strict").exit_code == 1


def test_verbose_shows_all_evidence():
    quiet = qd("check", "--facts", snap("v100-cu130")).output
    loud = qd("check", "--facts", snap("v100-cu130"), "-v").output
    assert "libraries here with sm_70: cuda118, cuda121, cuda124, cuda126, cuda128" in loud
    # a matrix row used as evidence says how sure the matrix is of it
    assert "torch cu126 wheels contain sm_50, sm_60, sm_70" in loud
    assert "(matrix, confidence: secondhand)" in loud
    assert len(loud) > len(quiet)


def test_secrets_never_printed(tmp_path):
    facts = json.loads((SNAP / "wsl-vgpu.json").read_text())
    facts["env"]["HF_TOKEN"] = SECRET
    facts["env"]["HTTPS_PROXY"] = f"http://alice:{URL_PASSWORD}@proxy.example:3128"
    facts["env"]["PIP_INDEX_URL"] = f"https://bob:{URL_PASSWORD}@pypi.example/simple"
    facts["bitsandbytes"]["error"] = (
        f"failed while fetching https://carol:{URL_PASSWORD}@x.example/ with {SECRET}"
    )
    p = tmp_path / "leaky.json"
    p.write_text(json.dumps(facts))
    for args in ([], ["-v"], ["--json"], ["--format", "markdown"]):
        r = qd("check", "--facts", str(p), *args)
        assert r.exit_code in (0, 1), r.output
        assert SECRET not in r.output and URL_PASSWORD not in r.output, args
    r = qd("check", "--facts", str(p), "-v")
    assert "HF_TOKEN" in r.output  # QD607 names it, without its value


def test_rules_reference_is_generated():
    r = qd("rules", "--format", "markdown")
    assert r.exit_code == 0
    assert r.output == DOCS.read_text(), (
        "docs/rules.md is stale: qdoctor rules --format markdown > docs/rules.md"
    )
    assert "## QD303" in r.output and "## QD404" in r.output


def test_every_code_of_every_command_is_documented_once():
    from qdoctor.rules import load_rules
    from qdoctor.rulesdoc import other_codes

    codes = [c for r in load_rules() for c in r.codes] + [c for c, *_ in other_codes()]
    assert len(codes) == len(set(codes)), "a finding code is used twice"
    doc = (Path(__file__).resolve().parent.parent / "docs" / "rules.md").read_text()
    for c in ("QD732", "QD753", "QD801", "QD802", "QD803", "KF12", "QD501"):
        assert c in codes
        assert any(m in doc for m in (f"**{c}**", f"## {c} ", f"## {c},", f", {c} ", f", {c},")), c
