"""Judge a probe's measurements against matrix/smoke_bands.toml: pure, so recorded numbers re-judge."""

from __future__ import annotations


def criteria_for(probe: str, bands: dict) -> list[dict]:
    return [c for c in bands.get("criteria", []) if c.get("probe") == probe]


def _applies(c: dict, m: dict) -> bool:
    return all(m.get(k) == v for k, v in (c.get("when") or {}).items())


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else repr(v)


def judge(probe: str, measurements: dict, bands: dict) -> list[str]:
    """The failed criteria, each as one line; [] means the numbers pass. Unmeasured keys are not judged."""
    return [line for _, line in failures(probe, measurements, bands)]


def failures(probe: str, measurements: dict, bands: dict) -> list[tuple[str, str]]:
    """(measurement key, one line) per failed criterion: the key for programs (train's plan), the line for
    people."""
    failed = []
    for c in criteria_for(probe, bands):
        key = c["key"]
        if key not in measurements or not _applies(c, measurements):
            continue
        v = measurements[key]
        why = c.get("why", key)
        if "expect" in c:
            if v != c["expect"]:
                failed.append((key, f"{key} = {_fmt(v)}, expected {_fmt(c['expect'])} ({why})"))
            continue
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v:
            failed.append((key, f"{key} = {_fmt(v)} is not a number ({why})"))
            continue
        lo, hi = c.get("min"), c.get("max")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            if lo is not None and hi is not None:
                band = f"in [{_fmt(lo)}, {_fmt(hi)}]"
            else:
                band = f">= {_fmt(lo)}" if lo is not None else f"<= {_fmt(hi)}"
            side = "too low" if lo is not None and v < lo else "too high"
            failed.append((key, f"{key} = {_fmt(v)} {side}, expected {band} ({why})"))
    return failed
