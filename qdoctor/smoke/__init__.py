"""qdoctor smoke: prove the QLoRA path works here with small real probes, each in its own process.

API for other commands (the train planner):
    from qdoctor.smoke import run_probes, PROBES, ProbeResult
    results = run_probes(["nf4", "optim8bit"], device="cuda:0", timeout=120, facts=facts)
Importing this package never imports torch.
"""

from qdoctor.smoke.registry import ORDER, PROBES, Probe
from qdoctor.smoke.result import ProbeResult, findings_for
from qdoctor.smoke.runner import ProbeUsageError, run_probes

__all__ = ["ORDER", "PROBES", "Probe", "ProbeResult", "ProbeUsageError", "findings_for", "run_probes"]
