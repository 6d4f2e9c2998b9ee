"""`qdoctor report`: one markdown file to attach to a bug report (check + smoke + versions).

The file embeds the `--json` snapshot in a fenced block tagged `qdoctor-snapshot`, so a maintainer runs
`qdoctor check --facts report.md` on it and re-judges the machine with a newer matrix. Everything in it
passes through qdoctor.redact, as all output does.
"""

from __future__ import annotations

import datetime as dt
import json
import sys

import click

from qdoctor import __version__
from qdoctor.cli import UsageError, out
from qdoctor.facts.schema import SNAPSHOT_FENCE as FENCE


def versions_table(facts: dict) -> str:
    pk = facts.get("packages") or {}
    plat = facts.get("platform") or {}
    nv = facts.get("nvidia") or {}
    torch = facts.get("torch") or {}
    rows = [("qdoctor", __version__),
            ("platform", ", ".join(str(x) for x in (plat.get("system"), plat.get("machine"), plat.get("libc"),
                                                    plat.get("container")) if x)),
            ("python", plat.get("python"))]
    rows += [(n, pk.get(n)) for n in ("torch", "bitsandbytes", "transformers", "peft", "accelerate", "triton",
                                      "safetensors", "tokenizers", "huggingface-hub")]
    if torch.get("cuda"):
        rows.append(("torch CUDA", torch.get("cuda")))
    driver = nv.get("driver")
    rows.append(("NVIDIA driver", f"{driver} (CUDA {nv.get('cuda_driver')})" if driver else "none"))
    for g in nv.get("gpus") or []:
        rows.append((f"GPU {g.get('index')}", f"{g.get('name')} (CC {g.get('compute_capability')}, "
                                               f"{g.get('memory_total_mib')} MiB)"))
    lines = ["| | version |", "|---|---|"]
    lines += [f"| {k} | {'-' if v in (None, '') else str(v).replace('|', '/')} |" for k, v in rows]
    return "#### versions\n\n" + "\n".join(lines)


def render(findings, facts: dict, snapshot: dict, command_line: str, probe_table: str | None) -> str:
    from qdoctor.report import render_markdown

    head = [f"## qdoctor report ({dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')})", "",
            f"`{command_line}`. Re-judge this file with `qdoctor check --facts FILE`.", "",
            versions_table(facts), "", ""]
    sections = [probe_table] if probe_table else ["#### probes\n\nnot run (`--no-smoke`)"]
    body = render_markdown(findings, None, "check + smoke" if probe_table else "check", sections)
    snap = ["", "<details><summary>snapshot (JSON)</summary>", "", FENCE,
            json.dumps(snapshot, indent=1, default=str), "```", "", "</details>", ""]
    return "\n".join(head) + body + "\n".join(snap)


@click.command()
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the report to this file (default: stdout).")
@click.option("--no-smoke", is_flag=True, help="Skip the probes (a second instead of ~15 s).")
@click.option("--probe", "probes", multiple=True, metavar="NAME", help="Run only this probe (repeatable).")
@click.option("--facts", "facts_file", default=None,
              help="Report on a saved snapshot instead of this machine.")
@click.option("--timeout", type=click.FloatRange(min=1), default=120.0, show_default=True,
              help="Seconds allowed to each probe.")
def report(output, no_smoke, probes, facts_file, timeout):
    """One markdown file for a bug report: versions, check, smoke, and the JSON snapshot
    (secrets redacted); `qdoctor check --facts FILE` re-judges it."""
    from qdoctor import matrix
    from qdoctor.facts.schema import FactsError, load_file
    from qdoctor.findings import exit_code
    from qdoctor.redact import redact, redact_obj
    from qdoctor.rules import judge

    if facts_file:
        if not no_smoke:
            raise UsageError("--facts reports on a snapshot: the probes cannot run there (add --no-smoke)")
        try:
            facts = load_file(facts_file)
        except FactsError as e:
            raise UsageError(str(e)) from None
    else:
        from qdoctor.facts import collect

        facts = collect(deep=False, timeout=60)
    mx = matrix.load()
    findings = judge(facts, mx)
    extra, table = {}, None
    if not no_smoke:
        from qdoctor import devices
        from qdoctor.extra import require
        from qdoctor.smoke import findings_for, run_probes
        from qdoctor.smoke.runner import ProbeUsageError, select_probes
        from qdoctor.smoke.view import markdown_table

        require("report")  # the probes drive the stack; `--no-smoke` needs none of it
        try:
            select_probes(list(probes))
            dev = devices.parse_device(None, facts)
        except (ProbeUsageError, devices.DeviceError) as e:
            raise UsageError(str(e)) from None
        out(f"qdoctor report: running probes on {dev}...\n", err=True)
        results = run_probes(list(probes) or None, dev, timeout, facts, matrix=mx)
        findings = findings + findings_for(results, findings)
        extra = {"device": dev, "probes": [r.to_dict() for r in results]}
        table = markdown_table(results)
    from qdoctor.report import render_json

    snapshot = json.loads(render_json(findings, redact_obj(facts), "report", extra))
    how = "qdoctor report" + (" --no-smoke" if no_smoke else "") + (" --facts FILE" if facts_file else "")
    text = redact(render(findings, redact_obj(facts), snapshot, how, table))
    if output:
        from qdoctor.atomic import write_text

        write_text(output, text)
        out(f"qdoctor report: wrote {output}; attach it to the issue\n", err=True)
    else:
        out(text)
    sys.exit(exit_code(findings))
