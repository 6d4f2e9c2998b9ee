"""Root causes: link a finding that is a consequence of another one to it (`caused_by`).

One broken thing often trips several rules (a CUDA initialisation error makes torch see no GPU, which makes
bitsandbytes load its CPU library). Each rule is right about its symptom, but their own fixes would send
the user the wrong way ("reinstall bitsandbytes"). matrix/causes.toml lists, per consequence, the findings
that explain it; when one of them is present the consequence names it, loses its own fix, and the views
fold it under its cause. Known failures (KFxx, from error text) link the same way through their
`follows` lists in matrix/failures.toml.
"""

from __future__ import annotations

from dataclasses import replace

from qdoctor.findings import Finding, rank


def _matches(code: str, pattern: str) -> bool:
    """'QD7*1' style: '*' stands for one character; otherwise an exact code or a prefix ending in '*'."""
    if pattern.endswith("*") and "*" not in pattern[:-1]:
        return code.startswith(pattern[:-1])
    return len(code) == len(pattern) and all(p in ("*", c) for c, p in zip(code, pattern, strict=True))


def links(matrix: dict) -> list[dict]:
    out = list((matrix.get("causes") or {}).get("link", []))
    for f in (matrix.get("failures") or {}).get("failure", []):
        if f.get("follows"):
            out.append({"consequence": f["code"], "causes": list(f["follows"]),
                        "why": f"{f['code']} follows from it when both appear"})
    return out


def _cause_for(f: Finding, present: dict[str, Finding], table: list[dict]) -> tuple[str, str] | None:
    for link in table:
        if not _matches(f.code, link["consequence"]):
            continue
        for c in link.get("causes", []):
            cause = next((x for code, x in present.items() if code != f.code and _matches(code, c)), None)
            # a warning cannot explain an error
            if cause is not None and rank(cause.severity) >= rank(f.severity):
                return cause.code, link.get("why", "")
    return None


def link(findings: list[Finding], matrix: dict) -> list[Finding]:
    """The same findings, consequences given `caused_by`, their fix dropped and the reason added.

    A finding that already names a cause keeps it. Links that would close a cycle are not made, so
    every chain ends in a root cause.
    """
    present: dict[str, Finding] = {}
    for f in findings:
        if f.severity in ("warning", "error"):
            present.setdefault(f.code, f)
    table = links(matrix)
    parent: dict[str, str] = {f.code: f.caused_by for f in findings if f.caused_by}

    def reaches(start: str, target: str) -> bool:
        seen, cur = set(), start
        while cur in parent and cur not in seen:
            seen.add(cur)
            cur = parent[cur]
            if cur == target:
                return True
        return False

    out = []
    for f in findings:
        if f.caused_by or f.severity not in ("warning", "error"):
            out.append(f)
            continue
        hit = _cause_for(f, present, table)
        if hit is None or hit[0] == f.code or reaches(hit[0], f.code):
            out.append(f)
            continue
        code, why = hit
        parent[f.code] = code
        ev = list(f.evidence) + [f"follows from {code}" + (f": {why}" if why else "")]
        out.append(replace(f, caused_by=code, fix=None, evidence=ev))
    return out
