"""The GitHub Action (action.yml) executed here, step by step, as the runner would: its composite `run:`
steps in bash with inputs and `${{ }}` expressions substituted, GITHUB_OUTPUT / GITHUB_STEP_SUMMARY files,
`if:` conditions, and the artifact step recorded. The example workflow drives it too, and the plain-shell
example for other CI systems runs as written."""

from __future__ import annotations

import glob
import json
import os
import re
import stat
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="the test extra installs pyyaml")

ROOT = Path(__file__).resolve().parent.parent
ACTION = ROOT / "action.yml"
SNAP = ROOT / "tests" / "snapshots"


def fake_python(tmp: Path) -> tuple[Path, Path]:
    """An interpreter that records `-m pip ...` instead of installing, and is this Python otherwise."""
    log = tmp / "pip.log"
    exe = tmp / "bin" / "python"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/bash\n"
                   f'if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$@" >> "{log}"; exit 0; fi\n'
                   f'exec "{sys.executable}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe, log


class Run:
    def __init__(self):
        self.outputs: dict[str, dict] = {}
        self.logs: dict[str, str] = {}
        self.artifacts: list[dict] = []
        self.failed = False
        self.rc: int | None = None


def substitute(text: str, ctx: dict) -> str:
    def value(m):
        expr = m.group(1).strip()
        parts = expr.split(".")
        if parts[0] == "inputs":
            return str(ctx["inputs"][".".join(parts[1:])])
        if parts[0] == "steps":
            return str(ctx["steps"].get(parts[1], {}).get(parts[3], ""))
        if expr == "github.action_path":
            return str(ROOT)
        if expr == "runner.temp":
            return ctx["runner_temp"]
        raise AssertionError(f"expression the test runner does not know: {expr}")

    return re.sub(r"\$\{\{(.*?)\}\}", value, text)


def condition(expr: str | None, ctx: dict, failed: bool) -> bool:
    if expr is None:
        return not failed
    expr = expr.strip()
    if expr == "always()":
        return True
    m = re.fullmatch(r"inputs\.([\w-]+) == '([^']*)'", expr)
    assert m, f"if: the test runner does not know: {expr}"
    return not failed and str(ctx["inputs"][m.group(1)]) == m.group(2)


def run_action(tmp: Path, inputs: dict, env: dict | None = None) -> Run:
    spec = yaml.safe_load(ACTION.read_text())
    assert spec["runs"]["using"] == "composite"
    declared = spec["inputs"]
    unknown = set(inputs) - set(declared)
    assert not unknown, f"inputs the action does not declare: {unknown}"
    ctx = {"inputs": {k: str(inputs.get(k, v.get("default", ""))) for k, v in declared.items()},
           "steps": {}, "runner_temp": str(tmp / "runner-temp")}
    Path(ctx["runner_temp"]).mkdir(parents=True, exist_ok=True)
    summary = tmp / "summary.md"
    summary.touch()
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    res = Run()
    for i, step in enumerate(spec["runs"]["steps"]):
        if not condition(step.get("if"), ctx, res.failed):
            continue
        if "uses" in step:
            assert step["uses"].startswith("actions/upload-artifact@")
            w = {k: substitute(str(v), ctx) for k, v in step["with"].items()}
            res.artifacts.append({"name": w["name"], "files": sorted(glob.glob(w["path"]))})
            continue
        assert step["shell"] == "bash"
        script = tmp / f"step{i}.sh"
        script.write_text(substitute(step["run"], ctx))
        out_file = tmp / f"output{i}"
        out_file.touch()
        step_env = {**os.environ, **(env or {}), "GITHUB_STEP_SUMMARY": str(summary),
                    "GITHUB_OUTPUT": str(out_file), "PYTHONPATH": str(ROOT)}
        step_env.pop("GITHUB_ACTIONS", None)
        step_env.update({k: substitute(str(v), ctx) for k, v in (step.get("env") or {}).items()})
        # GitHub runs `shell: bash` as: bash --noprofile --norc -eo pipefail {0}
        p = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=work,
                           env=step_env, capture_output=True, text=True, timeout=600)
        res.logs[step.get("id") or step["name"]] = p.stdout + p.stderr
        outs = dict(ln.split("=", 1) for ln in out_file.read_text().splitlines() if "=" in ln)
        if step.get("id"):
            ctx["steps"][step["id"]] = outs
        if p.returncode != 0:
            res.failed = True
            if step.get("id") == "gate":
                res.rc = p.returncode
            else:
                raise AssertionError(f"step {step['name']} failed ({p.returncode}): {p.stdout}{p.stderr}")
        elif step.get("id") == "gate":
            res.rc = 0
    res.outputs = ctx["steps"]
    res.summary = summary.read_text()
    return res


