"""Before a run: the `check` findings and the probes the run depends on, cached by environment fingerprint.

A relaunch on an unchanged machine reuses the cached probe results (qdoctor.cache, kind "train-preflight",
keyed by cache.probe_key: environment, qdoctor version, matrix/ hash, device; at most cache.MAX_AGE_S old).
Error findings stop the run unless --force.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qdoctor.findings import Finding

CACHE_KIND = "train-preflight"
DEEP_TIMEOUT_S = 60.0  # the deep facts child (qdoctor.facts.runtime): importing torch and bitsandbytes
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

    def to_dict(self) -> dict:
        """Plain JSON: how the launcher (or rank 0) hands its pre-flight to the other processes of a run."""
        return {"facts": self.facts, "findings": [f.to_dict() for f in self.findings], "probes": self.probes,
                "fingerprint": self.fingerprint, "cached": self.cached, "notes": self.notes}

    @classmethod
    def from_dict(cls, d: dict) -> Preflight:
        return cls(d["facts"], [Finding(**f) for f in d.get("findings") or []], list(d.get("probes") or []),
                   d.get("fingerprint"), bool(d.get("cached")), list(d.get("notes") or []))


def probe_names(device: str) -> tuple[str, ...]:
    """The probes for the device the run will use (qdoctor.devices resolved it)."""
    return GPU_PROBES if device.startswith("cuda") else CPU_PROBES


# Probe failures the plan routes around (plan.py): they warn, and the plan's reasons say what it chose
# instead. A GPU that cannot compute, or a stack that does not import, still stops the run.
ROUTED = {
    "nf4": "8-bit weights (or none)",
    "matmul4bit": "8-bit weights (or none)",
    "optim8bit": "plain AdamW 8-bit, or a 32-bit AdamW on the CPU",
    "precision": "fp32 compute",
}


def _routed(p: dict) -> str | None:
    if p.get("probe") in ROUTED:
        return ROUTED[p["probe"]]
    m = p.get("measurements") or {}
    if p.get("probe") == "imports" and p.get("status") == "fail" and all(
        m.get(f"{d}_ok") is not False for d in ("torch", "transformers", "peft")
    ):
        return "LoRA on an unquantized base (bitsandbytes unusable)"
    return None


def _probe_findings(probes: list[dict]) -> list[Finding]:
    """Failed, crashed or timed-out probes, with smoke's own codes and fixes: an error where no plan
    can avoid the failure, a warning where the plan falls back."""
    from qdoctor.smoke.result import ProbeResult, to_finding

    out = []
    for p in probes:
        if p.get("status") in ("fail", "crash", "timeout"):
            f = to_finding(ProbeResult.from_dict(p))
            if f is None:
                continue
            fallback = _routed(p)
            if fallback:
                out.append(Finding(f.code, "warning", f"{f.title}; the plan falls back to {fallback}",
                                   f.evidence, f.fix, f.area))
            else:
                out.append(Finding(f.code, "error", f.title, f.evidence, f.fix, f.area))
    return out


def _quiet(_msg: str) -> None:
    pass


def _probe_progress(progress):
    def note(kind, name, result):  # smoke's runner calls this as each probe ends
        if kind == "done":
            progress(f"  {name}: {result.status} {result.duration_s:.1f} s")

    return note


def run(
    device: str | None, *, skip_probes: bool = False, timeout: float = 120.0, progress=_quiet, world: int = 1
) -> Preflight:
    """`progress(line)` is told what runs while the user waits (the first run's probes take ~25 s on CPU).
    `world` > 1: the run will use several processes, so the ddp probe (two processes, an all-reduce and a DDP
    step) runs too: a collective that hangs is found here, in seconds, and not an hour into a run."""
    import time

    from qdoctor import cache, devices, matrix
    from qdoctor.facts import collect
    from qdoctor.rules import judge

    t0 = time.perf_counter()
    progress("checking the machine (as `qdoctor check --deep`)")
    # --skip-probes on a machine without a GPU: `train` has imported torch already, so what the deep child
    # would report about torch is read in this process instead of importing it again (seconds, uncached)
    facts = collect(deep=True, timeout=DEEP_TIMEOUT_S, in_process=skip_probes)
    # the user's --device checked as `smoke --device` is, or the default: the first *visible* GPU
    # torch can use, else the CPU (never a GPU that CUDA_VISIBLE_DEVICES hides)
    try:
        device = devices.parse_device(device, facts)
    except devices.DeviceError as e:
        from qdoctor.smoke.runner import ProbeUsageError

        raise ProbeUsageError(str(e)) from None
    findings = judge(facts, matrix.load())
    fp = cache.fingerprint(facts)
    pf = Preflight(facts, findings, fingerprint=fp)
    if skip_probes:
        pf.notes.append("probes skipped (--skip-probes): the plan relies on facts alone")
        return pf
    names = probe_names(device) + (("ddp",) if world > 1 else ())
    key = cache.probe_key(fp, device, names)
    cached = cache.load(CACHE_KIND, key, max_age_s=cache.MAX_AGE_S)
    if isinstance(cached, list):
        pf.probes, pf.cached = cached, True
    else:
        progress(f"running probes {', '.join(names)} in child processes (once per environment; cached "
                 "afterwards)")
        try:
            from qdoctor.smoke import run_probes
        except ImportError:
            pf.notes.append("qdoctor.smoke is not available: probes not run, the plan relies on facts alone")
            return pf
        results = run_probes(list(names), device, timeout, facts, progress=_probe_progress(progress))
        pf.probes = [r.to_dict() for r in results]
        if not any(p.get("status") in ("timeout", "crash") for p in pf.probes):
            cache.store(CACHE_KIND, key, pf.probes)
    pf.findings = pf.findings + _probe_findings(pf.probes)
    if not pf.cached:
        progress(f"done in {time.perf_counter() - t0:.1f} s")
    return pf
