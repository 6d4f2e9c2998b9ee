"""`qdoctor check` must never import the stack it diagnoses: a broken torch must not break the doctor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

FORBIDDEN = ("torch", "bitsandbytes", "transformers", "peft", "accelerate", "triton")

# Runs the real CLI in-process, then reports which forbidden top-level modules got imported.
WRAPPER = textwrap.dedent("""
    import json, sys
    from qdoctor.cli import main
    code = None
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        code = e.code
    bad = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
    sys.stderr.write("\\n@@NOIMPORT@@" + json.dumps({"code": code, "imported": bad}) + "\\n")
""") % (FORBIDDEN,)


def run_check(tmp_path, *args, pythonpath=None, command="check", stdin=None):
    env = dict(os.environ, QDOCTOR_CACHE_DIR=str(tmp_path / "cache"))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", WRAPPER, command, *args], capture_output=True, text=True,
                          env=env, timeout=120, input=stdin)
    marker = proc.stderr.rfind("@@NOIMPORT@@")
    assert marker >= 0, proc.stderr[-2000:]
    return proc, json.loads(proc.stderr[marker + len("@@NOIMPORT@@"):].strip())


def test_check_imports_none_of_the_stack(tmp_path):
    proc, res = run_check(tmp_path, "--json")
    assert res["imported"] == []
    assert res["code"] in (0, 1), proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["facts"]["torch"]["source"] == "static"


def test_check_diagnoses_a_broken_torch_without_importing_it(tmp_path):
    site = tmp_path / "broken-site"
    for name in ("torch", "bitsandbytes"):
        (site / name).mkdir(parents=True)
        # importing this kills the process
        (site / name / "__init__.py").write_text("import os; os._exit(77)\n")
    (site / "torch" / "version.py").write_text("this is not the version file you are looking for\n")
    proc, res = run_check(tmp_path, "--json", pythonpath=str(site))
    assert res["imported"] == []
    assert res["code"] in (0, 1), proc.stderr[-2000:]
    facts = json.loads(proc.stdout)["facts"]
    assert "version.py" in facts["torch"]["error"]
    assert facts["bitsandbytes"]["installed"] is True and facts["bitsandbytes"]["binaries"] == {}


def test_explain_imports_none_of_the_stack(tmp_path):
    """explain reads the text and this machine's facts: offline, without importing torch."""
    err = "RuntimeError: Configured CUDA binary not found at /x/bitsandbytes/libbitsandbytes_cuda129.so\n"
    proc, res = run_check(tmp_path, "-", command="explain", stdin=err)
    assert res["imported"] == []
    assert res["code"] == 0, proc.stderr[-2000:]
    assert "KF04" in proc.stdout


def test_check_model_imports_none_of_the_stack(tmp_path):
    """check --model sizes the model with train's estimator module, which is pure: still no torch."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"hidden_size": 2048, "intermediate_size": 5632,
                                               "num_hidden_layers": 22, "num_attention_heads": 32,
                                               "num_key_value_heads": 4, "vocab_size": 32000}))
    proc, res = run_check(tmp_path, "--model", str(d))
    assert res["imported"] == []
    assert res["code"] in (0, 1), proc.stderr[-2000:]
    assert "Model fit" in proc.stdout
