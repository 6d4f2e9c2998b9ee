"""smoke, for real: the probes run on this machine's CPU (bitsandbytes >= 0.46 has CPU 4-bit kernels).

One clean run and one fault-injected CLI run are shared by the tests (module-scoped), to keep the
suite short. GPU-only parts are @pytest.mark.gpu; their logic is also covered in test_smoke_units.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import psutil
import pytest

from qdoctor.smoke import PROBES, run_probes


def _orphans(mark: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if mark in " ".join(p.info["cmdline"] or []):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.fixture(scope="module")
def clean_run():
    return {r.probe: r for r in run_probes(None, "cpu", 120)}


@pytest.fixture(scope="module")
def injected_cli():
    mark = f"qdoctor-test-sleeper-{uuid.uuid4().hex}"
    env = dict(os.environ, QDOCTOR_SMOKE_INJECT="nf4=abort,lora_step=hang,matmul4bit=wrong",
               QDOCTOR_SMOKE_MARK=mark)
    # 3 s: the hang is cut at the timeout; each real probe takes under 1 s here once the fork server
    # has imported the stack (which has its own 30 s allowance)
    cmd = [sys.executable, "-m", "qdoctor", "smoke", "--device", "cpu", "--timeout", "3", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    return p, json.loads(p.stdout), mark


def test_every_probe_passes_on_cpu(clean_run):
    assert list(clean_run) == list(PROBES)
    bad = {n: (r.status, r.reason, r.error) for n, r in clean_run.items() if r.status != "pass"}
    assert not bad


def test_native_library_really_loaded(clean_run):
    m = clean_run["imports"].measurements
    assert m["bnb_native_loaded"] and m["bnb_library_class"] != "ErrorHandlerMockBNBNativeLibrary"
    assert all(m[f"{d}_ok"] for d in ("torch", "bitsandbytes", "transformers", "peft"))


def test_lora_step_invariants_hold(clean_run):
    m = clean_run["lora_step"].measurements
    assert m["grads_only_lora"] and m["grads_reach_all_trainable"] and m["base_4bit_unchanged"]
    assert m["loss_last"] < m["loss_first"] and m["checkpoint_use_reentrant"] is False
    assert m["four_bit_layers"] == 14  # 2 layers x (q, k, v, o, gate, up, down)


def test_results_carry_time_and_memory(clean_run):
    for r in clean_run.values():
        assert r.duration_s > 0 and r.peak_memory_mib and r.peak_memory_mib > 50
        assert r.measurements.get("isolation") in ("fork", "spawn")


def test_paged_optimizer_skipped_on_cpu_with_reason(clean_run):
    assert clean_run["optim8bit"].measurements["paged"].startswith("skipped")


def test_injected_faults_get_the_right_status(injected_cli):
    p, doc, _ = injected_cli
    assert p.returncode == 1
    st = {r["probe"]: r["status"] for r in doc["probes"]}
    assert st["nf4"] == "crash" and st["lora_step"] == "timeout" and st["matmul4bit"] == "fail"
    # the other probes still ran, and passed
    assert all(st[n] == "pass" for n in ("imports", "device", "optim8bit", "save_load", "precision"))


def test_injected_faults_become_findings(injected_cli):
    _, doc, _ = injected_cli
    codes = {f["code"]: f for f in doc["findings"]}
    assert {"QD732", "QD741", "QD753"} <= set(codes)
    assert all(codes[c]["severity"] == "error" for c in ("QD732", "QD741", "QD753"))
    assert "SIGABRT" in codes["QD732"]["title"]
    assert doc["schema"] == "qdoctor.report/1" and doc["facts"]["schema"].startswith("qdoctor.facts/")
    nf4 = next(r for r in doc["probes"] if r["probe"] == "nf4")
    assert "injected abort" in nf4["error"]


def test_no_orphans_after_timeout(injected_cli):
    _, _, mark = injected_cli
    assert _orphans(mark) == []


def test_spawn_isolation_kills_a_hung_probe_and_its_child():
    mark = f"qdoctor-test-sleeper-{uuid.uuid4().hex}"
    os.environ["QDOCTOR_SMOKE_MARK"] = mark
    try:
        rs = run_probes(["nf4", "precision"], "cpu", 3, isolation="spawn", jobs=2,
                        inject={"nf4": "abort", "precision": "hang"})  # injected before torch imports
    finally:
        del os.environ["QDOCTOR_SMOKE_MARK"]
    st = {r.probe: r.status for r in rs}
    assert st == {"nf4": "crash", "precision": "timeout"}
    assert all(r.measurements.get("isolation") == "spawn" for r in rs)
    assert _orphans(mark) == []


def test_fork_server_death_is_a_crash_and_the_rest_still_runs():
    rs = {r.probe: r for r in run_probes(["nf4", "precision"], "cpu", 60, inject={"nf4": "killserver"})}
    assert rs["nf4"].status == "crash" and "fork server" in rs["nf4"].reason
    assert rs["precision"].status == "pass" and rs["precision"].measurements["isolation"] == "spawn"


def test_usage_errors_exit_2_in_one_line():
    for args in (["--probe", "nf5"], ["--device", "cuda:7"], ["--device", "tpu"]):
        p = subprocess.run([sys.executable, "-m", "qdoctor", "smoke", *args], capture_output=True, text=True,
                           timeout=60)
        assert p.returncode == 2, (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def _has_gpu() -> bool:
    from qdoctor.devices import cuda_usable
    from qdoctor.facts import collect

    return cuda_usable(collect(deep=False, timeout=30))


@pytest.mark.gpu
def test_gpu_device_and_paged_optimizer():
    if not _has_gpu():
        pytest.skip("no usable NVIDIA GPU here")
    rs = {r.probe: r for r in run_probes(["imports", "device", "optim8bit"], "cuda:0", 120)}
    assert rs["imports"].measurements["bnb_cuda_library"] is True
    assert rs["device"].status == "pass" and rs["device"].measurements["devices"]
    m = rs["optim8bit"].measurements
    assert rs["optim8bit"].status == "pass" and m["paged"] == "ran" and m["paged_state_is_managed"]
