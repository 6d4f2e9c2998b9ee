"""Secrets never leave qdoctor: every output passes through `redact` last.

Two layers: values of credential-like environment variables are replaced wherever they appear,
and patterns (credentials inside URLs, well-known token shapes) are masked even when the value
came from somewhere else (a stderr tail, a config file). The home directory is shown as `~`.
"""

from __future__ import annotations

import os
import re

MASK = "***"
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|AUTH|COOKIE|SESSION", re.I)
_URL_CRED = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<cred>[^/\s:@]+(?::[^/\s@]*)?)@")
_TOKEN_SHAPES = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|sk-[A-Za-z0-9_-]{20,}"
    r"|xox[abpr]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16}|glpat-[A-Za-z0-9_-]{20,})\b"
)
_ASSIGN = re.compile(
    r"(?P<name>\b[A-Za-z_][A-Za-z0-9_]*(?:TOKEN|KEY|SECRET|PASSWORD|PASSWD)[A-Za-z0-9_]*)(?P<sep>\s*[=:]\s*)"
    r"(?P<val>[^\s'\"]+)",
    re.I,
)


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def secret_values(environ=None) -> list[str]:
    env = os.environ if environ is None else environ
    vals = {v for k, v in env.items() if is_secret_name(k) and v and len(v) >= 4}
    return sorted(vals, key=len, reverse=True)


def redact(text: str, environ=None, home: str | None = None) -> str:
    if not text:
        return text
    for v in secret_values(environ):
        text = text.replace(v, MASK)
    text = _URL_CRED.sub(lambda m: m.group("scheme") + MASK + "@", text)
    text = _TOKEN_SHAPES.sub(MASK, text)
    text = _ASSIGN.sub(lambda m: m.group("name") + m.group("sep") + MASK, text)
    home = os.path.expanduser("~") if home is None else home
    if home and home not in ("/", "~") and len(home) > 1:
        text = re.sub(re.escape(home.rstrip("/")) + r"(?=/|\b|$)", "~", text)
    return text


def redact_env_value(name: str, value: str | None) -> str | None:
    """For facts: a credential-like variable keeps only the fact that it is set."""
    if value is None:
        return None
    if is_secret_name(name):
        return MASK
    return redact(value)


def redact_obj(obj, environ=None, home=None):
    """Redact every string inside a JSON-like object (facts, findings, probe results)."""
    if isinstance(obj, str):
        return redact(obj, environ, home)
    if isinstance(obj, dict):
        return {k: redact_obj(v, environ, home) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v, environ, home) for v in obj]
    return obj
