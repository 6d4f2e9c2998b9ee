"""GitHub Actions workflow commands: one annotation per finding (`::error title=QD303 …::message`).

Escaping follows GitHub's runner (actions/toolkit core/src/command.ts): in the message `%`, `\\r` and
`\\n` become %25, %0D, %0A; in a property value `:` and `,` also become %3A and %2C. A consequence is
annotated with what it follows from, and its cause lists its consequences, as in the text view.
"""

from __future__ import annotations

from qdoctor.findings import Finding, rank, root_code
from qdoctor.report import consequences, is_consequence, verdict_line
from qdoctor.ruleref import url

LEVEL = {"error": "error", "warning": "warning", "info": "notice"}


def escape_data(s: str) -> str:
    return s.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(s: str) -> str:
    return escape_data(s).replace(":", "%3A").replace(",", "%2C")


def command(level: str, message: str, **props: str) -> str:
    p = ",".join(f"{k}={escape_property(v)}" for k, v in props.items())
    return f"::{level}{' ' + p if p else ''}::{escape_data(message)}"


def annotation(f: Finding, findings: list[Finding], under: dict[str, list[Finding]]) -> str:
    lines = [f"{f.code} {f.title}"]
    title = f"{f.code} {f.title}"
    if is_consequence(f, findings):
        r = root_code(f, findings)
        cause = next(x for x in findings if x.code == r)
        lines.append(f"follows from {r}: {cause.title}")
        title = f"{f.code} (follows from {r})"
    lines += [f"• {e}" for e in f.evidence]
    if f.fix:
        lines.append(f"fix: {f.fix}")
    for c in under.get(f.code, []):
        lines.append(f"↳ {c.code} {c.title}")
    lines.append(f"see {url(f.code)}")
    return command(LEVEL[f.severity], "\n".join(lines), title=title[:200])


def render_github(findings: list[Finding], command_name: str) -> str:
    """Annotations for every non-ok finding, roots first, then the verdict as a plain log line."""
    under = consequences(findings)
    shown = [f for f in findings if f.severity != "ok"]
    shown.sort(key=lambda f: (is_consequence(f, findings), -rank(f.severity), f.code))
    out = [annotation(f, findings, under) for f in shown]
    out.append(f"qdoctor {command_name}: {verdict_line(findings)}")
    return "\n".join(out) + "\n"
