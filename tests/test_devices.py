"""qdoctor.devices: CUDA_VISIBLE_DEVICES, the CUDA-ordinal -> NVML-GPU mapping and the default device,
as smoke, train pre-flight and the plan use them (hidden, reordered, UUID-selected and mixed GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qdoctor import devices
from qdoctor.facts.schema import normalize
from qdoctor.train import config as C
from qdoctor.train import memory, preflight
from qdoctor.train.plan import choose_device, make_plan

SNAP = Path(__file__).parent / "snapshots"
T4 = {"index": 0, "name": "Tesla T4", "uuid": "GPU-aaaa1111", "compute_capability": "7.5",
      "memory_total_mib": 15360, "memory_free_mib": 15000}
A100 = {"index": 1, "name": "NVIDIA A100-SXM4-80GB", "uuid": "GPU-bbbb2222", "compute_capability": "8.0",
        "memory_total_mib": 81920, "memory_free_mib": 81000}
PASS = [{"probe": n, "status": "pass"} for n in preflight.GPU_PROBES]


def facts(gpus, cvd=None, order=None, **torch):
    return {"platform": {"memory_total_mib": 64000},
            "nvidia": {"gpus": [dict(g) for g in gpus]},
            "env": {"CUDA_VISIBLE_DEVICES": cvd, "CUDA_DEVICE_ORDER": order},
            "torch": {"version": "2.11.0+cu130", "cuda": "13.0", **torch},
            "bitsandbytes": {"installed": True, "loads": True}}


def plan(f, probes=PASS, **cfg):
    return make_plan(C.build(None, cfg), f, probes, shape=memory.Shape(**memory.SHAPE_1B), model_name="m",
                     embedded=False, n_train=100, max_len=256)


def snapshot(name):
    return normalize(json.loads((SNAP / name).read_text()))


# ---------------------------------------------------------------- the mapping

def test_reordered_list_maps_ordinals_in_the_order_given():
    gpus = [dict(T4, index=i, name=f"g{i}", uuid=f"GPU-{i}{i}{i}") for i in range(4)]
    f = facts(gpus, cvd="3,1")
    assert [g["index"] for g in devices.visible(f).gpus] == [3, 1]
    assert devices.gpu_for(f, "cuda:0")["index"] == 3 and devices.gpu_for(f, "cuda:1")["index"] == 1
    assert devices.gpu_for(f, "cuda:2") is None and devices.count(f) == 2
    with pytest.raises(devices.DeviceError, match="no such device"):
        devices.parse_device("cuda:2", f)


def test_uuid_and_uuid_prefix_select_gpus():
    f = facts([T4, A100], cvd="GPU-bbbb,GPU-aaaa1111")
    assert [g["name"] for g in devices.visible(f).gpus] == [A100["name"], T4["name"]]
    # an ambiguous prefix names no device, and ends the list there
    assert devices.visible(facts([T4, A100], cvd="GPU-,1")).gpus == ()


def test_invalid_entry_truncates_and_empty_hides_all():
    f = facts([T4, A100], cvd="1,5,0")
    assert [g["index"] for g in devices.visible(f).gpus] == [1]
    assert devices.count(facts([T4, A100], cvd="")) == 0


def test_mig_entries_are_not_mapped_but_said():
    v = devices.visible(facts([T4, A100], cvd="MIG-0a1b2c3d"))
    assert not v.known and len(v.gpus) == 2 and "MIG" in v.note


def test_torch_runtime_names_decide_the_order_of_mixed_gpus():
    # CUDA's default FASTEST_FIRST order puts the A100 first; torch (--deep) reported it so
    rt = [{"index": 0, "name": A100["name"]}, {"index": 1, "name": T4["name"]}]
    f = facts([T4, A100], devices=rt, device_count=2, cuda_available=True)
    assert devices.gpu_for(f, "cuda:0")["index"] == 1 and devices.visible(f).note is None
    # without runtime names: NVML order, and the plan's reason says what was assumed
    v = devices.visible(facts([T4, A100]))
    assert v.gpus[0]["index"] == 0 and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in v.note
    assert devices.visible(facts([T4, A100], order="PCI_BUS_ID")).note is None


# ---------------------------------------------------------------- the plan (issue 8, bug 2)

def test_plan_reads_cuda_ordinal_as_the_visible_gpu_not_the_nvml_index():
    """T4 at NVML 0, A100 at NVML 1, CUDA_VISIBLE_DEVICES=1: cuda:0 is the A100."""
    p = plan(facts([T4, A100], cvd="1"))
    assert p.device.value == "cuda:0"
    assert "GPU 1 (NVIDIA A100-SXM4-80GB)" in p.device.reason
    assert p.dtype.value == "bf16" and "sm_80" in p.dtype.reason
    assert round(p.memory.budget_gib, 2) == round(81000 / 1024 * 0.85, 2)
    assert "A100" in p.memory.budget
    # and the user's own --device cuda:0 means the same GPU
    p = plan(facts([T4, A100], cvd="1"), device="cuda")
    assert p.device.value == "cuda:0" and p.dtype.value == "bf16" and "A100" in p.device.reason


def test_plan_on_the_t4_alone_is_fp16():
    p = plan(facts([T4, A100], cvd="0"))
    assert p.dtype.value == "fp16" and round(p.memory.budget_gib, 2) == round(15000 / 1024 * 0.85, 2)


def test_hidden_gpus_plan_for_the_cpu_and_say_why():
    c = choose_device(C.build(None, {}), facts([T4, A100], cvd=""), [])
    assert c.value == "cpu" and "CUDA_VISIBLE_DEVICES=''" in c.reason


# ---------------------------------------------------------------- pre-flight (issue 8, bug 1)

@pytest.fixture
def h200_hidden(monkeypatch, tmp_path):
    """The recorded H200 machine with CUDA_VISIBLE_DEVICES="" (runtime facts: torch sees 0 devices)."""
    import qdoctor.facts
    import qdoctor.smoke

    f = snapshot("h200-cu130.json")
    f["env"]["CUDA_VISIBLE_DEVICES"] = ""
    f["nvidia"]["cuda_visible_devices"] = ""
    for g in f["nvidia"]["gpus"]:
        g["visible"] = False
    f["torch"].update(device_count=0, cuda_available=False, devices=[])
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(qdoctor.facts, "collect", lambda **kw: f)
    calls = []

    def fake_run_probes(names, device, timeout, facts, **_):
        calls.append((tuple(names), device))
        return []

    monkeypatch.setattr(qdoctor.smoke, "run_probes", fake_run_probes)
    return f, calls


def test_preflight_with_every_gpu_hidden_probes_the_cpu(h200_hidden):
    f, calls = h200_hidden
    pf = preflight.run(None)  # no --device from the user: must not invent cuda:0
    assert calls == [(preflight.CPU_PROBES, "cpu")]
    assert plan(pf.facts, []).device.value == "cpu"


def test_preflight_names_the_variable_when_the_user_asks_for_a_hidden_gpu(h200_hidden):
    from qdoctor.smoke.runner import ProbeUsageError

    with pytest.raises(ProbeUsageError, match="CUDA_VISIBLE_DEVICES='' hides every GPU"):
        preflight.run("cuda:0")


def test_preflight_probes_the_first_visible_gpu(monkeypatch, tmp_path):
    import qdoctor.facts
    import qdoctor.smoke

    f = facts([T4, A100], cvd="1")
    monkeypatch.setenv("QDOCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(qdoctor.facts, "collect", lambda **kw: f)
    calls = []
    monkeypatch.setattr(qdoctor.smoke, "run_probes",
                        lambda n, d, t, fa, **_: calls.append((tuple(n), d)) or [])
    preflight.run(None)
    assert calls == [(preflight.GPU_PROBES, "cuda:0")]


# ---------------------------------------------------------------- the real path, nothing mocked

def test_real_collect_judge_probes_plan_on_this_machine(tmp_path):
    """`qdoctor train --dry-run` as a user runs it (CUDA_VISIBLE_DEVICES="" set): real facts, real rules,
    real probe processes, the real plan."""
    env = dict(os.environ, QDOCTOR_CACHE_DIR=str(tmp_path / "cache"), CUDA_VISIBLE_DEVICES="",
               HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "qdoctor", "train", "--dry-run", "--json"], capture_output=True,
                       text=True, env=env, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "no such device" not in p.stderr and "--device" not in p.stderr
    pl = json.loads(p.stdout)
    assert pl["device"]["value"] == "cpu"
    assert "nf4 probe pass" in pl["quantization"]["reason"]  # the probes really ran
    assert "optim8bit probe pass" in pl["optimizer"]["reason"]
    assert not list(tmp_path.glob("runs"))  # a dry run writes nothing
