"""The stack's bytecode cache (QD613): a package whose .pyc files are missing and will never be written is
compiled from source by every process that imports it. Sources are in the rule's docstring (docs/rules.md).
"""

from __future__ import annotations

import re
import shlex

from qdoctor.findings import Finding
from qdoctor.rules import rule


def _arg(path: str) -> str:
    """A path as a shell word; a redacted home (`~/...`) stays unquoted so the shell still expands it."""
    return path if re.fullmatch(r"[\w@%+=:,./~-]+", path) else shlex.quote(path)


def uncached(st: dict) -> bool:
    """Fewer than half of the sampled modules have a .pyc where this interpreter looks."""
    n, c = st.get("sampled"), st.get("cached")
    return isinstance(n, int) and isinstance(c, int) and n > 0 and 2 * c < n


def _where(bc: dict, st: dict) -> str:
    prefix = bc.get("pycache_prefix")
    if prefix:
        return f"under PYTHONPYCACHEPREFIX={prefix}"
    return f"in {st.get('path') or 'the package'}/__pycache__"


def _fix(bc: dict, stuck: dict, python: str) -> str:
    dirs = " ".join(_arg(st["path"]) for st in stuck.values() if st.get("path")) or "<package dir>"
    prefix = bc.get("pycache_prefix")
    read_only = any(st.get("writable") is False for st in stuck.values())
    if read_only:
        return (f"export PYTHONPYCACHEPREFIX=$HOME/.cache/pycache && {python} -m compileall -q -j 0 {dirs}  "
                "# the package directory is read-only: keep PYTHONPYCACHEPREFIX set wherever training runs")
    lines = [f"{python} -m compileall -q -j 0 {dirs}  # writes the .pyc files even with "
             "PYTHONDONTWRITEBYTECODE set; in a Dockerfile, RUN it after pip install"
             + (f"; run it with PYTHONPYCACHEPREFIX={prefix}, as training will" if prefix else "")]
    if bc.get("dont_write_bytecode"):
        lines.append("or: unset PYTHONDONTWRITEBYTECODE  # the next import writes them")
    if prefix and all(st.get("cached_in_pycache") == st.get("sampled") for st in stuck.values()):
        lines.append("or: unset PYTHONPYCACHEPREFIX  # the .pyc files beside the sources are complete")
    return "\n".join(lines)


@rule("QD613", "bytecode-never-cached", "environment")
def bytecode_never_cached(facts, matrix):
    """A stack package (torch, transformers, peft, bitsandbytes, accelerate), or one their import loads
    (sympy, networkx, numpy, mpmath, triton, jinja2: matrix/packages.toml), has no compiled bytecode (.pyc)
    for this interpreter, and none will be written: PYTHONDONTWRITEBYTECODE is set (Docker images often
    set it; a wheel installed with it set, or with `pip install --no-compile`, has no .pyc at all), or the
    directory the .pyc would go to is not writable. Every process that imports the package then compiles it
    from source again: on an H200 machine with torch's 2141 modules uncached and the variable set,
    `import transformers, peft, bitsandbytes` took 17.3 s in each fresh process. The facts sample each
    package's top-level modules; fewer than half of them cached counts as uncached. Pointing
    PYTHONPYCACHEPREFIX at an empty directory made it slower there (24.4 s): Python then ignores the
    `__pycache__` beside the sources and, with the variable set, writes nothing into the prefix either.
    On another H200 machine of that image, sympy, networkx, numpy, mpmath, triton and jinja2 were uncached
    too; byte-compiling the whole site-packages took `import torch, transformers, peft, bitsandbytes` from
    14.8 s to 9.8 s, and the embedded `qdoctor train` ran in 10.6-11.1 s (with torch alone compiled,
    17.6-18.2 s in an earlier call; bench/NOTES.md).
    Warning (performance, not correctness): `python -m compileall` writes the .pyc files whatever the
    variable says (run it with the prefix training will use, if any); or unset the variable. Sources:
    https://docs.python.org/3/using/cmdline.html#envvar-PYTHONDONTWRITEBYTECODE,
    https://docs.python.org/3/library/sys.html#sys.pycache_prefix,
    https://docs.python.org/3/library/compileall.html."""
    bc = facts.get("bytecode") or {}
    pkgs = bc.get("packages") or {}
    dont = bc.get("dont_write_bytecode") is True
    stuck = {n: st for n, st in pkgs.items() if isinstance(st, dict) and uncached(st)
             and (dont or st.get("writable") is False)}
    if not stuck:
        return []
    tag = bc.get("cache_tag") or "this interpreter"
    ev = []
    for n, st in stuck.items():
        ev.append(f"{n}: {st['cached']} of {st['sampled']} modules sampled have a {tag} .pyc "
                  f"{_where(bc, st)}")
        if bc.get("pycache_prefix") and st.get("cached_in_pycache"):
            ev.append(f"{n}: {st['cached_in_pycache']} are cached in its __pycache__, which the prefix makes "
                      "Python ignore")
        if st.get("writable") is False:
            ev.append(f"{n}: the .pyc files cannot be written {_where(bc, st)} (not writable)")
    if dont:
        raw = bc.get("PYTHONDONTWRITEBYTECODE")
        var = f"PYTHONDONTWRITEBYTECODE={raw}" if raw is not None else "PYTHONDONTWRITEBYTECODE is set"
        ev.append(f"{var}: Python writes no .pyc on import")
    it = "it" if len(stuck) == 1 else "them"
    ev.append(f"every process that imports {it} compiles {it} from source again")
    names = ", ".join(stuck)
    python = _arg((facts.get("platform") or {}).get("python_executable") or "python")
    return [Finding("QD613", "warning",
                    f"{names}: bytecode not cached and never written, so every start compiles "
                    f"{it} from source", ev, _fix(bc, stuck, python),
                    "environment")]
