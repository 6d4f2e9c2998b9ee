"""`qdoctor smoke`: the fast check, then the probes; same findings, formats and exit codes as check."""

from __future__ import annotations

import sys

import click

from qdoctor.cli import (
    UsageError,
    also_option,
    codes_option,
    emit_report,
    format_options,
    out,
    resolve_format,
)


def _progress(enabled: bool):
    if not enabled:
        return None

    def note(kind, name, result):  # one line per finished probe
        if kind == "done":
            extra = f" ({result.reason})" if result.reason and result.status != "pass" else ""
            t = f" {result.duration_s:.1f} s" if result.status != "skip" else ""
            out(f"  {name}: {result.status}{t}{extra}\n", err=True)

    return note


@click.command()
@click.option("--probe", "probes", multiple=True, metavar="NAME",
              help="Run only this probe (repeatable): imports, device, nf4, matmul4bit, lora_step, "
                   "optim8bit, save_load, precision, ddp.")
@click.option("--device", default=None, metavar="cpu|cuda:N",
              help="Where the probes compute; cuda:N is the N-th GPU CUDA_VISIBLE_DEVICES lets through "
                   "(default: cuda:0 if torch can use a visible GPU, else cpu).")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds allowed to each probe (and to importing the stack once).")
@click.option("--compute-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Compute dtype of the 4-bit probes (default: bf16 on GPUs that have it, fp16 on older "
                   "GPUs, fp32 on CPU).")
@click.option("--jobs", type=click.IntRange(min=1, max=16), default=None, hidden=True)
@click.option("--isolation", type=click.Choice(["fork", "spawn"]), default=None, hidden=True)
@click.option("--inject", default=None, hidden=True,
              help="Fault injection for tests: probe=abort|hang|wrong|raise, comma-separated.")
@format_options
def smoke(probes, device, timeout, compute_dtype, jobs, isolation, inject, as_json, fmt, verbose, strict,
          select, ignore, also):
    """Prove the QLoRA path works here: small real probes, each in its own process."""
    from qdoctor import devices, extra, matrix
    from qdoctor.facts import collect
    from qdoctor.findings import exit_code
    from qdoctor.findings import select as select_findings
    from qdoctor.rules import judge
    from qdoctor.smoke import findings_for, run_probes
    from qdoctor.smoke.runner import ProbeUsageError, parse_inject, select_probes
    from qdoctor.smoke.view import markdown_table, text_table

    fmt = resolve_format(as_json, fmt)
    extra.require("smoke")
    select_codes, ignore_codes = codes_option(select), codes_option(ignore, "--ignore")
    also = also_option(also)
    try:  # usage errors before any slow work
        select_probes(list(probes))
        if inject:
            parse_inject(inject)
    except ProbeUsageError as e:
        raise UsageError(str(e)) from None
    facts = collect(deep=False, timeout=60)
    mx = matrix.load()
    check_findings = judge(facts, mx)
    try:
        dev = devices.parse_device(device, facts)
    except devices.DeviceError as e:
        raise UsageError(str(e)) from None
    show = fmt == "text" or sys.stderr.isatty()
    if show:
        out(f"qdoctor smoke: {len(select_probes(list(probes)))} probe(s) on {dev}\n", err=True)
    results = run_probes(list(probes) or None, dev, timeout, facts, compute_dtype=compute_dtype,
                         inject=inject, jobs=jobs, isolation=isolation, progress=_progress(show), matrix=mx)
    findings = check_findings + findings_for(results, check_findings)
    findings = select_findings(findings, select_codes, ignore_codes)
    probe_dicts = [r.to_dict() for r in results]
    emit_report("smoke", findings, facts, fmt, verbose, extra={"device": dev, "probes": probe_dicts},
                text_footer=["Probes on " + dev + ":", *("  " + ln for ln in text_table(results)), ""],
                md_sections=[markdown_table(results)], strict=strict, also=also)
    sys.exit(exit_code(findings, strict))
