"""ProbeResult, and how each non-passing result becomes a Finding (area "smoke", codes QD7xx).

Codes: QD7{probe index}{kind}: kind 0 skipped (info), 1 failed (wrong numbers or an exception),
2 crashed (killed by a signal), 3 timed out. QD700 is the summary line; QD701 a runner failure.
A matched known failure (matrix/failures.toml) adds its code, title and fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qdoctor.findings import Finding
from qdoctor.smoke.registry import PROBES

STATUSES = ("pass", "fail", "skip", "timeout", "crash")
KIND = {"skip": 0, "fail": 1, "crash": 2, "timeout": 3}


@dataclass
class ProbeResult:
    probe: str
    status: str  # pass | fail | skip | timeout | crash
    duration_s: float = 0.0
    peak_memory_mib: float | None = None  # probe process RSS high-water
    peak_cuda_mib: float | None = None  # torch.cuda.max_memory_allocated on CUDA
    measurements: dict = field(default_factory=dict)
    reason: str | None = None  # one line: why it failed or was skipped
    failed_checks: list[str] = field(default_factory=list)  # one line each, for people
    failed_keys: list[str] = field(default_factory=list)  # the measurement keys they judged, for programs
    error: str | None = None  # redacted tail of the exception / stderr
    finding: dict | None = None  # the matched known failure {code, slug, title, fix, source}

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"unknown probe status {self.status!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ProbeResult:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def code_for(probe: str, status: str) -> str:
    return f"QD7{PROBES[probe].index}{KIND[status]}"


def to_finding(r: ProbeResult) -> Finding | None:
    if r.status == "pass":
        return None
    verb = {"fail": "failed", "skip": "skipped", "crash": "crashed", "timeout": "timed out"}[r.status]
    title = f"probe {r.probe} {verb}"
    if r.reason:
        title += f": {r.reason}"
    ev = list(r.failed_checks)
    fix = None
    if r.finding:
        kf = r.finding
        title = f"probe {r.probe} {verb}: {kf['title']}"
        ev.insert(0, f"known failure {kf['code']} ({kf['slug']}); source: {kf['source']}")
        fix = kf["fix"]
    if r.error:
        tail = [ln for ln in r.error.strip().splitlines() if ln.strip()][-3:]
        ev += tail
    if fix is None and r.status in ("fail", "crash", "timeout"):
        fix = (f"rerun `qdoctor smoke --probe {r.probe} -v`; if it persists, attach "
               "`qdoctor smoke --format markdown` to a bug report")
    sev = "info" if r.status == "skip" else "error"
    return Finding(code_for(r.probe, r.status), sev, title, ev, fix, "smoke")


def summary_finding(results: list[ProbeResult]) -> Finding:
    passed = [r for r in results if r.status == "pass"]
    bad = [r for r in results if r.status in ("fail", "crash", "timeout")]
    title = f"{len(passed)}/{len(results)} probes passed"
    if bad:
        title += "; " + ", ".join(f"{r.probe} {r.status}" for r in bad)
    ev = [f"{r.probe}: {r.status} in {r.duration_s:.1f} s" for r in results]
    return Finding("QD700", "ok", title, ev, None, "smoke")


def findings_for(results: list[ProbeResult]) -> list[Finding]:
    out = [summary_finding(results)]
    out += [f for f in (to_finding(r) for r in results) if f is not None]
    return out
