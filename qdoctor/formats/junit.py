"""JUnit XML for CI test reports (Jenkins, GitLab, Azure, GitHub test-report actions).

One test case per area (check) and per probe (smoke). A test case fails on an error finding (a warning
too under --strict); its failure carries the code, the evidence, the fix and the rule's URL. A finding
that follows from another says so in its own test case ("follows from QD205 in NVIDIA driver and GPUs")
and is listed under its cause's failure, so the report shows the root cause first as the views do.
Written against the Jenkins xUnit plugin's junit-10.xsd (tests/schemas/, validated in a test).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from qdoctor import __version__
from qdoctor.findings import Finding, rank, root_code
from qdoctor.report import AREAS, consequences, group_by_area, is_consequence, verdict_line
from qdoctor.ruleref import url

_AREA_NAMES = dict(AREAS)
# XML 1.0 forbids most control characters (a probe's output tail can hold ANSI escapes)
_BAD_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _clean(s: str) -> str:
    return _BAD_XML.sub("", s)


def _fails(f: Finding, strict: bool) -> bool:
    return f.severity == "error" or (strict and f.severity == "warning")


def _finding_text(f: Finding, findings: list[Finding], under: dict[str, list[Finding]]) -> list[str]:
    lines = [f"{f.code} [{f.severity}] {f.title}"]
    if f.caused_by and is_consequence(f, findings):
        r = root_code(f, findings)
        cause = next(x for x in findings if x.code == r)
        lines.append(f"  follows from {r} ({_AREA_NAMES.get(cause.area, cause.area)}): {cause.title}")
    lines += [f"  - {e}" for e in f.evidence]
    if f.fix:
        fix = f.fix.splitlines()
        lines.append(f"  fix: {fix[0]}")
        lines += [f"       {x}" for x in fix[1:]]
    lines.append(f"  see: {url(f.code)}")
    for c in under.get(f.code, []):
        lines.append(f"  consequence: {c.code} {c.title} ({_AREA_NAMES.get(c.area, c.area)})")
    return lines


def _message(fs: list[Finding], findings: list[Finding]) -> str:
    parts = []
    for f in fs:
        s = f"{f.code} {f.title}"
        if is_consequence(f, findings):
            s += f" (follows from {root_code(f, findings)})"
        parts.append(s)
    return "; ".join(parts)


def _case(suite, name: str, classname: str, fs: list[Finding], findings, under, strict: bool,
          time_s: float | None = None, skipped: str | None = None) -> tuple[bool, bool]:
    tc = ET.SubElement(suite, "testcase", name=name, classname=classname)
    if time_s is not None:
        tc.set("time", f"{time_s:.3f}")
    failing = sorted((f for f in fs if _fails(f, strict)),
                     key=lambda f: (is_consequence(f, findings), -rank(f.severity), f.code))
    if failing:
        body = []
        for f in failing:
            body += _finding_text(f, findings, under)
        el = ET.SubElement(tc, "failure", type=failing[0].code, message=_clean(_message(failing, findings)))
        el.text = _clean("\n".join(body) + "\n")
    elif skipped is not None:
        ET.SubElement(tc, "skipped", message=_clean(skipped))
    rest = [f for f in fs if not _fails(f, strict)]
    if rest:
        out = []
        for f in sorted(rest, key=lambda f: -rank(f.severity)):
            out += _finding_text(f, findings, under) if f.severity != "ok" else [f"{f.code} [ok] {f.title}"]
        ET.SubElement(tc, "system-out").text = _clean("\n".join(out) + "\n")
    return bool(failing), skipped is not None and not failing


def _probe_index() -> dict[str, int]:
    from qdoctor.smoke.registry import ORDER

    return {p.name: p.index for p in ORDER}


def render_junit(findings: list[Finding], command: str, *, probes: list[dict] | None = None,
                 strict: bool = False) -> str:
    under = consequences(findings)
    root = ET.Element("testsuites", name="qdoctor")
    suite = ET.SubElement(root, "testsuite", name=f"qdoctor {command}", package="qdoctor")
    props = ET.SubElement(suite, "properties")
    ET.SubElement(props, "property", name="qdoctor_version", value=__version__)
    ET.SubElement(props, "property", name="strict", value=str(strict).lower())
    n = n_fail = n_skip = 0
    total_time = 0.0
    summary: list[str] = []
    for area, fs in group_by_area(findings):
        if probes is not None and area == "smoke":
            continue  # one test case per probe instead
        failed, skipped = _case(suite, _AREA_NAMES.get(area, area), f"qdoctor.{command}.{area}", fs, findings,
                                under, strict)
        n, n_fail, n_skip = n + 1, n_fail + failed, n_skip + skipped
    if probes is not None:
        index = _probe_index()
        smoke_fs = [f for f in findings if f.area == "smoke"]
        for p in probes:
            prefix = f"QD7{index.get(p['probe'], 'x')}"
            fs = [f for f in smoke_fs if f.code.startswith(prefix) and len(f.code) == 5]
            skip = (p.get("reason") or "skipped") if p.get("status") == "skip" else None
            t = float(p.get("duration_s") or 0.0)
            total_time += t
            failed, skipped = _case(suite, f"probe {p['probe']}", f"qdoctor.{command}.probes", fs, findings,
                                    under, strict, time_s=t, skipped=skip)
            n, n_fail, n_skip = n + 1, n_fail + failed, n_skip + skipped
        summary = [f"{f.code} {f.title}" for f in smoke_fs
                   if not f.code.startswith(tuple(f"QD7{i}" for i in index.values())) or len(f.code) != 5]
    ET.SubElement(suite, "system-out").text = _clean("\n".join([*summary, verdict_line(findings)]) + "\n")
    suite.set("tests", str(n))
    suite.set("failures", str(n_fail))
    suite.set("errors", "0")
    suite.set("skipped", str(n_skip))
    suite.set("time", f"{total_time:.3f}")
    for k, v in (("tests", n), ("failures", n_fail), ("errors", 0)):
        root.set(k, str(v))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
