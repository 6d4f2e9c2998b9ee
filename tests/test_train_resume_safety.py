"""`qdoctor train --resume` and `--model` run no code from the directories they are pointed at; resume stays
exact after kill -9 (pre-flight injected, as in test_train_cli)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_support import CPU_FACTS, FAST, PROBES, invoke

import qdoctor

pytestmark = pytest.mark.usefixtures("train_env")

ROOT = str(Path(qdoctor.__file__).resolve().parent.parent)


def child_env(tmp_path) -> dict:
    return dict(
        os.environ,
        QDOCTOR_CACHE_DIR=os.environ["QDOCTOR_CACHE_DIR"],
        HF_HUB_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "hf-modules"),
        PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    )


class Payload:
    """Unpickling this calls open(marker, "w"): the file appearing means a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def stopped_run(out: Path, monkeypatch, after: int = 2) -> None:
    monkeypatch.setenv("QDOCTOR_TEST_STOP_AFTER", str(after))
    assert invoke("--output", str(out), *FAST).exit_code == 130
    monkeypatch.delenv("QDOCTOR_TEST_STOP_AFTER")


@pytest.mark.parametrize("layout", ["older qdoctor", "planted beside the new files"])
def test_resume_refuses_a_planted_pickle_and_never_runs_it(tmp_path, pf, monkeypatch, layout):
    import torch

    out, marker = tmp_path / "run", tmp_path / "PWNED"
    stopped_run(out, monkeypatch)
    ck = out / "checkpoint"
    # the payload is real: loaded the way qdoctor used to load state.pt, it runs
    probe = tmp_path / "probe.pt"
    torch.save({"optimizer": Payload(tmp_path / "ran")}, probe)
    torch.load(probe, weights_only=False, map_location="cpu")
    assert (tmp_path / "ran").exists()
    torch.save({"optimizer": Payload(marker), "state": {"step": 2}}, ck / "state.pt")
    if layout == "older qdoctor":  # what older qdoctor left: state.pt and a state.json of the loop position
        (ck / "state.safetensors").unlink()
        (ck / "state.json").write_text(json.dumps({"step": 2, "micro_batch": 8, "tokens": 1, "elapsed_s": 1}))
    run_json = (out / "run.json").read_bytes()
    loads = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a))

    r = invoke("--output", str(out), "--resume", *FAST)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.stderr
    assert "older qdoctor" in lines[0] and "state.pt" in lines[0] and "cannot be resumed safely" in lines[0]
    assert "start a fresh --output" in lines[0]
    assert not marker.exists() and loads == []
    assert (out / "run.json").read_bytes() == run_json  # refused before anything was written


def test_resume_refuses_an_edited_checkpoint_in_one_line(tmp_path, pf, monkeypatch):
    out = tmp_path / "run"
    stopped_run(out, monkeypatch)
    f = out / "checkpoint" / "state.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    r = invoke("--output", str(out), "--resume", *FAST)
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "state.safetensors does not match its sha256" in r.stderr


KILL_DURING_THIRD_SAVE = """
import os, signal, sys
from qdoctor.train import checkpoint, cli, preflight
state = preflight.Preflight({facts!r}, [], {probes!r}, fingerprint="test-fp")
preflight.run = lambda device, **kw: state
calls = []
real = checkpoint.replace_dir
def replace_dir(tmp, final):
    calls.append(tmp)
    if len(calls) == 3:  # the step-6 checkpoint is written to its temp dir but not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    real(tmp, final)
checkpoint.replace_dir = replace_dir
cli.train.main({args!r})
"""


