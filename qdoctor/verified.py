"""Verified results: stack combinations that were installed and run (scripts/verify_matrix.py).

The version tables in matrix/ say what *should* break; these files say what *did*, per platform
(`matrix/verified/<platform>.json`). `check` matches the installed stack against them, and
`qdoctor matrix` prints them. Pure functions of (facts, data); loading is a JSON read, no import of
the stack.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

SCHEMA = "qdoctor.verified/1"
GRID = ("torch", "bitsandbytes", "transformers", "peft", "accelerate")
# environment settings a result can depend on (the loader reads BNB_CUDA_VERSION)
ENV_KEYS = ("BNB_CUDA_VERSION",)


def _norm(name: str) -> str:
    return name.lower().replace("_", "-")


def platform_key(facts: dict) -> str:
    """'linux-x86_64-cpu' on a machine without a visible NVIDIA GPU, 'linux-x86_64-cuda-sm_90' with one
    (the first visible GPU: what the probes and a single-GPU run use)."""
    from qdoctor.rules.common import cc_tuple, sm, visible_gpus

    plat = facts.get("platform") or {}
    system = str(plat.get("system") or "unknown").lower()
    machine = str(plat.get("machine") or "unknown").lower()
    gpus = visible_gpus(facts)
    cc = cc_tuple(gpus[0].get("compute_capability")) if gpus else None
    accel = f"cuda-{sm(cc)}" if cc else ("cuda" if gpus else "cpu")
    return f"{system}-{machine}-{accel}"


def verified_dir() -> Path:
    from qdoctor.matrix import matrix_dir

    return matrix_dir() / "verified"


def platforms(directory: str | None = None) -> list[str]:
    d = Path(directory) if directory else verified_dir()
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


@functools.lru_cache(maxsize=8)
def load(platform: str, directory: str | None = None) -> dict | None:
    """The results file of one platform, or None when nothing was verified there."""
    d = Path(directory) if directory else verified_dir()
    path = d / f"{platform}.json"
    if not path.is_file():
        return None
    with path.open(encoding="utf-8") as fh:
        doc = json.load(fh)
    if not str(doc.get("schema", "")).startswith("qdoctor.verified/"):
        return None
    return doc


def _base(ver) -> str | None:
    from qdoctor.rules.common import base

    return base(ver) if ver else None


def installed_stack(facts: dict) -> dict[str, str | None]:
    pk = {_norm(k): v for k, v in (facts.get("packages") or {}).items()}
    return {name: _base(pk.get(name)) for name in GRID}


def env_of(facts: dict) -> dict[str, str]:
    env = facts.get("env") or {}
    return {k: env[k] for k in ENV_KEYS if env.get(k) not in (None, "")}


def match(facts: dict, doc: dict | None) -> dict | None:
    """The result whose versions (base versions; torch too) and loader settings equal this machine's."""
    if not doc:
        return None
    have = installed_stack(facts)
    if any(v is None for v in have.values()):
        return None
    env = env_of(facts)
    for r in doc.get("results") or []:
        vers = {k: _base(v) for k, v in (r.get("versions") or {}).items()}
        if all(vers.get(k) == have[k] for k in GRID) and (r.get("env") or {}) == env:
            return r
    return None


def failing(result: dict) -> dict | None:
    """The first probe that did not pass (fail, crash or timeout) in a result."""
    for p in (result.get("smoke") or {}).get("probes") or []:
        if p.get("status") in ("fail", "crash", "timeout"):
            return p
    return None


_EXC = re.compile(r"\b[A-Za-z_][\w.]*(?:Error|Exception)\b: ")


def message(probe: dict) -> str:
    """The one line that says why a probe failed: the exception it raised (the last `XxxError: …` line of
    its output, or its reason `raised …`), else the reason (a number out of band, a signal)."""
    reason = probe.get("reason") or ""
    lines = [ln.strip() for ln in (probe.get("error") or "").splitlines() if _EXC.search(ln)]
    if lines:
        return lines[-1]
    return reason.removeprefix("raised ").strip() or probe.get("status") or "failed"


def combo_label(result: dict) -> str:
    v = result.get("versions") or {}
    s = ", ".join(f"{k} {v.get(k)}" for k in GRID if v.get(k))
    env = result.get("env") or {}
    if env:
        s += " with " + " ".join(f"{k}={val}" for k, val in env.items())
    return s


def render_table(doc: dict, fmt: str = "text") -> str:
    """The verified table of one platform: one row per combination, status and the failing probe."""
    head = ["bitsandbytes", "peft", "transformers", "accelerate", "torch", "env", "status", "check said",
            "failing probe: error"]
    rows = []
    for r in sorted(doc.get("results") or [], key=_sort_key):
        v = r.get("versions") or {}
        fp = failing(r)
        why = ""
        if fp:
            why = f"{fp.get('probe')} {fp.get('status')}: {message(fp)}"
        elif r.get("status") not in ("working", "broken"):
            why = (r.get("error") or "")[:120]
        env = " ".join(f"{k}={val}" for k, val in (r.get("env") or {}).items()) or "-"
        rows.append([v.get("bitsandbytes") or "-", v.get("peft") or "-", v.get("transformers") or "-",
                     v.get("accelerate") or "-", v.get("torch") or "-", env, r.get("status") or "?",
                     (r.get("check") or {}).get("predicted") or "-", why])
    n_ok = sum(r.get("status") == "working" for r in doc.get("results") or [])
    n_bad = sum(r.get("status") == "broken" for r in doc.get("results") or [])
    title = (f"verified on {doc.get('platform')} ({(doc.get('machine') or {}).get('description', '?')}), "
             f"{doc.get('date', '?')}: {n_ok} working, {n_bad} broken, "
             f"{len(rows) - n_ok - n_bad} not installable or not run")
    if fmt == "markdown":
        lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head) - 1)]
    lines = [title, ""]
    for row in [head, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    return "\n".join(lines) + "\n"


def _sort_key(r: dict):
    from qdoctor.rules.common import version

    v = r.get("versions") or {}
    return tuple(version(v.get(k)) or version("0") for k in ("transformers", "peft", "bitsandbytes",
                                                             "accelerate")) + (json.dumps(r.get("env")),)
