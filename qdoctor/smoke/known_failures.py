"""Match a probe's error text to a known failure mode: the shared matcher (qdoctor.known_failures)."""

from __future__ import annotations

from qdoctor.known_failures import KnownFailure, match, match_all, table_from

__all__ = ["KnownFailure", "match", "match_all", "table_from"]
