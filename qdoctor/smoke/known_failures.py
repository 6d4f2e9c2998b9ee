"""Match a probe's error text to a known failure mode (matrix/failures.toml) to name its fix."""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class KnownFailure:
    code: str
    slug: str
    title: str
    fix: str
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=4)
def _compiled(table: tuple) -> list[tuple[re.Pattern, KnownFailure]]:
    out = []
    for items in table:
        f = dict(items)
        out.append((re.compile(f["pattern"], re.I),
                    KnownFailure(f["code"], f["slug"], f["title"], f["fix"], f.get("source", ""))))
    return out


def table_from(matrix: dict) -> tuple:
    return tuple(tuple(sorted(f.items())) for f in matrix.get("failures", {}).get("failure", []))


def match(text: str | None, matrix: dict) -> KnownFailure | None:
    """The first known failure whose pattern occurs in `text`, or None."""
    if not text:
        return None
    for pat, kf in _compiled(table_from(matrix)):
        if pat.search(text):
            return kf
    return None
