"""Package rules (QD5xx): conflicting distributions, unmet requirements, and the known-bad combinations
of packages.toml, each with the error text users actually see."""

from __future__ import annotations

import re

from packaging.requirements import InvalidRequirement, Requirement

from qdoctor import extra, matrix
from qdoctor.findings import Finding
from qdoctor.rules import rule
from qdoctor.rules.common import matches, python_version, torch_cuda

AREA = "packages"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pkgs(facts) -> dict:
    return {_norm(k): v for k, v in (facts.get("packages") or {}).items() if isinstance(v, str)}


def _stack(mx) -> list[str]:
    return list(matrix.stack(mx))


def _neighbours(mx) -> list[str]:
    return list(matrix.stack_neighbours(mx))


@rule("QD500", "packages-summary", AREA, summary=True)
def packages_summary(facts, matrix):
    """One line with the versions of the QLoRA stack, shown when no conflict or known-bad combination
    was found."""
    pk = _pkgs(facts)
    if not pk:
        return []
    shown = [f"{n} {pk[n]}" for n in _stack(matrix) if n in pk]
    return [
        Finding(
            "QD500",
            "ok",
            ", ".join(shown) + ": no conflicts in the stack" if shown else "no conflicts in the stack",
            [f"{len(pk)} distributions inspected", "packages.toml known-bad combinations: none match"],
            None,
            AREA,
        )
    ]


@rule("QD501", "duplicate-distributions", AREA)
def conflicts(facts, matrix):
    """Two installed distributions provide the same module (e.g. bitsandbytes and bitsandbytes-cuda117):
    their files overwrite each other and which one imports is an accident. Error when the module belongs
    to the QLoRA stack (uninstall both, reinstall the one named after the module); info otherwise, since
    a clash between unrelated packages cannot break training."""
    core = {_norm(n) for n in _stack(matrix)} | {_norm(n) for n in _neighbours(matrix)}
    out = []
    for c in facts.get("conflicts") or []:
        if not isinstance(c, dict):
            continue
        mod, dists = c.get("module"), [d for d in (c.get("distributions") or []) if isinstance(d, str)]
        if not mod or len(dists) < 2:
            continue
        keep = next((d for d in dists if _norm(d) == _norm(mod)), dists[0])
        pk = _pkgs(facts)
        versions = c.get("versions") or []
        vers = [versions[i] if i < len(versions) and versions[i] else pk.get(_norm(d), "?")
                for i, d in enumerate(dists)]
        in_stack = _norm(mod) in core or any(_norm(d) in core for d in dists)
        fix = (f"pip uninstall -y {' '.join(dists)} && pip install -U {keep}" if in_stack
               else f"pip install --force-reinstall --no-deps {keep}=={vers[dists.index(keep)]}")
        out.append(
            Finding(
                "QD501",
                "error" if in_stack else "info",
                f"module '{mod}' is provided by {len(dists)} distributions: {', '.join(dists)}"
                + ("" if in_stack else " (not part of the QLoRA stack)"),
                [f"conflicts: {mod} <- " + ", ".join(f"{d} {v}" for d, v in zip(dists, vers, strict=False))],
                fix,
                AREA,
            )
        )
    return out


@rule("QD502", "unmet-requirement", AREA)
def unmet(facts, matrix):
    """An installed distribution of the stack declares a requirement the environment does not meet
    (pip check style). Error between two core packages of the stack, and when a trainer framework that
    refuses to run outside its ranges (LLaMA-Factory, unsloth: matrix `gates`) requires a core package or
    its own companion; warning otherwise."""
    core = set(_stack(matrix))
    gates = set(((matrix.get("packages") or {}).get("stack") or {}).get("gates", []))
    out = []
    for r in facts.get("requirements") or []:
        if not isinstance(r, dict) or not r.get("requirement"):
            continue
        try:
            req = Requirement(r["requirement"])
            target = _norm(req.name)
        except InvalidRequirement:
            target = None
        pkg = _norm(r.get("package") or "")
        gated = pkg in gates and (target in core or target in gates)
        sev = "error" if (pkg in core and target in core) or gated else "warning"
        have = r.get("installed") or "not installed"
        out.append(
            Finding(
                "QD502",
                sev,
                f"{r.get('package')} {r.get('version') or ''} requires "
                f"{r['requirement']}, installed: {have}".replace("  ", " "),
                [
                    f"requirements: {r.get('package')} {r.get('version')} -> {r['requirement']} "
                    f"(installed {have})"
                ],
                f"pip install '{r['requirement']}'",
                AREA,
            )
        )
    return out


