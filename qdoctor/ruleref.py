"""Where each finding code is documented: a stable anchor per code in docs/rules.md, and its URL.

The anchor is the code in lower case (`#qd303`), written as an explicit `<a id>` by qdoctor/rulesdoc.py,
so it survives a changed title or slug. CI annotations, JSON consumers and the text view link there.
The link is relative to the repository root (docs/rules.md#qd303) because qdoctor has no published home to
point at; set QDOCTOR_RULES_URL to where your copy of docs/rules.md is served to get absolute links.
"""

from __future__ import annotations

import os

RULES_DOC = "docs/rules.md"
RULES_URL = RULES_DOC


def anchor(code: str) -> str:
    return code.strip().lower()


def url(code: str, environ=None) -> str:
    env = os.environ if environ is None else environ
    return f"{env.get('QDOCTOR_RULES_URL') or RULES_URL}#{anchor(code)}"
