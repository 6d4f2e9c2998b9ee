"""Before a run: the `check` findings and the probes the run depends on, cached by environment fingerprint.

A relaunch on an unchanged machine reuses the cached probe results (qdoctor.cache, kind "train-preflight").
Error findings stop the run unless --force.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qdoctor.findings import Finding

CACHE_KIND = "train-preflight"
CPU_PROBES = ("imports", "nf4", "optim8bit")
GPU_PROBES = ("imports", "device", "nf4", "matmul4bit", "optim8bit", "precision")


@dataclass
class Preflight:
    facts: dict
    findings: list[Finding]
    probes: list[dict] = field(default_factory=list)
    fingerprint: str | None = None
    cached: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]


def probe_names(facts: dict) -> tuple[str, ...]:
    gpus = (facts.get("nvidia") or {}).get("gpus") or []
    return GPU_PROBES if gpus and (facts.get("torch") or {}).get("cuda") else CPU_PROBES


def _probe_findings(probes: list[dict]) -> list[Finding]:
    """Failed, crashed or timed-out probes block the run (smoke's own codes and fixes)."""
    from qdoctor.smoke.result import ProbeResult, to_finding

    out = []
    for p in probes:
        if p.get("status") in ("fail", "crash", "timeout"):
            f = to_finding(ProbeResult.from_dict(p))
            if f is not None:
                out.append(Finding(f.code, "error", f.title, f.evidence, f.fix, f.area))
    return out


def run(device: str | None, *, skip_probes: bool = False, timeout: float = 120.0) -> Preflight:
    from qdoctor import cache, matrix
    from qdoctor.facts import collect
    from qdoctor.rules import judge

    facts = collect(deep=True)
    findings = judge(facts, matrix.load())
    fp = cache.fingerprint(facts)
    pf = Preflight(facts, findings, fingerprint=fp)
    if skip_probes:
        pf.notes.append("probes skipped (--skip-probes): the plan relies on facts alone")
        return pf
    names = probe_names(facts)
    key = f"{fp}|{device or 'auto'}|{','.join(names)}"
    cached = cache.load(CACHE_KIND, key)
    if isinstance(cached, list):
        pf.probes, pf.cached = cached, True
    else:
        try:
            from qdoctor.smoke import run_probes
        except ImportError:
            pf.notes.append("qdoctor.smoke is not available: probes not run, the plan relies on facts alone")
            return pf
        dev = device or ("cuda:0" if names is GPU_PROBES else "cpu")
        results = run_probes(list(names), dev, timeout, facts)
        pf.probes = [r.to_dict() for r in results]
        if not any(p.get("status") in ("timeout", "crash") for p in pf.probes):
            cache.store(CACHE_KIND, key, pf.probes)
    pf.findings = pf.findings + _probe_findings(pf.probes)
    return pf
