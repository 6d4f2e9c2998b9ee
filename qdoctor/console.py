"""What every command prints and how it exits: one `out()` and one set of exit codes.

Exit codes (a contract for CI, documented in the README): 0 ok; 1 an error finding, or a run stopped
with a diagnosis (warnings too under --strict); 2 qdoctor was used wrongly (bad flag, unreadable
input: one line, no traceback); 3 qdoctor's own bug; 130 interrupted.
"""

from __future__ import annotations

import click

from qdoctor.redact import redact

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """A one-line message for the user; exit code 2, never a traceback."""


def out(text: str, err: bool = False) -> None:
    """Every byte qdoctor prints goes through redaction."""
    click.echo(redact(text), nl=False, err=err)
