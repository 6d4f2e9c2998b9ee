"""What was measured, not declared: the installed stack against matrix/verified/<platform>.json, the
combinations scripts/verify_matrix.py built and ran here (check + smoke in an isolated environment)."""

from __future__ import annotations

from qdoctor import verified
from qdoctor.findings import Finding
from qdoctor.rules import rule

AREA = "packages"


def _fix_for(probe: dict, matrix: dict) -> str | None:
    code = probe.get("known_failure")
    for f in (matrix.get("failures") or {}).get("failure", []):
        if code and f.get("code") == code:
            return f.get("fix")
    return None


@rule("QD510", "verified-broken", AREA, also=("QD511",))
def verified_combination(facts, matrix):
    """The installed torch, bitsandbytes, transformers, peft and accelerate (and BNB_CUDA_VERSION) were
    built and run on this platform by scripts/verify_matrix.py. QD510 (error): that combination was
    verified broken; the title names the probe that failed and its message, the fix comes from the known
    failure it matched. QD511 (info): verified working, every probe passed. A measurement outranks the
    version tables; `qdoctor matrix` prints every verified combination."""
    platform = verified.platform_key(facts)
    doc = verified.load(platform)
    r = verified.match(facts, doc)
    if r is None:
        return []
    where = f"{platform}, {(doc.get('machine') or {}).get('description', '?')}, {r.get('date', '?')[:10]}"
    label = verified.combo_label(r)
    if r.get("status") == "working":
        n = len((r.get("smoke") or {}).get("probes") or [])
        return [Finding("QD511", "info", f"verified working on {platform}: {n} probes passed with this stack",
                        [f"{label}: working ({where})", "table: `qdoctor matrix`"], None, AREA)]
    if r.get("status") != "broken":
        return []
    p = verified.failing(r) or {}
    title = (f"verified broken on {platform}: probe {p.get('probe', '?')} {p.get('status', 'failed')}: "
             f"{verified.message(p)}")
    ev = [f"{label}: broken ({where})"]
    if p.get("reason"):
        ev.append(f"probe {p.get('probe')}: {p['reason']}")
    ev += [f"  {ln}" for ln in (p.get("error") or "").strip().splitlines()[:-1]]
    ok = [x for x in (doc.get("results") or []) if x.get("status") == "working"]
    fix = _fix_for(p, matrix) or "install a combination verified working here (`qdoctor matrix`)"
    if ok and not _fix_for(p, matrix):
        best = max(ok, key=lambda x: verified._sort_key(x))
        fix += f", e.g. {verified.combo_label(best)}"
    return [Finding("QD510", "error", title, ev, fix, AREA)]
