"""Judge: pure functions (facts, matrix) -> findings, one module per area.

Each rule is registered with a stable code, a slug and an area; its docstring is its entry in
the generated rule reference (docs/rules.md). A rule that raises is itself reported (QD001), so one
broken rule never hides the others. Consequences are then linked to their causes (qdoctor.causes).
"""

from __future__ import annotations

import importlib
import inspect
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from qdoctor.findings import Finding


@dataclass(frozen=True)
class Rule:
    code: str  # the first code this rule emits; a rule may emit a small family (documented)
    slug: str
    area: str
    func: Callable
    codes: tuple[str, ...]

    @property
    def doc(self) -> str:
        return inspect.cleandoc(self.func.__doc__ or "")


REGISTRY: list[Rule] = []

# Area modules, imported on first use so `import qdoctor.rules` stays cheap.
_MODULES = ["platform", "nvidia", "torch", "bitsandbytes", "packages", "environment",
            "cuda_init", "native", "jetson", "extensions", "container", "model", "verified", "bnb_cpu"]


def rule(code: str, slug: str, area: str, also: Iterable[str] = ()):
    def deco(func):
        REGISTRY.append(Rule(code, slug, area, func, (code, *also)))
        return func

    return deco


def load_rules() -> list[Rule]:
    for m in _MODULES:
        try:
            importlib.import_module(f"qdoctor.rules.{m}")
        except ModuleNotFoundError as e:
            if e.name != f"qdoctor.rules.{m}":
                raise
    seen = {}
    for r in REGISTRY:
        for c in r.codes:
            if c in seen and seen[c] is not r:
                raise RuntimeError(f"finding code {c} registered twice ({seen[c].slug}, {r.slug})")
            seen[c] = r
    return list(REGISTRY)


def judge(facts: dict, matrix: dict) -> list[Finding]:
    findings: list[Finding] = []
    for r in load_rules():
        try:
            out = r.func(facts, matrix) or []
            findings.extend(out)
        except Exception as e:  # a rule bug must not hide the other rules
            tb = traceback.format_exception_only(type(e), e)[-1].strip()
            title = f"rule {r.code} ({r.slug}) failed on these facts"
            findings.append(Finding("QD001", "warning", title, [tb],
                                    "please report this with `qdoctor check --format markdown`", r.area))
    from qdoctor.causes import link

    return link(findings, matrix)
