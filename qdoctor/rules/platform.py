"""Platform rules (QD1xx): operating system, Python, and whether the facts themselves are complete."""

from __future__ import annotations

from qdoctor.findings import Finding
from qdoctor.rules import rule
from qdoctor.rules.common import bnb_feature, bnb_version, matches

AREA = "platform"
# The current QLoRA stack (transformers 5, peft >= 0.18, bitsandbytes >= 0.49, accelerate >= 1.11) needs this.
STACK_PYTHON = ">=3.10"


def _p(facts):
    return facts.get("platform") or {}


@rule("QD100", "platform-summary", AREA)
def platform_summary(facts, matrix):
    """One line describing the platform (OS, architecture, Python, libc), shown when nothing is wrong here."""
    p = _p(facts)
    if not p:
        return []
    parts = [x for x in (p.get("system"), p.get("machine")) if x]
    if p.get("python"):
        parts.append(f"Python {p['python']}")
    if p.get("libc"):
        parts.append(p["libc"])
    if p.get("wsl"):
        parts.append("WSL")
    if p.get("container"):
        parts.append(f"in {p['container']}")
    ev = [
        f"platform.{k} = {p.get(k)}"
        for k in ("system", "release", "machine", "python", "libc", "container")
        if p.get(k) is not None
    ]
    return [Finding("QD100", "ok", ", ".join(parts) or "platform facts present", ev, None, AREA)]


@rule("QD101", "python-too-old", AREA)
def python_too_old(facts, matrix):
    """Python older than 3.10: current transformers (5.x), peft (>= 0.18), bitsandbytes (>= 0.49) and
    accelerate (>= 1.11) require 3.10, so pip silently resolves old releases with known bugs. Warning."""
    py = _p(facts).get("python")
    if matches(py, STACK_PYTHON) is not False:
        return []
    return [
        Finding(
            "QD101",
            "warning",
            f"Python {py} is too old for the current QLoRA stack (needs 3.10+)",
            [
                f"platform.python = {py}",
                "transformers >= 5, peft >= 0.18, bitsandbytes >= 0.49, accelerate >= 1.11 need Python 3.10+",
            ],
            "create a Python 3.12 environment: python3.12 -m venv ~/qlora && . ~/qlora/bin/activate",
            AREA,
        )
    ]


@rule("QD102", "os-without-cuda-bitsandbytes", AREA)
def os_support(facts, matrix):
    """macOS has no CUDA: bitsandbytes 4-bit runs only on its CPU/MPS backends (0.46+ / 0.50+), slowly
    (info). Native Windows needs bitsandbytes >= 0.43.0, the first release with Windows binaries (error)."""
    p = _p(facts)
    system = (p.get("system") or "").lower()
    out = []
    if system == "darwin":
        out.append(
            Finding(
                "QD102",
                "info",
                "macOS: no CUDA; 4-bit QLoRA runs on bitsandbytes' CPU/MPS backends only",
                [f"platform.system = {p.get('system')}", f"platform.machine = {p.get('machine')}"],
                "pip install -U 'bitsandbytes>=0.50'  # MPS 4-bit ops; expect CPU-class speed",
                AREA,
            )
        )
    elif system == "windows":
        ver = bnb_version(facts)
        wmin = bnb_feature(matrix, "windows_min", "0.43.0")
        if ver and matches(ver, f"<{wmin}"):
            out.append(
                Finding(
                    "QD102",
                    "error",
                    f"bitsandbytes {ver} has no Windows binaries (first Windows release: {wmin})",
                    [f"platform.system = {p.get('system')}", f"bitsandbytes.version = {ver}"],
                    f"pip install -U 'bitsandbytes>={wmin}'",
                    AREA,
                )
            )
    return out


@rule("QD103", "collector-failed", AREA)
def collector_failed(facts, matrix):
    """A facts collector failed or timed out: its section is unknown, so the rules that need it stay
    silent. Info, with the collector's error, so a missing verdict is never mistaken for a clean one."""
    out = []
    for name, c in sorted((facts.get("collectors") or {}).items()):
        if isinstance(c, dict) and c.get("ok") is False:
            err = c.get("error") or "no error text"
            out.append(
                Finding(
                    "QD103",
                    "info",
                    f"the {name} collector failed: its facts are unknown",
                    [f"collectors.{name}.error = {err}"],
                    "run `qdoctor check -v` again; if it persists, report it with "
                    "`qdoctor check --format markdown`",
                    AREA,
                )
            )
    return out
