"""qdoctor train end to end on CPU with the embedded tiny default (pre-flight injected: independent of
check/smoke, which have their own tests)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_support import FAST, PROBES, invoke

from qdoctor.findings import Finding
from qdoctor.train import loop, preflight

pytestmark = pytest.mark.usefixtures("train_env")


def adapter_tensors(d: Path):
    from safetensors.torch import load_file

    return load_file(str(d / "adapter_model.safetensors"))


def test_default_run_writes_a_loadable_adapter_and_the_loss_falls(tmp_path, pf):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    r = invoke("--output", str(out), "--json", "--max-steps", "12", "--eval-every", "6", "--save-every", "6")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["status"] == "completed" and s["steps"] == 12
    assert s["final_loss"] < s["first_loss"] - 0.3 and s["final_eval_loss"] < s["first_eval_loss"]
    assert s["environment_fingerprint"] == "test-fp" and s["tokens_per_s"] > 0
    assert s["plan"]["quantization"]["value"] == "nf4" and s["peak_memory"]["host_rss_gib"] > 0
    for f in (
        "summary.json",
        "metrics.jsonl",
        "loss.png",
        "plan.json",
        "run.json",
        "adapter/adapter_config.json",
    ):
        assert (out / f).is_file(), f
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 12
    for f in [*out.glob("*.json"), *out.glob("checkpoint/*.json")]:  # strict JSON everywhere
        json.loads(f.read_text(), parse_constant=pytest.fail)
    assert s["data"]["records"] == 600 and s["data"]["dropped"] == 0 and s["skipped_steps"] == 0
    assert s["plan"]["seq_len"]["value"] == 256  # the embedded model's positions, not the default 1024
    assert s["final_loss_note"] == "mean of the last 5 steps"
    t = s["timings"]  # where the wall time went: every part measured, none negative, no more than the wall
    parts = ("startup_s", "load_s", "train_s", "eval_s", "checkpoint_s")
    assert all(t[k] >= 0 for k in (*parts, "other_s", "median_step_s", "host_s_per_step"))
    assert sum(t[k] for k in parts) <= s["wall_time_s"] + 0.001 * len(parts)  # each rounded to 1 ms
    assert t["steps"] == 12 and t["host_s_per_step"] <= t["median_step_s"] and t["eval_s"] > 0
    assert t["load_s"] > 0 and t["startup_s"] > 0 and t["checkpoint_s"] > 0
    assert "step 12/12" in r.stderr and "tok/s" in r.stderr and "ETA" in r.stderr
    assert not list(out.glob(".*tmp*"))
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"])
    m = PeftModel.from_pretrained(base, str(out / "adapter"))
    saved = adapter_tensors(out / "adapter")
    live = {k: v for k, v in m.state_dict().items() if "lora_" in k}
    assert len(saved) == len(live) > 0
    assert any(float(v.abs().sum()) > 0 for k, v in saved.items() if "lora_B" in k)  # it trained
    with torch.no_grad():
        ids = torch.tensor([[3, 203, 275, 266]])
        tuned = m(ids).logits
        with m.disable_adapter():
            plain = m(ids).logits
    assert not torch.allclose(tuned, plain)  # the loaded adapter changes the model's output


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, pf, monkeypatch):
    import shlex

    import torch

    from qdoctor.train.model import assets_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_bytes((assets_dir() / "instructions.jsonl").read_bytes())
    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke("--output", str(a), "--data", str(tmp_path / "d.jsonl"), *FAST).exit_code == 0
    monkeypatch.setenv("QDOCTOR_TEST_STOP_AFTER", "3")  # same code path as Ctrl-C after step 3
    r = invoke("--output", "b", "--data", "d.jsonl", *FAST)  # relative paths this time
    assert r.exit_code == 130 and "--resume" in r.stderr
    assert json.loads((b / "checkpoint" / "state.json").read_text())["step"] == 3
    monkeypatch.delenv("QDOCTOR_TEST_STOP_AFTER")
    hint = shlex.split(r.stderr.split("continue with:")[1].strip().splitlines()[0])
    assert hint[:2] == ["qdoctor", "train"] and str(tmp_path / "d.jsonl") in hint  # absolute now: same data
    r = invoke(*hint[2:])  # the printed command, pasted as is
    assert r.exit_code == 0, r.output
    assert "resuming from step 3" in r.stderr
    assert "time: start-up" in r.stdout and "of it on the host" in r.stdout  # the text summary's last line
    assert json.loads((b / "summary.json").read_text())["timings"]["steps"] == 3  # this process's steps only
    ta, tb = adapter_tensors(a / "adapter"), adapter_tensors(b / "adapter")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-6), k
    la = [json.loads(x)["loss"] for x in (a / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-5)
    # the completed run is extended by a larger --max-steps, with a new micro-batch (honoured)
    i = hint.index("--max-steps")
    r = invoke(*hint[2 : i + 1], "8", *hint[i + 2 :], "--micro-batch", "2")
    assert r.exit_code == 0, r.output
    assert "micro-batch 2 (the checkpoint ran 8)" in r.stderr
    mb = [json.loads(x)["micro_batch"] for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert mb == [8] * 6 + [2, 2]
    assert json.loads((b / "run.json").read_text())["max_steps"] == 8


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, pf):
    r = invoke("--output", str(tmp_path / "x"), "--dry-run", "--json")
    assert r.exit_code == 0
    p = json.loads(r.stdout)
    assert p["device"]["value"] == "cpu" and p["memory"]["estimate"]["total_gib"] > 0
    assert not (tmp_path / "x").exists()
    r = invoke("--output", str(tmp_path / "x"), "--dry-run")
    assert "Memory estimate" in r.stdout and "calibrated on" in r.stdout


def test_error_finding_refuses_and_force_overrides(tmp_path, pf):
    pf.findings = [
        Finding(
            "QD301",
            "error",
            "bitsandbytes has no kernels for sm_70",
            ["x"],
            "pip install 'bitsandbytes==0.45.5'",
            "bitsandbytes",
        )
    ]
    r = invoke("--output", str(tmp_path / "x"), "--dry-run")
    assert r.exit_code == 1 and "QD301" in r.stderr and "pip install" in r.stderr
    assert invoke("--output", str(tmp_path / "x"), "--dry-run", "--force").exit_code == 0


def test_a_routed_probe_failure_warns_and_the_plan_falls_back(tmp_path, pf):
    pf.probes = [dict(p, status="fail", reason="update_rel_err too high") if p["probe"] == "optim8bit" else p
                 for p in PROBES]
    pf.findings = preflight._probe_findings(pf.probes)
    r = invoke("--output", str(tmp_path / "x"), "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert "warning: QD761" in r.stderr and "falls back" in r.stderr
    assert "adamw_8bit" not in r.stdout.split("optimizer", 1)[1].splitlines()[0]  # 8-bit is out of the plan


def test_nan_loss_stops_with_a_diagnosis(tmp_path, pf, monkeypatch):
    real = loop.forward_loss
    calls = {"n": 0}

    def poisoned(run, batch, n):
        calls["n"] += 1
        loss = real(run, batch, n)
        return loss * float("nan") if run.step >= 2 and run.model.training else loss

    monkeypatch.setattr(loop, "forward_loss", poisoned)
    r = invoke("--output", str(tmp_path / "n"), *FAST)
    assert r.exit_code == 1
    assert "QD802" in r.stderr and "NaN at step 3" in r.stderr and "lower the learning rate" in r.stderr
    s = json.loads((tmp_path / "n" / "summary.json").read_text())
    assert s["status"] == "stopped" and s["steps"] == 2


BAD = {
    "missing model": (["--model", "/nonexistent/model"], "does not exist"),
    "offline hub id": (["--model", "someorg/somemodel"], "HF_HUB_OFFLINE"),
    "bad target": (["--target-modules", "q_proj,qkv"], "down_proj"),
    "bad config value": (["--lora-r", "0"], "lora_r"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, pf, case):
    args, needle = BAD[case]
    out = tmp_path / "o"
    r = invoke("--output", str(out), *args)
    assert r.exit_code == 2 and needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not out.exists()


def test_bad_datasets(tmp_path, pf):
    cases = {
        "missing.jsonl": ("", "does not exist"),
        "empty.jsonl": ("\n\n", "empty"),
        "broken.jsonl": ('{"text": "a"}\n{"text": "b"\n', "line 2"),
    }
    for name, (content, needle) in cases.items():
        path = tmp_path / name
        if content:
            path.write_text(content)
        r = invoke("--output", str(tmp_path / "o"), "--data", str(path))
        assert r.exit_code == 2 and needle in r.stderr, (name, r.stderr)
        assert not (tmp_path / "o").exists()


def test_bad_config_key_in_toml(tmp_path, pf):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nmax_steps = 3\nlearnin_rate = 1\n")
    r = invoke("--config", str(f), "--output", str(tmp_path / "o"))
    assert r.exit_code == 2 and "learnin_rate" in r.stderr


def test_output_dir_holding_another_run_is_refused(tmp_path, pf):
    out = tmp_path / "o"
    assert invoke("--output", str(out), "--max-steps", "1", "--batch-size", "4").exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    r = invoke("--output", str(out), "--max-steps", "1", "--batch-size", "4")
    assert r.exit_code == 2 and "--resume" in r.stderr
    r = invoke("--output", str(out), "--max-steps", "1", "--batch-size", "4", "--resume", "--seed", "5")
    assert r.exit_code == 2 and "different run" in r.stderr and "seed" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = invoke("--output", str(other), "--max-steps", "1")
    assert r.exit_code == 2 and "holds no qdoctor run" in r.stderr


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    """SIGTERM (CI runners, schedulers, `docker stop`) as Ctrl-C; SIGINT goes through the same handler
    (test_train_guards: test_sigint_and_sigterm_save_a_checkpoint_and_stop)."""
    out = tmp_path / "sig"
    env = dict(os.environ, QDOCTOR_CACHE_DIR=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qdoctor",
            "train",
            "--output",
            str(out),
            "--skip-probes",
            "--max-steps",
            "100000",
            "--save-every",
            "100000",
            "--batch-size",
            "4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (
            (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2
        ):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr and "interrupted (SIGTERM)" in stderr and "checkpoint saved" in stderr
    assert f"--output {out} --resume" in stderr
    st = json.loads((out / "checkpoint" / "state.json").read_text())
    assert st["step"] >= 2 and (out / "checkpoint" / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert not list(out.glob(".checkpoint.tmp-*"))


@pytest.fixture
def no_preflight(monkeypatch):
    """For refusals that must come before pre-flight (which takes ~10-25 s on a real machine)."""

    def boom(*a, **kw):
        raise AssertionError("pre-flight ran before the input was refused")

    monkeypatch.setattr(preflight, "run", boom)


def test_refusals_come_before_preflight_and_write_nothing(tmp_path, no_preflight):
    from qdoctor.train import rundir

    out = tmp_path / "o"
    done = tmp_path / "done"
    (done / "checkpoint").mkdir(parents=True)
    (done / "run.json").write_text('{"identity": {}}')
    (done / "checkpoint" / "state.json").write_text('{"step": 5}')
    busy = tmp_path / "busy"
    lock = rundir.Lock(busy)
    cases = [
        (["--micro-batch", "32", "--max-steps", "3"], out, "micro_batch 32 is larger than batch_size 16"),
        (["--micro-batch", "3", "--batch-size", "8"], out, "2 sequences of every step would be skipped"),
        (["--seq-len", "4096", "--packing"], out, "max_position_embeddings 256"),
        (["--resume"], tmp_path / "typo", "does not exist"),
        (["--resume", "--max-steps", "3"], done, "below the 5 steps"),
        ([], busy, f"in use by another qdoctor train (pid {os.getpid()})"),
        (["--resume", "--max-steps", "9"], done, "holds a different run (differs in batch_size, data_sha256"),
    ]
    try:
        for args, output, needle in cases:
            r = invoke("--output", str(output), *args)
            assert r.exit_code == 2 and needle in r.stderr, (args, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1
    finally:
        lock.release()
    assert not out.exists() and not (tmp_path / "typo").exists()
    assert sorted(p.name for p in busy.iterdir()) == [".qdoctor.lock"]


def test_model_and_disk_errors_are_exit_2_and_a_retry_is_not_refused(tmp_path, pf, monkeypatch):
    import transformers

    from qdoctor.train import checkpoint

    out = tmp_path / "o"

    def corrupt(*a, **kw):
        raise OSError("Unable to load weights from model.safetensors: header too large")

    with monkeypatch.context() as m:
        m.setattr(transformers.AutoModelForCausalLM, "from_pretrained", corrupt)
        r = invoke("--output", str(out), "--max-steps", "3", "--batch-size", "4", "--save-every", "1")
    assert r.exit_code == 2 and "cannot load the weights" in r.stderr and "header too large" in r.stderr
    assert "Traceback" not in r.output and not out.exists()  # nothing written: the retry is not refused
    real, calls = checkpoint.save, []

    def disk_fills(*a, **kw):  # what torch.save raised on a full tmpfs here
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 275520 vs 275472")
        return real(*a, **kw)

    monkeypatch.setattr(checkpoint, "save", disk_fills)
    r = invoke("--output", str(out), "--max-steps", "3", "--batch-size", "4", "--save-every", "1")
    assert r.exit_code == 2, r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("qdoctor: error: cannot write to") and "checkpoint of step 1 is intact" in last
    assert last.endswith("--resume") and "internal error" not in r.stderr