def _when_matches(when: dict, pk: dict, facts) -> tuple[bool, list[str]]:
    ev = []
    for name, spec in when.items():
        have = python_version(facts) if name == "python" else pk.get(_norm(name))
        if have is None or matches(have, spec) is not True:
            return False, []
        ev.append(f"{name} {have} (matches {spec})")
    return True, ev


@rule("QD503", "known-bad-combination", AREA)
def known_bad(facts, matrix):
    """An installed combination that is known to break, from matrix/packages.toml (e.g. peft >= 0.14 with
    transformers < 4.43, peft <= 0.17.1 with transformers 5, transformers 5 with bitsandbytes < 0.46.1,
    bitsandbytes < 0.45.1 with triton >= 3.2, transformers' Trainer with too old accelerate). The evidence
    quotes the error users see; the severity and fix come from the table."""
    pk = _pkgs(facts)
    if not pk:
        return []
    out = []
    for kb in (matrix.get("packages") or {}).get("known_bad", []):
        ok, ev = _when_matches(kb.get("when") or {}, pk, facts)
        if not ok:
            continue
        if kb.get("no_cuda") and not (
            torch_cuda(facts) is None and (facts.get("torch") or {}).get("installed")
        ):
            continue
        names = " + ".join(e.split(" (matches")[0] for e in ev)
        out.append(
            Finding(
                "QD503",
                kb.get("severity", "error"),
                f"known-bad combination: {names}",
                ev + [f"error users see: {kb.get('error')}", f"source: {kb.get('source')}"],
                kb.get("fix"),
                AREA,
            )
        )
    return out


@rule("QD504", "stack-package-missing", AREA)
def stack_missing(facts, matrix):
    """A package of the QLoRA stack (torch, bitsandbytes, transformers, peft, accelerate) is not
    installed: `check` works without them, `smoke` and `train` do not. qdoctor's own install leaves them
    out on purpose (it must not change the environment it diagnoses); the `train` extra brings them.
    Warning, with the extra's pip command (torch and bitsandbytes also have their errors, QD301/QD401)."""
    pk = _pkgs(facts)
    if not pk:
        return []
    missing = [n for n in _stack(matrix) if n not in pk]
    if not missing:
        return []
    first = ("install the torch wheel QD301 names first (pip would pick a default CUDA build), then:\n"
             if "torch" in missing and (facts.get("nvidia") or {}).get("gpus") else "")
    return [
        Finding(
            "QD504",
            "warning",
            f"`qdoctor smoke` and `qdoctor train` need {', '.join(missing)} (not installed)",
            [f"packages has no {n}" for n in missing]
            + ["qdoctor's own install brings only what `check` needs; the stack is its `train` extra"],
            first + extra.FIX,
            AREA,
        )
    ]



@rule("QD505", "python-below-package-floor", AREA)
def python_floor(facts, matrix):
    """An installed package declares a higher Python floor than this interpreter (installed with
    --ignore-requires-python or copied in): it may fail at import with syntax or typing errors. Error."""
    py = python_version(facts)
    pk = _pkgs(facts)
    if not py or not pk:
        return []
    out = []
    for pf in (matrix.get("packages") or {}).get("python_floor", []):
        have = pk.get(_norm(pf.get("package", "")))
        if have and matches(have, pf.get("versions")) and matches(py, pf.get("python")) is False:
            out.append(
                Finding(
                    "QD505",
                    "error",
                    f"{pf['package']} {have} needs Python {pf['python']}, this is {py}",
                    [
                        f"platform.python = {py}",
                        f"{pf['package']} {have} python_requires {pf['python']}",
                        f"source: {pf.get('source')}",
                    ],
                    "use Python 3.12 in a fresh environment (python3.12 -m venv ~/qlora), or "
                    f"pip install '{pf['package']}<{pf['versions'].lstrip('>=').split(',')[0]}'",
                    AREA,
                )
            )
    return out
