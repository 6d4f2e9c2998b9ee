"""Compute capabilities and GPU code: the one parser, and whether a build's code runs on a GPU.

A capability reaches qdoctor in many spellings: NVML's (9, 0), the facts' '9.0', torch's arch list
'sm_90' / 'sm_90a' / 'compute_120', the ELF reader's 'sm_120'. Everything that compares or formats one
(rules, the bitsandbytes loader model, the plan, the collectors) goes through `cc_tuple`, so a new
spelling or a malformed value is handled once: anything it cannot read is None, never an exception.
"""

from __future__ import annotations

import re

_DOTTED = re.compile(r"(\d+)\.(\d+)")
_SM = re.compile(r"(?:sm|compute)_(\d+)(\d)[af]?")


def cc_tuple(s) -> tuple[int, int] | None:
    """'9.0' / 'sm_90' / 'sm_90a' / 'compute_120' / '12.0' / (9, 0) / 8.6 -> (9, 0) … ; None if unreadable."""
    if isinstance(s, (list, tuple)):
        if len(s) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in s):
            return int(s[0]), int(s[1])
        return None
    if isinstance(s, float):
        s = repr(s)
    if not isinstance(s, str):
        return None
    m = _DOTTED.fullmatch(s.strip())
    if m:
        return int(m.group(1)), int(m.group(2))
    m = _SM.fullmatch(s.strip())
    if m:
        return int(m.group(1)), int(m.group(2))
    return None


def cc_str(cc) -> str | None:
    """(9, 0) / 'sm_90' -> '9.0' (the facts' spelling)."""
    t = cc_tuple(cc)
    return f"{t[0]}.{t[1]}" if t else None


def sm(cc) -> str:
    """'9.0' -> 'sm_90'; 'sm_?' when unreadable."""
    t = cc_tuple(cc)
    return f"sm_{t[0]}{t[1]}" if t else "sm_?"


def arch_runs(cc, sass, ptx) -> bool | None:
    """Can code built for `sass` (cubins) / `ptx` run on a GPU of capability `cc`?

    A cubin runs on the same major with an equal or higher minor; PTX is JIT-compiled for any GPU of
    equal or higher capability. Arch-specific cubins (sm_90a) run only on that exact GPU.
    """
    c = cc_tuple(cc)
    if c is None or sass is None:
        return None
    for a in sass or []:
        t = cc_tuple(a)
        if t is None:
            continue
        if isinstance(a, str) and a.endswith(("a", "f")):
            if t == c:
                return True
            continue
        if t[0] == c[0] and t[1] <= c[1]:
            return True
    return any((t := cc_tuple(a)) is not None and t <= c for a in (ptx or []))


def split_arch_list(arch_list) -> tuple[list[str], list[str]]:
    """torch.cuda.get_arch_list() ('sm_90', 'compute_90') -> (cubin arches, PTX arches spelled 'sm_90')."""
    sass = [a for a in arch_list if a.startswith("sm_")]
    ptx = [a.replace("compute_", "sm_") for a in arch_list if a.startswith("compute_")]
    return sass, ptx


def by_cc(arches) -> list[str]:
    """Distinct arches, lowest capability first (unreadable ones first)."""
    return sorted(set(arches), key=lambda a: cc_tuple(a) or (0, 0))


def arch_span(sass, ptx) -> str:
    sass = [a for a in (sass or []) if cc_tuple(a)]
    s = ", ".join(sass) if sass else "no cubins"
    if ptx:
        s += " + PTX " + ", ".join(ptx)
    return s


def highest(ccs) -> str | None:
    """The highest readable capability of `ccs`, in the facts' spelling ('9.0'); None if none."""
    ts = [t for t in (cc_tuple(c) for c in ccs) if t]
    return cc_str(max(ts)) if ts else None
