"""bitsandbytes on the CPU (QD413): what its CPU backend lacks in the installed release, from
matrix/bnb_cpu.toml, whose floors were measured by running the probes (scripts/verify_matrix.py)."""

from __future__ import annotations

from qdoctor.findings import Finding, rank
from qdoctor.rules import rule
from qdoctor.rules.common import bnb_version, matches, torch_cuda, visible_gpus

AREA = "bitsandbytes"


def on_cpu(facts: dict) -> bool:
    """bitsandbytes computes on the CPU: torch is a CPU build, or no NVIDIA GPU is visible."""
    torch = facts.get("torch") or {}
    cpu_torch = torch.get("installed") is not False and torch_cuda(facts) is None and bool(
        torch.get("version") or (facts.get("packages") or {}).get("torch"))
    return cpu_torch or not visible_gpus(facts)


@rule("QD413", "bitsandbytes-cpu-backend-gap", AREA)
def bnb_cpu_gaps(facts, matrix):
    """bitsandbytes will run on the CPU here (no usable NVIDIA GPU), and its CPU backend in this release
    lacks a feature the probes or the run use: 4-bit NF4 before 0.46 (error: QLoRA cannot run), FP4 or the
    8-bit optimizers in later releases (warning: NF4 QLoRA runs, smoke's nf4 / optim8bit probes fail and
    train uses a 32-bit AdamW). The floors in matrix/bnb_cpu.toml were measured by running each release."""
    ver = bnb_version(facts)
    if not ver or not on_cpu(facts):
        return []
    table = (matrix.get("bnb_cpu") or {}).get("feature", [])
    gaps = [f for f in table if matches(ver, f["versions"]) is False]
    if not gaps:
        return []
    sev = max((g.get("severity", "warning") for g in gaps), key=rank)
    names = ", ".join(g["key"] for g in gaps)
    probes = ", ".join(dict.fromkeys(p for g in gaps for p in g.get("probes", [])))
    title = f"bitsandbytes {ver} on the CPU has no {names}: smoke's {probes} probe(s) fail"
    if sev != "error":
        title += " (NF4 QLoRA runs; train uses a 32-bit AdamW)"
    ev = []
    for g in gaps:
        ev += [f"{g['key']}: {g['what']} needs bitsandbytes {g['versions']} on the CPU",
               f"  error: {g['error']}", f"  measured: {g['measured']}", f"  source: {g['source']}"]
    floor = max((g["versions"].lstrip(">=") for g in gaps), key=lambda v: tuple(int(x) for x in v.split(".")))
    return [Finding("QD413", sev, title, ev, f"pip install -U 'bitsandbytes>={floor}'", AREA)]
