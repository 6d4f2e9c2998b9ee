"""Command line: `qdoctor check | smoke | train | explain | report | matrix | rules`. Output and exit codes:
qdoctor.console."""

from __future__ import annotations

import os
import sys

import click

from qdoctor import __version__
from qdoctor.console import (  # noqa: F401 - re-exported: the commands import them from here
    EXIT_FINDINGS,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    out,
)
from qdoctor.formats import FORMATS


def codes_option(value: str | None, flag: str = "--select") -> tuple[str, ...]:
    """Codes or prefixes from --select/--ignore. One that matches no code qdoctor knows is a usage
    error: a typo in a CI gate must not silently select nothing and pass."""
    codes = tuple(c.strip().upper() for c in (value or "").split(",") if c.strip())
    if not codes:
        return codes
    from qdoctor.rulesdoc import all_codes, code_families

    known = all_codes()
    bad = [c for c in codes if not any(k.startswith(c) for k in known)]
    if bad:
        raise UsageError(f"{flag} {','.join(bad)}: no such code or prefix (known: {code_families(known)}; "
                         "`qdoctor rules` lists every code)")
    return codes


def format_options(f):
    f = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")(f)
    f = click.option("--format", "fmt",
                     type=click.Choice(FORMATS), default=None,
                     help="Output format: markdown for bug reports and job summaries, junit for CI test "
                          "reports, github for workflow annotations, auto = github under GitHub Actions "
                          "(GITHUB_ACTIONS=true), else text.")(f)
    f = click.option("-v", "--verbose", is_flag=True, help="Show the evidence under every line.")(f)
    f = click.option("--strict", is_flag=True, help="Exit 1 on warnings too.")(f)
    f = click.option("--select", default=None, help="Only these codes/prefixes (QD3,QD401).")(f)
    f = click.option("--ignore", default=None, help="Drop these codes or prefixes, comma-separated.")(f)
    f = click.option("--also", "also", multiple=True, metavar="FORMAT=FILE",
                     help="Also write the same run in another format to FILE (repeatable): "
                          "json=check.json, markdown=summary.md, junit=report.xml.")(f)
    return f


def resolve_format(as_json: bool, fmt: str | None) -> str:
    if as_json and fmt not in (None, "json"):
        raise click.UsageError(f"--json and --format {fmt} contradict each other")
    if fmt == "auto":
        from qdoctor.formats import resolve_auto

        return resolve_auto()
    return "json" if as_json else (fmt or "text")


class LazyGroup(click.Group):
    """`smoke`, `train` and `explain` live in their own modules and are imported only when invoked, so
    that `qdoctor check` does not pay for them at start-up."""

    lazy = {"smoke": "qdoctor.smoke.cli", "train": "qdoctor.train.cli", "explain": "qdoctor.explain",
            "report": "qdoctor.bugreport"}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx, name):
        if name in self.lazy and name not in self.commands:
            import importlib

            self.add_command(getattr(importlib.import_module(self.lazy[name]), name))
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qdoctor")
def cli():
    """Can this machine fine-tune an LLM with QLoRA? check -> smoke -> train."""


@cli.command()
@click.option("--facts", "facts_file", type=str, default=None,
              help="Judge a saved snapshot (a --json output, a facts object, or a `qdoctor report` "
                   "markdown file) instead of this machine.")
@click.option("--deep", is_flag=True,
              help="Also import torch and bitsandbytes in a child process (slower; result cached).")
@click.option("--refresh", is_flag=True, help="With --deep: ignore the cached result, run the child again.")
@click.option("--timeout", type=click.FloatRange(min=1), default=60.0, show_default=True,
              help="Seconds allowed to the child process of --deep.")
