"""Where each finding code is documented: a stable anchor per code in docs/rules.md, and its URL.

The anchor is the code in lower case (`#qd303`), written as an explicit `<a id>` by qdoctor/rulesdoc.py,
so it survives a changed title or slug. CI annotations, JSON consumers and the text view link there.
A fork or a mirror points the links at its own copy with QDOCTOR_RULES_URL.
"""

from __future__ import annotations

import os

RULES_DOC = "docs/rules.md"
RULES_URL = "https://github.com/qdoctor/qdoctor/blob/main/docs/rules.md"


def anchor(code: str) -> str:
    return code.strip().lower()


def url(code: str, environ=None) -> str:
    env = os.environ if environ is None else environ
    return f"{env.get('QDOCTOR_RULES_URL') or RULES_URL}#{anchor(code)}"
