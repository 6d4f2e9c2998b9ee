"""Show findings: a flutter-doctor style text view, JSON for machines, markdown for bug reports.

Renderers are pure: (findings, facts, …) -> str. Redaction is applied to the final string by the
CLI, so nothing a renderer writes can leak a secret.
"""

from __future__ import annotations

import sys

from qdoctor import __version__, strict_json
from qdoctor.findings import Finding, rank, root_code, worst
from qdoctor.ruleref import url

REPORT_SCHEMA = "qdoctor.report/1"

# Area order and display names for the one-line-per-area view.
AREAS = [
    ("platform", "Platform"),
    ("nvidia", "NVIDIA driver and GPUs"),
    ("torch", "PyTorch"),
    ("bitsandbytes", "bitsandbytes"),
    ("packages", "Packages"),
    ("environment", "Environment"),
    ("model", "Model fit"),
    ("smoke", "Probes"),
    ("plan", "Plan"),
    ("general", "Other"),
]
_AREA_NAMES = dict(AREAS)

_MARKS_UTF = {"ok": "[✓]", "info": "[i]", "warning": "[!]", "error": "[✗]", "then": "↳"}
_MARKS_ASCII = {"ok": "[+]", "info": "[i]", "warning": "[!]", "error": "[x]", "then": "->"}


def _marks(stream=None) -> dict:
    enc = (getattr(stream or sys.stdout, "encoding", None) or "").lower()
    return _MARKS_UTF if "utf" in enc else _MARKS_ASCII


def group_by_area(findings: list[Finding]) -> list[tuple[str, list[Finding]]]:
    seen = {}
    for f in findings:
        seen.setdefault(f.area, []).append(f)
    order = [a for a, _ in AREAS if a in seen] + [a for a in seen if a not in _AREA_NAMES]
    return [(a, seen[a]) for a in order]


def is_consequence(f: Finding, findings: list[Finding]) -> bool:
    return root_code(f, findings) != f.code


def _depth(f: Finding, findings: list[Finding]) -> int:
    by_code = {x.code: x for x in findings}
    n, cur, seen = 0, f, {f.code}
    while cur.caused_by in by_code and cur.caused_by not in seen:
        seen.add(cur.caused_by)
        cur, n = by_code[cur.caused_by], n + 1
    return n


def consequences(findings: list[Finding]) -> dict[str, list[Finding]]:
    """Root code -> the findings that follow from it (directly first, then through a chain)."""
    out: dict[str, list[Finding]] = {}
    for f in findings:
        r = root_code(f, findings)
        if r != f.code:
            out.setdefault(r, []).append(f)
    return {r: sorted(fs, key=lambda f: _depth(f, findings)) for r, fs in out.items()}


def verdict_line(findings: list[Finding], ready_text="READY", not_ready_text="NOT READY") -> str:
    """'Verdict: NOT READY (3 errors): root cause QD306 <title>' -- the root causes, not the symptoms."""
    n_err = sum(f.severity == "error" for f in findings)
    n_warn = sum(f.severity == "warning" for f in findings)
    parts = []
    if n_err:
        parts.append(f"{n_err} error{'s' * (n_err != 1)}")
    if n_warn:
        parts.append(f"{n_warn} warning{'s' * (n_warn != 1)}")
    state = not_ready_text if n_err else ready_text
    line = f"Verdict: {state}" + (f" ({', '.join(parts)})" if parts else "")
    roots = list(dict.fromkeys(f.code for f in findings if f.severity == "error"
                               and not is_consequence(f, findings)))
    if len(roots) == 1:
        first = next(f for f in findings if f.code == roots[0])
        line += f": root cause {first.code} {first.title}"
    elif len(roots) > 1:
        line += f": root causes {', '.join(roots)}"
    return line


def _finding_lines(f: Finding, m: dict, verbose: bool, indent: str = "    ") -> list[str]:
    lines = [f"{indent}{m[f.severity]} {f.code} {f.title}"]
    if verbose or f.severity in ("error", "warning"):
        ev = f.evidence if verbose else f.evidence[:2]
        lines += [f"{indent}    • {e}" for e in ev]
    if f.fix and f.severity != "info" or (f.fix and verbose):
        fix_lines = f.fix.splitlines()
        lines.append(f"{indent}    fix: {fix_lines[0]}")
        lines += [f"{indent}         {x}" for x in fix_lines[1:]]
    if verbose:
        lines.append(f"{indent}    see: {url(f.code)}")
    return lines


