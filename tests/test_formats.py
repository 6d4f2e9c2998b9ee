"""CI output formats: JUnit XML (validated against the Jenkins xUnit schema), GitHub workflow commands
(GitHub's escaping), --format auto, and the rule URL every finding carries."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from cli_support import qd

from qdoctor.findings import Finding
from qdoctor.formats import resolve_auto
from qdoctor.formats.github import escape_data, escape_property, render_github
from qdoctor.formats.junit import render_junit
from qdoctor.ruleref import url
from qdoctor.smoke.result import ProbeResult, findings_for

HERE = Path(__file__).parent
SNAP = HERE / "snapshots"
XSD = HERE / "schemas" / "junit-10.xsd"


@pytest.fixture(scope="module")
def schema():
    xmlschema = pytest.importorskip("xmlschema", reason="the test extra installs xmlschema")
    return xmlschema.XMLSchema(str(XSD))


def fabric():
    """The fabric-manager snapshot: one root cause (QD205) with three consequences in other areas."""
    return str(SNAP / "hgx-fabric-manager-stopped.json")


# ---------------------------------------------------------------- JUnit
@pytest.mark.parametrize("name", ["h200-cu130", "v100-cu130", "hgx-fabric-manager-stopped",
                                  "cpu-only-machine", "conflict", "wsl-vgpu"])
def test_junit_of_check_is_valid_against_the_schema(schema, name):
    r = qd("check", "--facts", str(SNAP / f"{name}.json"), "--format", "junit")
    assert r.exit_code in (0, 1), r.output
    schema.validate(r.output)  # raises on any violation
    root = ET.fromstring(r.output)
    suite = root.find("testsuite")
    cases = suite.findall("testcase")
    assert int(suite.get("tests")) == len(cases) >= 5  # one per area
    assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases)
    assert (int(suite.get("failures")) > 0) == (r.exit_code == 1)


def test_junit_failure_carries_code_evidence_fix_url_and_causes(schema):
    r = qd("check", "--facts", fabric(), "--format", "junit")
    assert r.exit_code == 1
    cases = {c.get("name"): c for c in ET.fromstring(r.output).iter("testcase")}
    f = cases["NVIDIA driver and GPUs"].find("failure")
    assert f.get("type") == "QD205"
    assert "NVML fabric state = not-started" in f.text  # evidence
    assert "fix: sudo apt-get install -y nvidia-fabricmanager-570" in f.text
    assert url("QD205") in f.text
    assert "consequence: QD305" in f.text and "consequence: QD407" in f.text
    bnb = cases["bitsandbytes"].find("failure")
    assert bnb.get("type") == "QD407"
    assert "(follows from QD205)" in bnb.get("message")
    assert "follows from QD205 (NVIDIA driver and GPUs)" in bnb.text


def test_junit_strict_turns_warnings_into_failures(schema):
    fs = [Finding("QD600", "ok", "env fine", area="environment"),
          Finding("QD603", "warning", "a warning", ["e"], "do x", "environment")]
    loose = ET.fromstring(render_junit(fs, "check"))
    strict = ET.fromstring(render_junit(fs, "check", strict=True))
    assert loose.find("testsuite").get("failures") == "0"
    assert "QD603 [warning] a warning" in loose.find(".//system-out").text
    assert strict.find("testsuite").get("failures") == "1"
    assert strict.find(".//failure").get("type") == "QD603"
    schema.validate(render_junit(fs, "check", strict=True))


def test_junit_of_smoke_has_one_case_per_probe(schema):
    results = [ProbeResult("imports", "fail", 7.3, reason="peft_ok = False, expected True",
                           error="peft: ImportError: cannot import name 'HybridCache'\x1b[0m",
                           finding={"code": "KF33", "slug": "peft-hybridcache", "title": "peft too old",
                                    "fix": "pip install -U 'peft>=0.18.0'", "source": "s",
                                    "check_codes": ["QD503"]}),
               ProbeResult("nf4", "pass", 0.4),
               ProbeResult("lora_step", "skip", reason="peft did not import (imports probe)"),
               ProbeResult("optim8bit", "crash", 1.0, reason="killed by SIGSEGV")]
    check = [Finding("QD503", "error", "known-bad combination: peft 0.17.1 + transformers 5.0.0", ["ev"],
                     "pip install -U 'peft>=0.18.0'", "packages")]
    findings = check + findings_for(results, check)
    xml = render_junit(findings, "smoke", probes=[r.to_dict() for r in results])
    schema.validate(xml)
    root = ET.fromstring(xml)
    probes = {c.get("name"): c for c in root.iter("testcase") if c.get("classname") == "qdoctor.smoke.probes"}
    assert set(probes) == {"probe imports", "probe nf4", "probe lora_step", "probe optim8bit"}
    imp = probes["probe imports"].find("failure")
    assert imp.get("type") == "QD711" and "(follows from QD503)" in imp.get("message")
    assert "\x1b" not in xml  # control characters are not XML
    assert probes["probe lora_step"].find("skipped").get("message") == "peft did not import (imports probe)"
    assert probes["probe optim8bit"].find("failure").get("type") == "QD762"
    assert probes["probe nf4"].find("failure") is None and probes["probe nf4"].get("time") == "0.400"
    suite = root.find("testsuite")
    assert (suite.get("failures"), suite.get("skipped")) == ("3", "1")  # packages, imports, optim8bit


# ---------------------------------------------------------------- GitHub
def test_github_escaping_follows_the_runner_rules():
    assert escape_data("50% done\r\nnext") == "50%25 done%0D%0Anext"
    assert escape_property("QD303: a, b") == "QD303%3A a%2C b"
    assert escape_data("a: b, c") == "a: b, c"  # ':' and ',' only in properties


def _parse(line: str) -> tuple[str, dict, str]:
    m = re.fullmatch(r"::(\w+)(?: ([^:]*))?::(.*)", line)
    assert m, line
    props = dict(p.split("=", 1) for p in (m.group(2) or "").split(",") if p)
    return m.group(1), props, m.group(3)


def test_github_annotations_root_first_consequences_say_their_cause():
    r = qd("check", "--facts", fabric(), "--format", "github")
    assert r.exit_code == 1
    lines = r.output.splitlines()
    annotations = [_parse(ln) for ln in lines if ln.startswith("::")]
    level, props, msg = annotations[0]
    assert level == "error" and props["title"].startswith("QD205 ")
    assert "%0A" in msg and "\n" not in msg and "↳ QD305" in msg.replace("%0A", "\n")
    assert url("QD205") in msg
    rest = {p["title"]: m for _, p, m in annotations[1:]}
    assert "QD407 (follows from QD205)" in rest
    assert "follows from QD205: the NVSwitch fabric manager" in rest["QD407 (follows from QD205)"]
    assert lines[-1].startswith("qdoctor check: Verdict: NOT READY")


def test_github_levels_and_no_ok_lines():
    fs = [Finding("QD100", "ok", "fine", area="platform"), Finding("QD201", "info", "no GPU", area="nvidia"),
          Finding("QD603", "warning", "w: x, y", area="environment")]
    ann = [_parse(ln) for ln in render_github(fs, "check").splitlines() if ln.startswith("::")]
    assert [a[0] for a in ann] == ["warning", "notice"]
    assert ann[0][1]["title"] == "QD603 w%3A x%2C y"


# ---------------------------------------------------------------- auto, url
def test_format_auto_picks_github_under_actions_only():
    assert resolve_auto({"GITHUB_ACTIONS": "true"}) == "github"
    assert resolve_auto({"GITHUB_ACTIONS": "false"}) == "text" and resolve_auto({}) == "text"
    r = qd("check", "--facts", fabric(), "--format", "auto", env={"GITHUB_ACTIONS": "true"})
    assert r.output.startswith("::error title=QD205")
    r = qd("check", "--facts", fabric(), "--format", "auto", env={"GITHUB_ACTIONS": ""})
    assert r.output.startswith("qdoctor check") and "::error" not in r.output


def test_every_finding_links_its_rule():
    doc = json.loads(qd("check", "--facts", fabric(), "--json").output)
    assert all(f["url"] == url(f["code"]) for f in doc["findings"])
    assert url("QD205").endswith("docs/rules.md#qd205")
    text = qd("check", "--facts", fabric(), "-v").output
    assert f"see: {url('QD205')}" in text
    assert f"see: {url('QD205')}" not in qd("check", "--facts", fabric()).output  # only with -v
    md = qd("check", "--facts", fabric(), "--format", "markdown").output
    assert f"[QD205]({url('QD205')})" in md and f"↳ [QD407]({url('QD407')})" in md


def test_rules_url_can_point_at_a_mirror():
    assert url("QD303", {"QDOCTOR_RULES_URL": "https://example.org/rules.html"}) == \
        "https://example.org/rules.html#qd303"


def test_every_code_the_code_can_emit_has_an_anchor():
    """Codes written in the source (rules, probes, training, known failures) all have `<a id>` anchors in
    docs/rules.md, so no finding links to nowhere."""
    from qdoctor import matrix
    from qdoctor.rules import load_rules
    from qdoctor.rulesdoc import documented_codes
    from qdoctor.smoke.registry import ORDER
    from qdoctor.smoke.result import KIND

    src = HERE.parent / "qdoctor"
    literal = set()
    for p in src.rglob("*.py"):
        literal |= set(re.findall(r"[\"'](QD\d{3})[\"']", p.read_text()))
    probe = {f"QD7{p.index}{k}" for p in ORDER for k in KIND.values()}
    known = {f["code"] for f in matrix.load()["failures"]["failure"]}
    emitted = literal | probe | known | {c for r in load_rules() for c in r.codes}
    assert {"QD001", "QD205", "QD510", "QD511", "QD700", "QD711", "QD801", "KF04"} <= emitted
    doc = (HERE.parent / "docs" / "rules.md").read_text()
    anchors = set(re.findall(r'<a id="([a-z0-9]+)"></a>', doc))
    missing = sorted(c for c in emitted if c.lower() not in anchors)
    assert not missing, f"codes without an anchor in docs/rules.md: {missing}"
    assert len(documented_codes(load_rules())) == len(anchors)  # one anchor per code, none twice
