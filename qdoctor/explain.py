"""`qdoctor explain [FILE|-]`: name the known failures in an error message, a traceback or a whole CI log.

The text is judged by the same knowledge as everything else: matrix/failures.toml finds the failures (one
finding per failure, at the line where it first appears), matrix/causes.toml and each failure's `follows`
fold consequences under their cause, and a `check` finding on this machine (or on a saved snapshot,
--facts) that predicts the failure replaces the generic fix with one computed for that machine. Offline,
no torch import: only `re` over the text and, for the facts, the cheap collectors of `check`.
"""

from __future__ import annotations

import re
import sys

import click

from qdoctor.findings import Finding, root_code, roots

SCHEMA = "qdoctor.explain/1"
MAX_BYTES = 64 << 20  # a CI log longer than this is judged by its last 64 MiB
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def clean(text: str) -> str:
    """Drop terminal colour codes and carriage returns, which CI logs are full of."""
    return _ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")


def judge_text(text: str, matrix: dict, check_findings=()) -> list[Finding]:
    """One error finding per known failure found in `text`, linked to its causes (within the text, and to
    the `check` findings that predict it)."""
    from qdoctor.causes import link
    from qdoctor.known_failures import match_all

    fired = {f.code: f for f in check_findings if f.severity in ("warning", "error")}
    out = []
    for h in match_all(clean(text), matrix):
        kf = h.failure
        where = f"line {h.line_no}: {h.line}"
        if h.count > 1:
            where += f"  (and {h.count - 1} more line{'s' * (h.count > 2)})"
        ev = [where, f"source: {kf.source}"]
        fix = kf.fix
        on_machine = [fired[c] for c in kf.check_codes if c in fired]
        if on_machine:
            c = fired[root_code(on_machine[0], fired.values())]  # the check finding's own root cause
            ev.append(f"the facts show it too: {c.code} {c.title}")
            if c.fix:
                fix = c.fix
        out.append(Finding(kf.code, "error", kf.title, ev, fix, kf.area))
    return link(out, matrix)


def looked_for(matrix: dict) -> list[str]:
    from qdoctor.known_failures import failures

    return [f"{kf.code} {kf.slug}: {kf.title}" for kf in sorted(failures(matrix), key=lambda k: k.code)]


def read_input(path: str | None) -> tuple[str, str]:
    """(text, name) from a file or stdin; a usage error (exit 2) for what cannot be read as text."""
    from qdoctor.cli import UsageError

    if path in (None, "-"):
        if path is None and sys.stdin.isatty():
            raise UsageError("give a file to explain, or pipe the error in: ... 2>&1 | qdoctor explain -")
        data, name = sys.stdin.buffer.read(), "<stdin>"
    else:
        try:
            with open(path, "rb") as fh:
                fh.seek(0, 2)
                size = fh.tell()
                fh.seek(max(0, size - MAX_BYTES))
                data = fh.read()
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
        name = path
    data = data[-MAX_BYTES:]
    if b"\x00" in data[:8192]:
        raise UsageError(f"{name} is not a text file")
    text = data.decode("utf-8", errors="replace")
    if not text.strip():
        raise UsageError(f"{name} is empty: nothing to explain")
    return text, name


def render(findings: list[Finding], name: str, n_lines: int, facts_note: str | None, matrix: dict,
           verbose: bool) -> str:
    from qdoctor import __version__
    from qdoctor.report import render_text

    if not findings:
        lines = [f"qdoctor explain {__version__}: no known failure in {name} ({n_lines} lines).", "",
                 "Looked for these known failures (matrix/failures.toml):"]
        lines += [f"  {x}" for x in looked_for(matrix)]
        lines += ["", "If the text comes from this machine, `qdoctor check --deep` may still find the cause; "
                      "report the text with `qdoctor check --format markdown` otherwise."]
        return "\n".join(lines) + "\n"
    n = len(findings)
    head = f"qdoctor explain {__version__}: {n} known failure{'s' * (n != 1)} in {name} ({n_lines} lines)"
    if facts_note:
        head += f"; facts: {facts_note}"
    return render_text(findings, verbose=verbose, header=head, verdict=verdict(findings))


def verdict(findings: list[Finding]) -> str:
    """'Verdict: 3 known failures: root cause KF43 <title>' (consequences are not counted as causes)."""
    n = len(findings)
    rs = list(dict.fromkeys(f.code for f in roots(findings)))
    head = f"Verdict: {n} known failure{'s' * (n != 1)}"
    if len(rs) == 1:
        f = next(f for f in findings if f.code == rs[0])
        return f"{head}: {'root cause ' if n > 1 else ''}{f.code} {f.title}"
    return f"{head}: root causes {', '.join(rs)}"


@click.command()
@click.argument("file", required=False, metavar="[FILE|-]")
@click.option("--facts", "facts_file", default=None,
              help="Judge with a saved snapshot (check --json) of the machine the error came from.")
@click.option("--no-facts", is_flag=True, help="Judge the text alone, without this machine's facts.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
@click.option("-v", "--verbose", is_flag=True, help="Show every line of evidence.")
def explain(file, facts_file, no_facts, as_json, verbose):
    """Name the known failures in an error text, traceback or CI log, with their causes and fixes.

    Exit 0 when a known failure was found, 1 when none was (it says what it looked for), 2 on bad input.
    """
    from qdoctor import __version__, matrix, strict_json
    from qdoctor.cli import EXIT_FINDINGS, EXIT_OK, UsageError, out
    from qdoctor.rules import judge

    if facts_file and no_facts:
        raise click.UsageError("--facts and --no-facts contradict each other")
    text, name = read_input(file)
    mx = matrix.load()
    check, note = [], None
    if facts_file:
        from qdoctor.facts.schema import FactsError, load_file

        try:
            facts = load_file(facts_file)
        except FactsError as e:
            raise UsageError(str(e)) from None
        check, note = judge(facts, mx), f"snapshot {facts_file}"
    elif not no_facts:
        from qdoctor.facts import collect

        check, note = judge(collect(deep=False), mx), "this machine (--facts FILE for another one)"
    findings = judge_text(text, mx, check)
    n_lines = text.count("\n") + (not text.endswith("\n"))
    if as_json:
        doc = {"schema": SCHEMA, "qdoctor_version": __version__, "input": name, "lines": n_lines,
               "facts": note, "findings": [f.to_dict() for f in findings],
               "verdict": "known-failure" if findings else "unknown"}
        if not findings:
            doc["looked_for"] = looked_for(mx)
        out(strict_json.dumps(doc, indent=2) + "\n")
    else:
        out(render(findings, name, n_lines, note, mx, verbose))
    sys.exit(EXIT_OK if findings else EXIT_FINDINGS)