@pytest.fixture
def py(tmp_path):
    return fake_python(tmp_path)


def test_action_on_this_machine_passes_and_reports(tmp_path, py):
    exe, log = py
    r = run_action(tmp_path, {"python": str(exe)})
    assert r.rc == 0 and r.outputs["gate"]["exit-code"] == "0"
    assert "### qdoctor check" in r.summary and "Verdict: READY" in r.summary
    # the core install only, from the action's own checkout, into the interpreter under test
    assert log.read_text().split() == ["-m", "pip", "install", "--disable-pip-version-check", "--quiet",
                                       str(ROOT)]
    files = r.artifacts[0]["files"]
    assert r.artifacts[0]["name"] == "qdoctor" and [Path(f).name for f in files] == ["qdoctor-check.json"]
    doc = json.loads(Path(files[0]).read_text())
    assert doc["schema"] == "qdoctor.report/1" and doc["verdict"] == "ok"
    assert "smoke" not in r.outputs  # not asked for


def test_action_fails_the_step_when_not_ready(tmp_path, py):
    exe, _ = py
    r = run_action(tmp_path, {"python": str(exe), "install": "false",
                              "args": f"--facts {SNAP / 'v100-cu130.json'}"})
    assert r.rc == 1 and r.outputs["check"]["exit-code"] == "1"
    assert "::error title=QD303 " in r.logs["check"] and "::error title=qdoctor::not ready" in r.logs["gate"]
    assert "Verdict: NOT READY" in r.summary and "[QD303](" in r.summary
    doc = json.loads(Path(r.artifacts[0]["files"][0]).read_text())  # uploaded even though the step fails
    assert doc["verdict"] == "error"


def test_action_select_ignore_and_strict(tmp_path, py):
    exe, _ = py
    v100 = f"--facts {SNAP / 'v100-cu130.json'}"
    assert run_action(tmp_path / "a", {"python": str(exe), "install": "false", "args": v100,
                                       "ignore": "QD303,QD404"}).rc == 0
    assert run_action(tmp_path / "b", {"python": str(exe), "install": "false", "args": v100,
                                       "ignore": "QD303,QD404", "strict": "true"}).rc == 1  # QD203 warning
    assert run_action(tmp_path / "c", {"python": str(exe), "install": "false", "args": v100,
                                       "select": "QD2"}).rc == 0


def test_action_bad_input_is_exit_2_and_stack_extra_is_opt_in(tmp_path, py):
    exe, log = py
    r = run_action(tmp_path, {"python": str(exe), "stack": "true", "args": "--facts /nonexistent/x.json"})
    assert r.rc == 2 and "used wrongly" in r.logs["gate"]
    assert log.read_text().split()[-1] == f"{ROOT}[train]"


def _example_action_step():
    wf = yaml.safe_load((ROOT / "examples" / "github-workflow.yml").read_text())
    jobs = wf["jobs"]
    gate_job, step = next((name, s) for name, job in jobs.items() for s in job["steps"]
                          if str(s.get("uses", "")).endswith("/qdoctor@main") or s.get("uses") == "./")
    return wf, jobs, gate_job, step


def test_example_workflow_gates_training_on_the_action(tmp_path, py):
    wf, jobs, gate_job, step = _example_action_step()
    assert True in wf or "on" in wf  # PyYAML reads the `on:` key as True
    train = [name for name, job in jobs.items() if job.get("needs") in (gate_job, [gate_job])]
    assert train == ["train"]
    exe, _ = py
    inputs = {**step["with"], "python": str(exe), "smoke-args": "--probe device --timeout 300"}
    r = run_action(tmp_path, inputs)
    assert step["with"]["smoke"] == "true" and r.outputs["smoke"]["exit-code"] == "0"
    assert r.rc == 0 and "#### probes" in r.summary and "| device | pass |" in r.summary
    names = sorted(Path(f).name for f in r.artifacts[0]["files"])
    assert names == ["qdoctor-check.json", "qdoctor-smoke.json"]


def test_plain_shell_example_writes_junit_and_keeps_the_exit_code(tmp_path, py):
    exe, log = py
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": str(exe), "OUT": str(tmp_path / "out"),
           "IGNORE": "QD607"}
    p = subprocess.run(["bash", str(ROOT / "examples" / "preflight.sh")], env=env, capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "install --quiet qdoctor" in log.read_text()  # core package, no extra
    suite = ET.parse(tmp_path / "out" / "qdoctor-check.xml").getroot().find("testsuite")
    assert suite.get("failures") == "0" and int(suite.get("tests")) >= 5
    assert json.loads((tmp_path / "out" / "qdoctor-check.json").read_text())["verdict"] == "ok"
