"""Is the stack's bytecode cached for this interpreter, and would a Python started here write it?

A package without .pyc files for this interpreter's cache tag, in an environment that writes none
(PYTHONDONTWRITEBYTECODE set, or a directory it cannot write), is compiled from source by every process
that imports it: seconds for torch, on every start. Docker images often set the variable, and a wheel
installed with it set (or with `pip install --no-compile`) has no .pyc at all.

Read from directory listings only, and only one level deep: each package's top-level modules (torch has
~40; a full walk would read ~2,000 files), never imported. Judged for a Python started with this
environment, not for this process: the variables are inherited, `-B` and `-X pycache_prefix` are not.
"""

from __future__ import annotations

import os
import sys

from qdoctor.redact import redact_env_value


def env_flag(value: str | None) -> int:
    """CPython's reading of a flag variable (PYTHONDONTWRITEBYTECODE, PYTHONOPTIMIZE): unset or empty is 0,
    an integer >= 0 is itself, any other text is 1 (so PYTHONDONTWRITEBYTECODE=0 writes bytecode)."""
    if not value:
        return 0
    try:
        n = int(value)
    except ValueError:
        return 1
    return n if n >= 0 else 1


def pyc_name(stem: str, tag: str, optimize: int = 0) -> str:
    """`stem.cpython-312.pyc`, or `stem.cpython-312.opt-1.pyc` under -O (importlib.util.cache_from_source)."""
    return f"{stem}.{tag}.opt-{optimize}.pyc" if optimize else f"{stem}.{tag}.pyc"


def cache_dir(pkg_dir: str, prefix: str | None) -> str:
    """Where the package's top-level .pyc files are read and written: `__pycache__` beside the sources, or
    the same directory mirrored under the prefix (which then replaces `__pycache__` entirely)."""
    if prefix:
        return os.path.join(os.path.abspath(prefix), os.path.abspath(pkg_dir).lstrip(os.sep))
    return os.path.join(pkg_dir, "__pycache__")


def writable(path: str) -> bool:
    """Can .pyc files be written at `path`: it, or the nearest directory above it that exists (the import
    system creates the missing ones), is writable (a read-only mount says no, even to root)."""
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        parent = os.path.dirname(p)
        if parent == p:
            return False
        p = parent
    return os.access(p, os.W_OK)


def _listdir(path: str) -> set[str]:
    try:
        return set(os.listdir(path))
    except OSError:
        return set()


def package_state(pkg_dir: str, tag: str, prefix: str | None = None, optimize: int = 0) -> dict:
    """{path, sampled, cached, writable}: how many of the package's top-level modules have a .pyc where this
    interpreter looks; with a prefix also `cached_in_pycache`, the ones beside the sources it ignores."""
    stems = sorted(f[:-3] for f in _listdir(pkg_dir) if f.endswith(".py"))
    where = cache_dir(pkg_dir, prefix)
    have = _listdir(where)
    out = {"path": pkg_dir, "sampled": len(stems),
           "cached": sum(pyc_name(s, tag, optimize) in have for s in stems), "writable": writable(where)}
    if prefix:
        beside = _listdir(os.path.join(pkg_dir, "__pycache__"))
        out["cached_in_pycache"] = sum(pyc_name(s, tag, optimize) in beside for s in stems)
    return out


def collect(paths=None, environ=None, names=None) -> dict:
    """The bytecode facts of the stack's packages, and of those its import loads (sympy, numpy...: an
    uncached dependency costs every start as much), found on `paths` (default sys.path)."""
    from qdoctor.facts.packages import stack
    from qdoctor.facts.torch_build import find_package
    from qdoctor.matrix import stack_imported

    env = os.environ if environ is None else environ
    tag = sys.implementation.cache_tag
    dont = env.get("PYTHONDONTWRITEBYTECODE")
    prefix = env.get("PYTHONPYCACHEPREFIX") or None
    optimize = env_flag(env.get("PYTHONOPTIMIZE"))
    out = {"cache_tag": tag, "dont_write_bytecode": bool(env_flag(dont)),
           "PYTHONDONTWRITEBYTECODE": redact_env_value("PYTHONDONTWRITEBYTECODE", dont),
           "pycache_prefix": os.path.abspath(prefix) if prefix else None, "optimize": optimize,
           "packages": {}}
    if tag is None:  # an implementation that caches no bytecode: nothing to look for
        return out
    for name in stack() + stack_imported() if names is None else names:
        pkg_dir = find_package(name, paths)
        if pkg_dir:
            out["packages"][name] = package_state(pkg_dir, tag, prefix, optimize)
    return out
