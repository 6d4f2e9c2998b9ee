"""QD613 through `check`: a warning that leaves the verdict READY, silent on snapshots recorded before the
bytecode facts existed, and fired by a real `check` on a fake site-packages tree."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from cli_support import qd
from test_rules_snapshots import load, run

from qdoctor.facts.schema import normalize

SNAP = Path(__file__).parent / "snapshots"


def test_a_warning_keeps_the_verdict_ready():
    r = qd("check", "--facts", str(SNAP / "h200-bytecode-uncached.json"))
    assert r.exit_code == 0, r.output
    assert "Verdict: READY (1 warning)" in r.output and "QD613" in r.output
    assert qd("check", "--facts", str(SNAP / "h200-bytecode-uncached.json"), "--strict").exit_code == 1
    assert qd("check", "--facts", str(SNAP / "h200-bytecode-uncached.json"), "--ignore", "QD613",
              "--strict").exit_code == 0


def test_snapshots_without_the_bytecode_section_still_load_and_stay_silent():
    raw = json.loads((SNAP / "h200-cu130.json").read_text())
    assert "bytecode" not in raw["facts"]
    facts = normalize(raw)
    assert facts["bytecode"] == {}
    assert not [f for f in run(facts) if f.code == "QD613"]
    # the same machine with the measured section: only the section differs, and the rule fires
    measured = load("h200-bytecode-uncached")
    assert {k: v for k, v in measured.items() if k != "bytecode"} == {k: v for k, v in facts.items()
                                                                       if k != "bytecode"}
    assert [f.code for f in run(measured) if f.code == "QD613"] == ["QD613"]


def test_check_on_a_tree_without_bytecode(tmp_path, monkeypatch):
    """The real collector and rule together: torch without .pyc and PYTHONDONTWRITEBYTECODE set fires; the
    same tree compiled by the finding's own fix command does not."""
    import subprocess

    site = tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    for m in ("__init__", "functional"):
        (site / "torch" / f"{m}.py").write_text("X = 1\n")
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path / "cache"))
    from qdoctor.facts import collect

    facts = normalize(json.loads(json.dumps(collect(paths=[str(site)], use_cache=False))))
    assert facts["collectors"]["bytecode"]["ok"]
    fs = [f for f in run(facts) if f.code == "QD613"]
    assert len(fs) == 1 and fs[0].severity == "warning", fs
    fix = fs[0].fix.splitlines()[0].split("  #")[0]
    assert fix.endswith(f"-m compileall -q -j 0 {site / 'torch'}"), fix
    subprocess.run([sys.executable, *fix.split()[1:]], check=True, env=dict(os.environ), timeout=120)
    facts = normalize(json.loads(json.dumps(collect(paths=[str(site)], use_cache=False))))
    assert facts["bytecode"]["packages"]["torch"]["cached"] == 2
    assert not [f for f in run(facts) if f.code == "QD613"]


def test_an_uncached_dependency_of_the_stack_fires_with_its_own_fix(tmp_path, monkeypatch):
    """torch's own bytecode is cached but sympy's (which `import torch` loads) is not: the finding names
    sympy alone, and its fix compiles sympy's directory."""
    import subprocess

    site = tmp_path / "site"
    for name in ("torch", "sympy"):
        (site / name).mkdir(parents=True)
        for m in ("__init__", "core"):
            (site / name / f"{m}.py").write_text("X = 1\n")
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONPYCACHEPREFIX="")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(site / "torch")], check=True, env=env,
                   timeout=120)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path / "cache"))
    from qdoctor.facts import collect

    facts = normalize(json.loads(json.dumps(collect(paths=[str(site)], use_cache=False))))
    assert facts["bytecode"]["packages"]["torch"]["cached"] == 2
    assert facts["bytecode"]["packages"]["sympy"]["cached"] == 0
    fs = [f for f in run(facts) if f.code == "QD613"]
    assert len(fs) == 1 and fs[0].title.startswith("sympy: bytecode not cached"), fs
    assert fs[0].fix.splitlines()[0].split("  #")[0].endswith(f"-m compileall -q -j 0 {site / 'sympy'}")