def render_text(findings: list[Finding], *, verbose: bool = False, header: str | None = None,
                marks: dict | None = None, footer: list[str] | None = None,
                verdict: str | None = None) -> str:
    """One line per area; under it the problems with evidence and fix. A consequence is folded under
    its root cause (no fix of its own); its own area points there."""
    m = {**_MARKS_UTF, **(marks or _marks())}
    lines = []
    if header:
        lines += [header, ""]
    under = consequences(findings)
    area_of = {}
    for f in findings:
        area_of.setdefault(f.code, f.area)
    for area, fs in group_by_area(findings):
        w = worst(fs)
        top = [f for f in fs if not is_consequence(f, findings)]
        folded = [f for f in fs if is_consequence(f, findings)]
        summary = next((f.title for f in top if f.severity == "ok"), None)
        name = _AREA_NAMES.get(area, area)
        elsewhere: dict[str, list[str]] = {}  # root code -> codes of this area that follow from it
        for f in folded:
            r = root_code(f, findings)
            if area_of.get(r) != area:
                elsewhere.setdefault(r, []).append(f.code)

        def follows(r: str, elsewhere=elsewhere) -> str:
            codes = list(dict.fromkeys(elsewhere[r]))
            verb = "follows" if len(codes) == 1 else "follow"
            return f"{', '.join(codes)} {verb} from {r} (see {_AREA_NAMES.get(area_of[r], area_of[r])})"

        problems = [f for f in top if f.severity != "ok"]
        if summary is None and not problems and elsewhere:
            summary = "; ".join(follows(r) for r in elsewhere)
            elsewhere = {}
        lines.append(f"{m[w]} {name}" + (f": {summary}" if summary else ""))
        for f in sorted(top, key=lambda f: -rank(f.severity)):
            if f.severity == "ok":
                if verbose:
                    lines += [f"    • {e}" for e in f.evidence]
                continue
            lines += _finding_lines(f, m, verbose)
            for c in under.pop(f.code, []):
                lines.append(f"        {m['then']} {c.code} {c.title}")
                if verbose:
                    lines += [f"            • {e}" for e in c.evidence]
        for r in elsewhere:
            lines.append(f"    {m['then']} {follows(r)}")
    lines.append("")
    lines += footer or []
    lines.append(verdict or verdict_line(findings))
    return "\n".join(lines) + "\n"


def render_json(findings: list[Finding], facts: dict | None, command: str, extra: dict | None = None) -> str:
    doc = {
        "schema": REPORT_SCHEMA,
        "command": command,
        "qdoctor_version": __version__,
        "facts": facts,
        "findings": [{**f.to_dict(), "url": url(f.code)} for f in findings],
        "verdict": "error" if worst(findings) == "error" else "ok",
    }
    if extra:
        doc.update(extra)
    return strict_json.dumps(doc, indent=2, sort_keys=False) + "\n"


def render_markdown(findings: list[Finding], facts: dict | None, command: str,
                    extra_sections: list[str] | None = None) -> str:
    lines = [f"### qdoctor {command} ({__version__})", "", verdict_line(findings), ""]
    lines += ["| | code | area | finding | fix |", "|---|---|---|---|---|"]
    under = consequences(findings)

    def row(f: Finding, prefix: str = "") -> str:
        fix = (f.fix or "").replace("\n", "<br>").replace("|", "\\|")
        title = f.title.replace("|", "\\|")
        code = f"[{f.code}]({url(f.code)})"
        if f.caused_by:
            fix = f"(follows from {root_code(f, findings)})"
        elif fix:
            fix = f"`{fix}`"
        return f"| {f.severity} | {prefix}{code} | {f.area} | {title} | {fix} |"

    for f in sorted(findings, key=lambda f: (-rank(f.severity), f.code)):
        if is_consequence(f, findings):
            continue
        lines.append(row(f))
        for c in under.pop(f.code, []):
            lines.append(row(c, "↳ "))
    for s in extra_sections or []:
        lines += ["", s]
    if facts is not None:
        lines += ["", "<details><summary>facts</summary>", "", "```json",
                  strict_json.dumps(facts, indent=2), "```", "", "</details>"]
    return "\n".join(lines) + "\n"
