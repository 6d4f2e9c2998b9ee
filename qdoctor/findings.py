"""The one data model every command reports in: a finding with a stable code.

Rules, probes and the planner all produce `Finding`s, so the renderers, the exit codes and the
JSON contract are shared by `check`, `smoke` and `train`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SEVERITIES = ("ok", "info", "warning", "error")
_RANK = {s: i for i, s in enumerate(SEVERITIES)}


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str
    title: str
    evidence: list[str] = field(default_factory=list)
    fix: str | None = None
    area: str = "general"
    caused_by: str | None = None  # the code of the finding this one follows from (see qdoctor.causes)

    def __post_init__(self):
        if self.severity not in _RANK:
            raise ValueError(f"unknown severity {self.severity!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def roots(findings) -> list[Finding]:
    """Findings that follow from no other finding present: what the user has to fix."""
    present = {f.code for f in findings}
    return [f for f in findings if not f.caused_by or f.caused_by not in present]


def root_code(f: Finding, findings) -> str:
    """The code at the end of f's caused_by chain (cycles and dangling links stop the walk)."""
    by_code = {x.code: x for x in findings}
    seen = {f.code}
    cur = f
    while cur.caused_by and cur.caused_by in by_code and cur.caused_by not in seen:
        seen.add(cur.caused_by)
        cur = by_code[cur.caused_by]
    return cur.code


def rank(severity: str) -> int:
    return _RANK[severity]


def worst(findings, default: str = "ok") -> str:
    sev = [f.severity for f in findings]
    return max(sev, key=rank) if sev else default


def exit_code(findings, strict: bool = False) -> int:
    """0: no error finding; 1: at least one error (or a warning under --strict)."""
    w = worst(findings)
    if w == "error" or (strict and w == "warning"):
        return 1
    return 0


def select(findings, select_codes=(), ignore_codes=()):
    """Keep findings whose code starts with a selected prefix and none of the ignored ones."""
    out = []
    for f in findings:
        if select_codes and not any(f.code.startswith(s) for s in select_codes):
            continue
        if any(f.code.startswith(s) for s in ignore_codes):
            continue
        out.append(f)
    return out
