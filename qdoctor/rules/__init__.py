"""Judge: pure functions (facts, matrix) -> findings, one module per area.

Each rule is registered with a stable code, a slug and an area; its docstring is its entry in
the generated rule reference (docs/rules.md). A rule that raises is itself reported (QD001), so one
broken rule never hides the others. An area's `summary` rule (its one `ok` line) runs after the
others, once, and only for an area where none of them reported a warning or an error. Findings that
say the same thing twice (one code, one title: two matrix rows matching one combination) are merged.
Consequences are then linked to their causes (qdoctor.causes).
"""

from __future__ import annotations

import importlib
import inspect
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from qdoctor.findings import Finding


@dataclass(frozen=True)
class Rule:
    code: str  # the first code this rule emits; a rule may emit a small family (documented)
    slug: str
    area: str
    func: Callable
    codes: tuple[str, ...]
    summary: bool = False  # the area's `ok` line: judged last, shown only when the area has no problem

    @property
    def doc(self) -> str:
        return inspect.cleandoc(self.func.__doc__ or "")


REGISTRY: list[Rule] = []

# Area modules, imported on first use so `import qdoctor.rules` stays cheap.
_MODULES = ["platform", "nvidia", "torch", "bitsandbytes", "packages", "environment",
            "cuda_init", "native", "jetson", "extensions", "container", "model", "verified", "bnb_cpu",
            "multigpu", "bytecode"]


def rule(code: str, slug: str, area: str, also: Iterable[str] = (), summary: bool = False):
    def deco(func):
        REGISTRY.append(Rule(code, slug, area, func, (code, *also), summary))
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


def _run(r: Rule, facts: dict, matrix: dict) -> list[Finding]:
    try:
        return list(r.func(facts, matrix) or [])
    except Exception as e:  # a rule bug must not hide the other rules
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        title = f"rule {r.code} ({r.slug}) failed on these facts"
        return [Finding("QD001", "warning", title, [tb],
                        "please report this with `qdoctor check --format markdown`", r.area)]


def judge(facts: dict, matrix: dict) -> list[Finding]:
    """Every rule once; then each area's summary where that area is clean. Registry order kept."""
    rules = load_rules()
    results = {id(r): _run(r, facts, matrix) for r in rules if not r.summary}
    troubled = {f.area for fs in results.values() for f in fs if f.severity in ("warning", "error")}
    for r in rules:
        if r.summary:
            results[id(r)] = [] if r.area in troubled else _run(r, facts, matrix)
    from qdoctor.causes import link

    return link(merge_duplicates([f for r in rules for f in results[id(r)]]), matrix)


def merge_duplicates(findings: list[Finding]) -> list[Finding]:
    """One finding per (code, title): evidence and fixes of the copies are joined, the worst severity
    kept. Two matrix entries can describe one broken combination (peft 0.17.1 + transformers 5 fails
    on HybridCache and on the version check); the user should read it once."""
    from qdoctor.findings import rank

    out: dict[tuple[str, str], Finding] = {}
    for f in findings:
        key = (f.code, f.title)
        if key not in out:
            out[key] = f
            continue
        g = out[key]
        fixes = [x for x in dict.fromkeys((g.fix, f.fix)) if x]
        out[key] = replace(g, severity=max(g.severity, f.severity, key=rank), fix="\n".join(fixes) or None,
                           evidence=list(dict.fromkeys(g.evidence + f.evidence)))
    return list(out.values())