@click.option("--save-facts", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the facts snapshot to this file.")
@click.option("--model", "model", default=None, metavar="DIR_OR_ID",
              help="Also say whether QLoRA of this model fits each GPU (its config.json: a local directory "
                   "or the Hugging Face cache; nothing is downloaded).")
@format_options
def check(facts_file, deep, refresh, timeout, save_facts, model, as_json, fmt, verbose, strict, select,
          ignore, also):
    """Observe this machine, judge it against the matrix, print findings with fixes."""
    from qdoctor import matrix
    from qdoctor.facts.schema import FactsError, load_file
    from qdoctor.findings import exit_code
    from qdoctor.findings import select as select_findings
    from qdoctor.rules import judge

    fmt = resolve_format(as_json, fmt)
    select_codes, ignore_codes = codes_option(select), codes_option(ignore, "--ignore")
    also = also_option(also)
    if facts_file and deep:
        raise click.UsageError("--deep observes this machine; it cannot be combined with --facts")
    if facts_file:
        try:
            facts = load_file(facts_file)
        except FactsError as e:
            raise UsageError(str(e)) from None
    else:
        from qdoctor.facts import collect

        facts = collect(deep=deep or refresh, timeout=timeout, refresh=refresh,
                        progress=lambda msg: out(f"qdoctor: {msg}...\n", err=True))
    if model:
        from qdoctor.facts.model import ModelNotFound
        from qdoctor.facts.model import collect as collect_model

        try:
            facts["model"] = collect_model(model)
        except ModelNotFound as e:
            raise UsageError(str(e)) from None
    findings = judge(facts, matrix.load())
    findings = select_findings(findings, select_codes, ignore_codes)
    emit_report("check", findings, facts, fmt, verbose, strict=strict, also=also)
    if save_facts:
        write_facts(save_facts, facts)
    sys.exit(exit_code(findings, strict))


def write_facts(path: str, facts: dict) -> None:
    from qdoctor import strict_json
    from qdoctor.atomic import write_text
    from qdoctor.redact import redact_obj

    write_text(path, strict_json.dumps(redact_obj(facts), indent=2) + "\n")


ALSO_FORMATS = tuple(f for f in FORMATS if f != "auto")


def also_option(values) -> list[tuple[str, str]]:
    """`--also json=check.json` -> [("json", "check.json")]: more formats of the same run, into files."""
    pairs = []
    for v in values or ():
        fmt, sep, path = v.partition("=")
        if not sep or fmt not in ALSO_FORMATS or not path:
            raise UsageError(f"--also {v}: expected FORMAT=FILE with FORMAT one of {', '.join(ALSO_FORMATS)}")
        pairs.append((fmt, path))
    return pairs


def render_report(command, findings, facts, fmt, verbose, extra=None, text_footer=None, md_sections=None,
                  header=None, strict=False) -> str:
    from qdoctor import report
    from qdoctor.redact import redact_obj

    if fmt == "junit":
        from qdoctor.formats.junit import render_junit

        return render_junit(findings, command, probes=(extra or {}).get("probes"), strict=strict)
    if fmt == "github":
        from qdoctor.formats.github import render_github

        return render_github(findings, command)
    if fmt == "json":
        return report.render_json(findings, redact_obj(facts) if facts is not None else None, command, extra)
    if fmt == "markdown":
        return report.render_markdown(findings, redact_obj(facts) if facts is not None else None, command,
                                      md_sections)
    head = header or f"qdoctor {command} {__version__}"
    return report.render_text(findings, verbose=verbose, header=head, footer=text_footer)


def emit_report(command, findings, facts, fmt, verbose, extra=None, text_footer=None, md_sections=None,
                header=None, strict=False, also=()):
    """Print the report in `fmt`, and write each `--also FORMAT=FILE` (redacted like everything printed)."""
    args = (command, findings, facts)
    kw = dict(extra=extra, text_footer=text_footer, md_sections=md_sections, header=header, strict=strict)
    out(render_report(*args, fmt, verbose, **kw))
    for other, path in also:
        from qdoctor.atomic import write_text
        from qdoctor.redact import redact

        try:
            write_text(path, redact(render_report(*args, other, verbose, **kw)))
        except OSError as e:
            raise UsageError(f"--also {other}={path}: cannot write: {e.strerror or e}") from None


@cli.command("matrix")
@click.option("--platform", "platform", default=None, metavar="P",
              help="A platform key such as linux-x86_64-cpu or linux-x86_64-cuda-sm_90, or 'all' "
                   "(default: this machine's, else all).")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "json"]), default="text")
def matrix_cmd(platform, fmt):
    """Print the verified combinations (matrix/verified/<platform>.json): which stacks were run, and how."""
    from qdoctor import strict_json, verified

    known = verified.platforms()
    if platform in (None, "all"):
        mine = None
        if platform is None:
            from qdoctor.facts import collect

            mine = verified.platform_key(collect(deep=False, timeout=30))
        chosen = [mine] if mine in known else known
    elif platform in known:
        chosen = [platform]
    else:
        have = ", ".join(known) or "none"
        raise UsageError(f"nothing verified on platform {platform!r} (verified: {have})")
    docs = [verified.load(p) for p in chosen]
    if fmt == "json":
        out(strict_json.dumps(docs, indent=1) + "\n")
        return
    out("\n".join(verified.render_table(d, fmt) for d in docs if d) or "nothing verified yet\n")


@cli.command("rules")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown"]), default="text")
def rules_cmd(fmt):
    """List every finding code with what it checks."""
    from qdoctor.rules import load_rules
    from qdoctor.rulesdoc import render_rules

    out(render_rules(load_rules(), fmt))


def main(argv=None):
    try:
        rc = cli.main(args=argv, prog_name="qdoctor", standalone_mode=False)
    except UsageError as e:
        out(f"qdoctor: error: {e}\n", err=True)
        sys.exit(EXIT_USAGE)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        out("qdoctor: aborted\n", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:
        # bad flag / bad value: click's message, one line plus the usage hint, exit 2
        msg = e.format_message()
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        out(f"qdoctor: error: {msg}{hint}\n", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        out("qdoctor: interrupted\n", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit:
        raise
    except Exception as e:  # a bug in qdoctor: one line, traceback only on request
        if os.environ.get("QDOCTOR_DEBUG"):
            raise
        out(f"qdoctor: internal error: {type(e).__name__}: {e} (set QDOCTOR_DEBUG=1 for a traceback)\n",
            err=True)
        sys.exit(EXIT_INTERNAL)
    sys.exit(rc if isinstance(rc, int) else 0)
