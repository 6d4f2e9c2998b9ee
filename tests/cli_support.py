"""Run the real `qdoctor` entry point in-process, so exit codes and error handling are the ones users get."""

from __future__ import annotations

import click
from click.testing import CliRunner

from qdoctor.cli import main


@click.command(context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def entry(args):
    main(list(args))


def qd(*args, env=None, input=None):
    return CliRunner().invoke(entry, list(args), env=env, input=input)
