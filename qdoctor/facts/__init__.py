"""Observe: collect a JSON-serialisable snapshot of this machine (schema `qdoctor.facts/1`).

Never imports torch, bitsandbytes, transformers or peft in this process.
"""

from __future__ import annotations

from qdoctor.facts.schema import empty


def collect(deep: bool = False, timeout: float = 60.0) -> dict:
    facts = empty()
    return facts
