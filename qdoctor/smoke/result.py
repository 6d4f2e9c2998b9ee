"""ProbeResult, and how each non-passing result becomes a Finding (area "smoke", codes QD7xx).

Codes: QD7{probe index}{kind}: kind 0 skipped (info), 1 failed (wrong numbers or an exception),
2 crashed (killed by a signal), 3 timed out. QD700 is the summary line; QD701 a runner failure.
A matched known failure (matrix/failures.toml) adds its code, title and fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

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


def _fallback_fix(r: ProbeResult) -> str:
    """What to look at when the failure is not a known one, and why (never just "rerun")."""
    again = f"`qdoctor smoke --probe {r.probe} --format markdown`"
    if r.status == "timeout":
        return ("no result in time: a kernel or the driver hangs (the output tail above shows the last "
                "call); on a slow or busy machine raise --timeout; else report it with " + again)
    if r.status == "crash":
        return ("a native crash (torch, bitsandbytes or the driver), not a Python error: the output tail "
                "above shows the last call; update bitsandbytes and the NVIDIA driver, then report it with "
                + again)
    if r.error:
        return ("not a known failure: the exception above names the call that failed; if `qdoctor check` "
                "finds nothing wrong with the stack, report it with " + again)
    return ("the kernels ran but computed numbers outside the expected band (above): wrong results, not "
            "a crash; compare with `qdoctor check` (a library without this GPU's code), then report it with "
            + again)


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
        fix = _fallback_fix(r)
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


def findings_for(results: list[ProbeResult], check_findings=()) -> list[Finding]:
    """The summary line and one finding per probe that did not pass. A failure that a `check` finding
    predicted (the known failure's check_codes) names that finding as its cause and drops its own fix."""
    fired = [f.code for f in check_findings if f.severity in ("warning", "error")]
    out = [summary_finding(results)]
    for r in results:
        f = to_finding(r)
        if f is None:
            continue
        cause = next((c for c in ((r.finding or {}).get("check_codes") or []) if c in fired), None)
        if cause and f.severity == "error":
            note = f"follows from {cause}: `qdoctor check` predicted this failure"
            f = replace(f, caused_by=cause, fix=None, evidence=[*f.evidence, note])
        out.append(f)
    return out
