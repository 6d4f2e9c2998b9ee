"""Output formats for CI beside report.py's text, JSON and markdown: JUnit XML and GitHub workflow
commands. Like the others they are pure (findings, …) -> str; the CLI redacts the final string."""

from __future__ import annotations

import os

FORMATS = ("text", "json", "markdown", "junit", "github", "auto")


def resolve_auto(environ=None) -> str:
    """`--format auto`: annotations under GitHub Actions (GITHUB_ACTIONS=true), else the text view."""
    env = os.environ if environ is None else environ
    return "github" if env.get("GITHUB_ACTIONS") == "true" else "text"
