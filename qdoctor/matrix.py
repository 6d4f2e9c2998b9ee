"""The knowledge, as data: load `matrix/*.toml` (shipped inside the wheel as qdoctor/matrix).

Every table entry carries a `source`; rules read these tables instead of hard-coding facts, so a
newer matrix re-judges an old snapshot without code changes.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def matrix_dir() -> Path:
    """Installed wheel: qdoctor/matrix; source checkout / editable install: <repo>/matrix."""
    here = Path(__file__).resolve().parent
    for cand in (here / "matrix", here.parent / "matrix"):
        if cand.is_dir() and any(cand.glob("*.toml")):
            return cand
    raise FileNotFoundError("qdoctor's matrix/ data directory is missing from this installation")


@functools.lru_cache(maxsize=4)
def load(directory: str | None = None) -> dict:
    """All tables, keyed by file stem: {'gpus': {...}, 'drivers': {...}, ...}."""
    d = Path(directory) if directory else matrix_dir()
    out = {}
    for f in sorted(d.glob("*.toml")):
        with f.open("rb") as fh:
            out[f.stem] = tomllib.load(fh)
    return out



def _stack_table(mx: dict | None) -> dict:
    return ((load() if mx is None else mx).get("packages") or {}).get("stack") or {}


def stack(mx: dict | None = None) -> tuple[str, ...]:
    """The QLoRA stack's distributions in import order (packages.toml [stack] core): what the packages
    collector reports, the probe cache keys on, smoke imports, and the `train` extra installs."""
    return tuple(_stack_table(mx).get("core", ()))


def stack_neighbours(mx: dict | None = None) -> tuple[str, ...]:
    return tuple(_stack_table(mx).get("neighbours", ()))


def stack_imported(mx: dict | None = None) -> tuple[str, ...]:
    """Import packages the stack's own import loads on every start (packages.toml [stack] imported)."""
    return tuple(_stack_table(mx).get("imported", ()))
