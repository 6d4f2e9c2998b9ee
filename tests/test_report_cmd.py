"""`qdoctor report`: one markdown file for a bug report whose embedded snapshot `check --facts` re-judges."""

from __future__ import annotations

import json
from pathlib import Path

from cli_support import qd

from qdoctor.facts.schema import SNAPSHOT_FENCE

SNAP = Path(__file__).parent / "snapshots"
SECRET = "hf_reportsecretABCDEFGHIJ0123456789"


def judged(path) -> tuple[int, list]:
    r = qd("check", "--facts", str(path), "--json")
    return r.exit_code, [(f["code"], f["severity"], f["title"]) for f in json.loads(r.output)["findings"]]


def test_report_round_trip_rejudges_to_the_same_findings(tmp_path):
    for name in ("v100-cu130", "hgx-fabric-manager-stopped", "h200-cu130"):
        out = tmp_path / f"{name}.md"
        r = qd("report", "--facts", str(SNAP / f"{name}.json"), "--no-smoke", "-o", str(out))
        text = out.read_text()
        assert text.count(SNAPSHOT_FENCE) == 1 and "#### versions" in text
        rc, fs = judged(out)
        assert (rc, fs) == judged(SNAP / f"{name}.json") and r.exit_code == rc
    assert "| GPU 0 | Tesla V100-SXM2-32GB (CC 7.0, 32768 MiB) |" in (tmp_path / "v100-cu130.md").read_text()
    assert "| NVIDIA driver | 580.95.05 (CUDA 13.0) |" in (tmp_path / "v100-cu130.md").read_text()


def test_report_of_this_machine_redacts_and_rejudges(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    out = tmp_path / "r.md"
    r = qd("report", "--no-smoke", "-o", str(out), env={"HF_TOKEN": SECRET})
    assert r.exit_code in (0, 1), r.output
    text = out.read_text()
    assert SECRET not in text and "HF_TOKEN" in text  # the name is a fact, its value never
    assert "not run (`--no-smoke`)" in text and "| torch |" in text
    rc, _ = judged(out)
    assert rc == r.exit_code


def test_report_with_a_probe_embeds_its_result(tmp_path):
    out = tmp_path / "r.md"
    r = qd("report", "--probe", "device", "-o", str(out))
    assert r.exit_code in (0, 1), r.output
    text = out.read_text()
    assert "#### probes" in text and "| device | pass |" in text
    snap = json.loads(text.split(SNAPSHOT_FENCE + "\n", 1)[1].split("\n```", 1)[0])
    assert [p["probe"] for p in snap["probes"]] == ["device"] and snap["schema"] == "qdoctor.report/1"


def test_markdown_without_a_snapshot_is_bad_input(tmp_path):
    p = tmp_path / "notes.md"
    p.write_text("# my notes\n\nno snapshot here\n")
    r = qd("check", "--facts", str(p))
    assert r.exit_code == 2 and "not valid JSON" in r.output and "Traceback" not in r.output
    broken = tmp_path / "cut.md"
    broken.write_text(f"text\n{SNAPSHOT_FENCE}\n{{\"facts\": \n```\n")
    r = qd("check", "--facts", str(broken))
    assert r.exit_code == 2 and "embedded snapshot is not valid JSON" in r.output


def test_check_markdown_output_is_accepted_too(tmp_path):
    md = qd("check", "--facts", str(SNAP / "t4.json"), "--format", "markdown").output
    p = tmp_path / "check.md"
    p.write_text(md)
    assert judged(p) == judged(SNAP / "t4.json")


def test_report_facts_with_smoke_is_usage_error():
    r = qd("report", "--facts", str(SNAP / "t4.json"))
    assert r.exit_code == 2 and "--no-smoke" in r.output