def test_kill_9_while_saving_then_resume_equals_uninterrupted(tmp_path, pf):
    import torch
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke("--output", str(a), *FAST).exit_code == 0
    code = KILL_DURING_THIRD_SAVE.format(facts=CPU_FACTS, probes=PROBES, args=["--output", str(b), *FAST])
    p = subprocess.run([sys.executable, "-c", code], env=child_env(tmp_path), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert json.loads((b / "checkpoint" / "state.json").read_text())["step"] == 4
    assert list(b.glob(".checkpoint.tmp-*")) and len((b / "metrics.jsonl").read_text().splitlines()) == 6

    r = invoke("--output", str(b), "--resume", *FAST)
    assert r.exit_code == 0, r.output
    assert "resuming from step 4" in r.stderr and not list(b.glob(".checkpoint.tmp-*"))
    ta = load_file(str(a / "adapter" / "adapter_model.safetensors"))
    tb = load_file(str(b / "adapter" / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    la = [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == lb and len(la) == 6


CUSTOM_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class CustomConfig(LlamaConfig):
    model_type = "qdoctor_custom"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
"""


def custom_model(tmp_path) -> tuple[Path, Path]:
    """A local model directory that only loads by running its own custom.py (which leaves a marker)."""
    from qdoctor.train import model as M

    d, marker = tmp_path / "custom-model", tmp_path / "CUSTOM_CODE_RAN"
    d.mkdir()
    cfg = dict(M.embedded_config(), model_type="qdoctor_custom", architectures=["CustomForCausalLM"])
    cfg["auto_map"] = {
        "AutoConfig": "custom.CustomConfig",
        "AutoModelForCausalLM": "custom.CustomForCausalLM",
    }
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "custom.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    # an empty safetensors file: weights are only read past --dry-run
    (d / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(M.assets_dir() / f, d / f)
    return d, marker


@pytest.mark.parametrize("extra", [[], ["--dry-run"]])
def test_a_model_that_needs_its_own_code_is_refused_naming_the_flag(tmp_path, pf, extra):
    d, marker = custom_model(tmp_path)
    out = tmp_path / "run"
    r = invoke("--model", str(d), "--output", str(out), "--max-steps", "1", *extra)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs its own Python code" in lines[0] and "--trust-remote-code" in lines[0]
    assert "qdoctor_custom" in lines[0]
    assert not marker.exists() and not out.exists()


def test_custom_code_reason_follows_transformers_rule():
    from qdoctor.train import model as M

    mapped = {"AutoConfig": "x.Y"}
    assert M.custom_code_reason({"model_type": "qdoctor_custom", "auto_map": mapped})
    assert M.custom_code_reason({"auto_map": mapped})
    assert M.custom_code_reason({"model_type": "llama", "auto_map": mapped}) is None  # transformers' class
    assert M.custom_code_reason({"model_type": "qdoctor_custom"}) is None  # unknown, but no code to run
    # a hub model is only seen by transformers: its advice to pass trust_remote_code=True becomes our flag
    e = ValueError("The repository org/m contains custom code ... Please pass `trust_remote_code=True`.")
    msg = str(M._load_error(M.ModelSource("org/m", None, False), "config", e))
    assert "--trust-remote-code" in msg and "org/m" in msg and "\n" not in msg
    trusted = M.ModelSource("org/m", None, False, trust_remote_code=True)
    assert "cannot load the config" in str(M._load_error(trusted, "config", e))


def test_trust_remote_code_opts_in_and_the_plan_records_it(tmp_path, pf):
    d, marker = custom_model(tmp_path)
    cmd = [sys.executable, "-m", "qdoctor", "train", "--model", str(d), "--dry-run", "--json"]
    cmd += ["--skip-probes", "--trust-remote-code"]
    p = subprocess.run(cmd, env=child_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    plan = json.loads(p.stdout)
    trust = plan["trust_remote_code"]
    assert trust["value"] is True and "--trust-remote-code" in trust["reason"]
    assert marker.exists()  # the model's code ran: the user opted in
    r = invoke("--dry-run", "--json", "--output", str(tmp_path / "x"))
    assert r.exit_code == 0 and json.loads(r.stdout)["trust_remote_code"]["value"] is False

