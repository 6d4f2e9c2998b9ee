"""Show findings: a flutter-doctor style text view, JSON for machines, markdown for bug reports.

Renderers are pure: (findings, facts, …) -> str. Redaction is applied to the final string by the
CLI, so nothing a renderer writes can leak a secret.
"""

from __future__ import annotations

import sys

from qdoctor import __version__, strict_json
from qdoctor.findings import Finding, rank, worst

REPORT_SCHEMA = "qdoctor.report/1"

# Area order and display names for the one-line-per-area view.
AREAS = [
    ("platform", "Platform"),
    ("nvidia", "NVIDIA driver and GPUs"),
    ("torch", "PyTorch"),
    ("bitsandbytes", "bitsandbytes"),
    ("packages", "Packages"),
    ("environment", "Environment"),
    ("smoke", "Probes"),
    ("plan", "Plan"),
    ("general", "Other"),
]
_AREA_NAMES = dict(AREAS)

_MARKS_UTF = {"ok": "[✓]", "info": "[i]", "warning": "[!]", "error": "[✗]"}
_MARKS_ASCII = {"ok": "[+]", "info": "[i]", "warning": "[!]", "error": "[x]"}


def _marks(stream=None) -> dict:
    enc = (getattr(stream or sys.stdout, "encoding", None) or "").lower()
    return _MARKS_UTF if "utf" in enc else _MARKS_ASCII


def group_by_area(findings: list[Finding]) -> list[tuple[str, list[Finding]]]:
    seen = {}
    for f in findings:
        seen.setdefault(f.area, []).append(f)
    order = [a for a, _ in AREAS if a in seen] + [a for a in seen if a not in _AREA_NAMES]
    return [(a, seen[a]) for a in order]


def verdict_line(findings: list[Finding], ready_text="READY", not_ready_text="NOT READY") -> str:
    n_err = sum(f.severity == "error" for f in findings)
    n_warn = sum(f.severity == "warning" for f in findings)
    parts = []
    if n_err:
        parts.append(f"{n_err} error{'s' * (n_err != 1)}")
    if n_warn:
        parts.append(f"{n_warn} warning{'s' * (n_warn != 1)}")
    state = not_ready_text if n_err else ready_text
    return f"Verdict: {state}" + (f" ({', '.join(parts)})" if parts else "")


def render_text(findings: list[Finding], *, verbose: bool = False, header: str | None = None,
                marks: dict | None = None, footer: list[str] | None = None) -> str:
    m = marks or _marks()
    lines = []
    if header:
        lines += [header, ""]
    for area, fs in group_by_area(findings):
        w = worst(fs)
        summary = next((f.title for f in fs if f.severity == "ok"), None)
        name = _AREA_NAMES.get(area, area)
        lines.append(f"{m[w]} {name}" + (f": {summary}" if summary else ""))
        shown = sorted(fs, key=lambda f: -rank(f.severity))
        for f in shown:
            if f.severity == "ok":
                if verbose:
                    lines += [f"    • {e}" for e in f.evidence]
                continue
            lines.append(f"    {m[f.severity]} {f.code} {f.title}")
            if verbose or f.severity in ("error", "warning"):
                ev = f.evidence if verbose else f.evidence[:2]
                lines += [f"        • {e}" for e in ev]
            if f.fix and f.severity != "info" or (f.fix and verbose):
                fix_lines = f.fix.splitlines()
                lines.append(f"        fix: {fix_lines[0]}")
                lines += [f"             {x}" for x in fix_lines[1:]]
    lines.append("")
    lines += footer or []
    lines.append(verdict_line(findings))
    return "\n".join(lines) + "\n"


def render_json(findings: list[Finding], facts: dict | None, command: str, extra: dict | None = None) -> str:
    doc = {
        "schema": REPORT_SCHEMA,
        "command": command,
        "qdoctor_version": __version__,
        "facts": facts,
        "findings": [f.to_dict() for f in findings],
        "verdict": "error" if worst(findings) == "error" else "ok",
    }
    if extra:
        doc.update(extra)
    return strict_json.dumps(doc, indent=2, sort_keys=False) + "\n"


def render_markdown(findings: list[Finding], facts: dict | None, command: str,
                    extra_sections: list[str] | None = None) -> str:
    lines = [f"### qdoctor {command} ({__version__})", "", verdict_line(findings), ""]
    lines += ["| | code | area | finding | fix |", "|---|---|---|---|---|"]
    for f in sorted(findings, key=lambda f: (-rank(f.severity), f.code)):
        fix = (f.fix or "").replace("\n", "<br>").replace("|", "\\|")
        title = f.title.replace("|", "\\|")
        lines.append(f"| {f.severity} | {f.code} | {f.area} | {title} | {('`' + fix + '`') if fix else ''} |")
    for s in extra_sections or []:
        lines += ["", s]
    if facts is not None:
        lines += ["", "<details><summary>facts</summary>", "", "```json",
                  strict_json.dumps(facts, indent=2), "```", "", "</details>"]
    return "\n".join(lines) + "\n"
