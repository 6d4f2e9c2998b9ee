"""Match error text (a probe's exception, --deep's CUDA error, a user's traceback or CI log) to the known
failure modes of matrix/failures.toml, so that the fix comes from the same table everywhere.

Pure and cheap: only `re`; used by the check rules, the smoke probes and `qdoctor explain`.
"""

from __future__ import annotations

import bisect
import functools
import re
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class KnownFailure:
    code: str
    slug: str
    title: str
    fix: str
    source: str
    area: str = "general"
    check_codes: tuple[str, ...] = ()  # check rules that predict this failure from the facts
    follows: tuple[str, ...] = ()  # known failures this one is a consequence of, when both appear
    example: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["check_codes"], d["follows"] = list(self.check_codes), list(self.follows)
        return d


@dataclass(frozen=True)
class Hit:
    failure: KnownFailure
    line_no: int  # 1-based line of the first occurrence
    line: str  # that line, stripped and cut to a readable length
    count: int = 1
    lines: tuple[int, ...] = field(default=(), compare=False)


def table_from(matrix: dict) -> tuple:
    return tuple(tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in f.items()))
                 for f in matrix.get("failures", {}).get("failure", []))


def fold_case(pattern: str) -> str:
    """The pattern for lower-cased text: literal letters lower-cased, escapes (\\S, \\d, \\.) kept.

    Matching a lower-cased copy case-sensitively gives `re` a literal prefix to search for; with re.I it
    has none and a 10 MB CI log took 20 s instead of under one."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(pattern[i:i + 2])
            i += 2
            continue
        out.append(c.lower())
        i += 1
    return "".join(out)


@functools.lru_cache(maxsize=4)
def _compiled(table: tuple) -> list[tuple[re.Pattern, KnownFailure]]:
    out = []
    for items in table:
        f = dict(items)
        out.append((re.compile(fold_case(f["pattern"]), re.M),
                    KnownFailure(f["code"], f["slug"], f["title"], f["fix"], f.get("source", ""),
                                 f.get("area", "general"), tuple(f.get("check_codes", ())),
                                 tuple(f.get("follows", ())), f.get("example", ""))))
    return out


def failures(matrix: dict) -> list[KnownFailure]:
    return [kf for _, kf in _compiled(table_from(matrix))]


def match(text: str | None, matrix: dict, only=None) -> KnownFailure | None:
    """The first known failure (in table order: the specific ones come first) whose pattern occurs in
    `text`, or None. `only(kf)` restricts the table (e.g. to the failures one rule explains)."""
    if not text:
        return None
    low = text.lower()
    for pat, kf in _compiled(table_from(matrix)):
        if (only is None or only(kf)) and pat.search(low):
            return kf
    return None


def match_all(text: str | None, matrix: dict) -> list[Hit]:
    """Every known failure found in `text`, in the order it first appears there. A failure whose
    pattern also matched a more specific entry on the same line is left out (table order decides)."""
    if not text:
        return []
    low = text.lower()  # str.lower adds no newline, so line numbers are the same in both
    starts = [0] + [m.end() for m in re.finditer("\n", low)]
    orig_lines = text.split("\n")

    taken: set[int] = set()  # lines already explained by a more specific entry
    hits = []
    for pat, kf in _compiled(table_from(matrix)):
        nos = []
        for m in pat.finditer(low):
            n = bisect.bisect_right(starts, m.start()) - 1  # 0-based line of the match
            if n not in nos:
                nos.append(n)
        nos = [n for n in nos if n not in taken]
        if not nos:
            continue
        taken.update(nos)
        first = nos[0]
        line = orig_lines[first].strip() if first < len(orig_lines) else ""
        if len(line) > 300:
            line = line[:297] + "..."
        hits.append(Hit(kf, first + 1, line, len(nos), tuple(n + 1 for n in nos)))
    return sorted(hits, key=lambda h: h.line_no)
