"""JSON as RFC 8259 defines it: a non-finite float (NaN, inf) is written as `null`, not as Python's bare `NaN`
that jq, JavaScript and most other readers reject. Every file and every `--json` output goes through here."""

from __future__ import annotations

import json
import math


def finite(obj):
    """A copy of obj with every non-finite float replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    kw.setdefault("default", str)
    return json.dumps(finite(obj), allow_nan=False, **kw)
