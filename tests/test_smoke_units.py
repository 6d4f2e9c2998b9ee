"""smoke, the pure parts: verdict bands, known failures, results -> findings, device and skip decisions.

Fed with recorded measurements, error texts and facts snapshots, so GPU-only behaviour (no kernel
image, paged optimizer refused, CUDA devices) is covered on a CPU machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from qdoctor import matrix
from qdoctor.devices import DeviceError, default_device, parse_device
from qdoctor.devices import count as visible_gpu_count
from qdoctor.smoke import known_failures, verdict
from qdoctor.smoke.registry import ORDER, PROBES
from qdoctor.smoke.result import ProbeResult, code_for, findings_for, to_finding
from qdoctor.smoke.runner import (
    ProbeUsageError,
    build_result,
    dependency_skip,
    parse_inject,
    select_probes,
    static_skip,
)

SNAP = Path(__file__).parent / "snapshots"


def facts_of(name: str) -> dict:
    d = json.loads((SNAP / name).read_text())
    return d.get("facts", d)


@pytest.fixture(scope="module")
def mx():
    return matrix.load()


# ---------------------------------------------------------------- verdict bands

NF4_OK = {"nf4_rel_err": 0.0921, "nf4_dq_rel_err": 0.0921, "fp4_rel_err": 0.1219, "fp4_dq_rel_err": 0.1219}


def test_nf4_measured_values_pass(mx):
    assert verdict.judge("nf4", NF4_OK, mx["smoke_bands"]) == []


@pytest.mark.parametrize("value,side", [(0.0, "too low"), (0.02, "too low"), (0.5, "too high")])
def test_nf4_error_outside_band_fails_both_ways(mx, value, side):
    failed = verdict.judge("nf4", {**NF4_OK, "nf4_dq_rel_err": value}, mx["smoke_bands"])
    assert len(failed) == 1 and failed[0].startswith("nf4_dq_rel_err") and side in failed[0]


def test_nan_is_not_a_number(mx):
    failed = verdict.judge("nf4", {**NF4_OK, "fp4_rel_err": float("nan")}, mx["smoke_bands"])
    assert failed and "not a number" in failed[0]


def test_band_depends_on_compute_dtype(mx):
    b = mx["smoke_bands"]
    # 1.7e-3 is normal for bf16 (8 mantissa bits) but far too much for fp32
    bf16 = {"compute_dtype": "bfloat16", "rel_err": 1.7e-3, "finite": True}
    assert verdict.judge("matmul4bit", bf16, b) == []
    assert verdict.judge("matmul4bit", {**bf16, "compute_dtype": "float32"}, b)


def test_cuda_library_required_only_on_gpu(mx):
    base = {"torch_ok": True, "bitsandbytes_ok": True, "transformers_ok": True, "peft_ok": True,
            "bnb_native_loaded": True, "bnb_cuda_library": False}
    b = mx["smoke_bands"]
    assert verdict.judge("imports", {**base, "needs_cuda_library": False}, b) == []
    failed = verdict.judge("imports", {**base, "needs_cuda_library": True}, b)
    assert failed and failed[0].startswith("bnb_cuda_library")


def test_placeholder_library_fails_imports(mx):
    m = {"torch_ok": True, "bitsandbytes_ok": True, "transformers_ok": True, "peft_ok": True,
         "bnb_native_loaded": False, "needs_cuda_library": True}
    assert any(f.startswith("bnb_native_loaded") for f in verdict.judge("imports", m, mx["smoke_bands"]))


def test_every_criterion_names_a_probe_and_a_source(mx):
    crit = mx["smoke_bands"]["criteria"]
    assert crit
    for c in crit:
        assert c["probe"] in PROBES and c.get("source") and c.get("key")
        assert "expect" in c or "min" in c or "max" in c


# ---------------------------------------------------------------- known failures

@pytest.mark.parametrize("text,code", [
    ("Error no kernel image is available for execution on the device at line 167 in file /src/csrc/ops.cu",
     "KF05"),
    ("Error invalid device function at line 508 in file /home/user/bitsandbytes/csrc/ops.cu", "KF05"),
    ("RuntimeError: CUDA error: no kernel image is available for execution on the device\nCUDA kernel errors "
     "might be asynchronously reported", "KF06"),
    ("NVIDIA GeForce RTX 5090 with CUDA capability sm_120 is not compatible with the current PyTorch "
     "installation.", "KF06"),
    ("Error operation not supported at line 380 in file /src/csrc/pythonInterface.c", "KF12"),
    ("Sorry, cuMemAllocManaged() is not supported", "KF12"),
    ("RuntimeError: Method 'cdequantize_blockwise_fp32' not available in CPU-only version of bitsandbytes.",
     "KF02"),
    ("OSError: libcusparse.so.11: cannot open shared object file: No such file or directory", "KF03"),
    ("ModuleNotFoundError: No module named 'triton.ops'", "KF19"),
    ("ImportError: cannot import name 'EncoderDecoderCache' from 'transformers'", "KF15"),
    ("RuntimeError: element 0 of tensors does not require grad and does not have a grad_fn", "KF11"),
    ("ValueError: Attempting to unscale FP16 gradients.", "KF09"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB", "KF30"),
])
def test_error_text_matches_known_failure(mx, text, code):
    kf = known_failures.match(text, mx)
    assert kf is not None and kf.code == code and kf.fix and kf.source


def test_unrelated_text_matches_nothing(mx):
    assert known_failures.match("AssertionError: 3 != 4", mx) is None
    assert known_failures.match("", mx) is None


def test_known_failure_codes_unique(mx):
    codes = [f["code"] for f in mx["failures"]["failure"]]
    assert len(codes) == len(set(codes))


# ---------------------------------------------------------------- build_result / findings

def test_recorded_no_kernel_image_becomes_finding_with_fix(mx):
    raw = {"kind": "ok", "duration_s": 1.2, "payload": {
        "measurements": {"target": "cuda:0"},
        "error": "Traceback (most recent call last):\n  ...\ntorch.AcceleratorError: CUDA error: "
                 "no kernel image is available for execution on the device\n"}}
    r = build_result("device", raw, mx)
    assert r.status == "fail" and r.finding["code"] == "KF06"
    f = to_finding(r)
    assert f.code == "QD721" and f.severity == "error" and f.area == "smoke"
    assert f.fix == r.finding["fix"] and "torch" in f.fix
    assert any("KF06" in e for e in f.evidence)


def test_recorded_paged_refusal_points_to_non_paged_optimizer(mx):
    raw = {"kind": "ok", "duration_s": 0.4, "payload": {
        "measurements": {}, "error": "RuntimeError: Error operation not supported at line 380 in file "
                                     "/src/csrc/pythonInterface.c"}}
    r = build_result("optim8bit", raw, mx)
    f = to_finding(r)
    assert r.status == "fail" and f.code == "QD761"
    assert "non-paged" in f.fix and "AdamW8bit" in f.fix


def test_paged_step_failure_is_caught_measured_and_matched(mx):
    # the probe now catches the paged step's error itself, so the 8-bit numbers survive
    m = {"update_finite": True, "update_rel_err": 0.0074, "state1_dtype": "uint8", "paged": "failed",
         "paged_ok": False, "paged_error": "RuntimeError: Error operation not supported at line 380 in file "
                                           "/src/csrc/pythonInterface.c"}
    r = build_result("optim8bit", {"kind": "ok", "duration_s": 1.0, "payload": {"measurements": m}}, mx)
    assert r.status == "fail" and [c.split(" ")[0] for c in r.failed_checks] == ["paged_ok"]
    assert r.finding and r.finding["code"] == "KF12"
    assert "non-paged" in to_finding(r).fix


def test_crash_and_timeout_statuses(mx):
    crash = build_result("nf4", {"kind": "crash", "signal": "SIGSEGV", "output_tail": "Fatal Python error",
                                 "duration_s": 0.3}, mx)
    assert crash.status == "crash" and "SIGSEGV" in crash.reason and to_finding(crash).code == "QD732"
    hang = build_result("lora_step", {"kind": "timeout", "timeout": 5, "duration_s": 5.0}, mx)
    assert hang.status == "timeout" and to_finding(hang).code == "QD753"
    died = build_result("save_load", {"kind": "error", "returncode": 70, "payload": None}, mx)
    assert died.status == "crash" and "70" in died.reason


def test_wrong_numbers_fail_without_exception(mx):
    r = build_result("nf4", {"kind": "ok", "payload": {"measurements": {**NF4_OK, "nf4_rel_err": 1.3}}}, mx)
    assert r.status == "fail" and r.reason.startswith("nf4_rel_err") and r.error is None


def test_error_tail_is_redacted(mx, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnopqrstuvwxyz0123")
    r = build_result("nf4", {"kind": "crash", "signal": "SIGABRT",
                             "output_tail": "token hf_abcdefghijklmnopqrstuvwxyz0123 leaked"}, mx)
    assert "hf_abcdefghijklmnopqrstuvwxyz0123" not in r.error and "***" in r.error


def test_findings_summary_and_skip_severity():
    rs = [ProbeResult("imports", "pass", 1.0), ProbeResult("optim8bit", "skip", reason="no GPU"),
          ProbeResult("nf4", "timeout", 5.0)]
    fs = findings_for(rs)
    assert fs[0].code == "QD700" and fs[0].severity == "ok" and "1/3" in fs[0].title
    by = {f.code: f for f in fs}
    assert by["QD760"].severity == "info" and by["QD733"].severity == "error"


def test_codes_are_distinct_per_probe_and_kind():
    codes = {code_for(p.name, k) for p in ORDER for k in ("skip", "fail", "crash", "timeout")}
    assert len(codes) == 4 * len(ORDER)


def test_probe_result_round_trips():
    r = ProbeResult("nf4", "fail", 0.5, 300.0, None, {"a": 1}, "x", ["c"], "err", {"code": "KF05"})
    assert ProbeResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    with pytest.raises(ValueError):
        ProbeResult("nf4", "exploded")


# ---------------------------------------------------------------- device, selection, skips

def test_default_device_follows_the_fast_check():
    assert default_device(facts_of("h200-cu130.json")) == "cuda:0"
    assert default_device(facts_of("cpu-only-machine.json")) == "cpu"
    assert default_device(facts_of("cpu-torch-with-gpu.json")) == "cpu"  # a GPU, but torch cannot use it
    assert default_device(None) == "cpu"


def test_bad_devices_are_usage_errors():
    h200 = facts_of("h200-cu130.json")
    assert parse_device("cuda", h200) == "cuda:0"
    with pytest.raises(DeviceError, match="no such device"):
        parse_device("cuda:7", h200)
    with pytest.raises(DeviceError, match="CPU-only"):
        parse_device("cuda:0", facts_of("cpu-torch-with-gpu.json"))
    with pytest.raises(DeviceError, match="bad --device"):
        parse_device("gpu0", h200)


def test_cuda_visible_devices_limits_the_count():
    f = facts_of("h200-synthetic.json")  # static facts: no runtime device_count, no per-GPU `visible`
    f["env"]["CUDA_VISIBLE_DEVICES"] = ""
    assert visible_gpu_count(f) == 0 and default_device(f) == "cpu"
    f["nvidia"]["gpus"] = [{**f["nvidia"]["gpus"][0], "index": i} for i in range(4)]
    f["env"]["CUDA_VISIBLE_DEVICES"] = "2,3"
    assert visible_gpu_count(f) == 2
    with pytest.raises(DeviceError):
        parse_device("cuda:2", f)


def test_select_and_inject_parsing():
    assert select_probes(None) == [p.name for p in ORDER]
    assert select_probes(["save_load", "nf4"]) == ["nf4", "save_load"]  # registry order
    with pytest.raises(ProbeUsageError, match="unknown probe"):
        select_probes(["nf5"])
    assert parse_inject("nf4=abort, lora_step=hang") == {"nf4": "abort", "lora_step": "hang"}
    for bad in ("nf4=explode", "nope=abort", "nf4"):
        with pytest.raises(ProbeUsageError):
            parse_inject(bad)


def test_missing_bitsandbytes_skips_4bit_probes_with_reason():
    f = facts_of("cpu-only-machine.json")
    f["packages"].pop("bitsandbytes", None)
    f["bitsandbytes"] = {"installed": False}
    why = static_skip("nf4", f, "cpu")
    assert why and "pip install bitsandbytes" in why
    assert static_skip("precision", f, "cpu") is None
    assert static_skip("nf4", None, "cpu") is None  # unknown is never bad


def test_ddp_probe_skips_with_one_gpu_and_runs_on_cpu_or_two():
    f = facts_of("h200-synthetic.json")
    why = static_skip("ddp", f, "cuda:0")
    assert why and why.startswith("1 GPU visible: the ddp probe needs two")
    assert static_skip("ddp", f, "cpu") is None  # gloo on the CPU: CI runs it
    f["nvidia"]["gpus"] = [{**f["nvidia"]["gpus"][0], "index": i} for i in range(2)]
    assert static_skip("ddp", f, "cuda:0") is None
    f["env"]["CUDA_VISIBLE_DEVICES"] = "1"
    assert "1 GPU visible" in static_skip("ddp", f, "cuda:0")
    assert static_skip("ddp", None, "cuda:0") is None  # unknown: the probe counts for itself


def test_ddp_verdict_catches_ranks_that_disagree_or_hang(mx):
    ok = {"ranks_finished": True, "allreduce_ok": True, "grad_diff_across_ranks": 0.0,
          "grad_rel_err_vs_mean": 2e-8, "grads_nonzero": True, "losses_finite": True}
    assert verdict.judge("ddp", ok, mx["smoke_bands"]) == []
    bad = verdict.failures("ddp", {**ok, "grad_diff_across_ranks": 1e-3}, mx["smoke_bands"])
    assert [k for k, _ in bad] == ["grad_diff_across_ranks"]
    hung = {"ranks_finished": False, "allreduce_ok": False, "ddp_step_ok": False}
    assert {k for k, _ in verdict.failures("ddp", hung, mx["smoke_bands"])} == {
        "ranks_finished", "allreduce_ok", "ddp_step_ok"}


def test_dependency_skips():
    placeholder = ProbeResult("imports", "fail", measurements={
        "torch_ok": True, "bitsandbytes_ok": True, "bnb_native_loaded": False, "transformers_ok": True,
        "peft_ok": True})
    assert "native library" in dependency_skip("nf4", {"imports": placeholder})
    assert dependency_skip("precision", {"imports": placeholder}) is None
    crashed = ProbeResult("imports", "crash")
    assert "crashed" in dependency_skip("device", {"imports": crashed})
    dev_fail = ProbeResult("device", "fail")
    assert "device probe failed" in dependency_skip("lora_step", {"device": dev_fail})


def _fake_pynvml(caps):
    import types

    m = types.SimpleNamespace()
    m.nvmlInit = lambda: None
    m.nvmlShutdown = lambda: None
    m.nvmlDeviceGetCount = lambda: len(caps)
    m.nvmlDeviceGetHandleByIndex = lambda i: i
    m.nvmlDeviceGetCudaComputeCapability = lambda h: caps[h]
    m.nvmlDeviceGetUUID = lambda h: f"GPU-{h}000"
    return m


def test_bnb_capability_query_is_answered_by_nvml_and_restored(monkeypatch):
    import torch

    from qdoctor.smoke.preload import capability_from_nvml

    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([(9, 0), (9, 0)]))
    real = torch.cuda.get_device_capability
    with capability_from_nvml():
        assert torch.cuda.get_device_capability(torch.device("cuda", 1)) == (9, 0)
        assert not torch.cuda.is_initialized()
    assert torch.cuda.get_device_capability is real


def test_mixed_gpus_are_not_patched(monkeypatch):
    import torch

    from qdoctor.smoke.preload import capability_from_nvml

    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([(7, 0), (9, 0)]))
    real = torch.cuda.get_device_capability
    with pytest.raises(RuntimeError, match="differ"), capability_from_nvml():
        pass
    assert torch.cuda.get_device_capability is real


def test_failures_name_the_key_of_each_failed_criterion():
    """train's plan reads which criteria failed as keys, not by parsing the lines written for people."""
    mx = matrix.load()
    m = {**NF4_OK, "nf4_dq_rel_err": 0.9, "fp4_rel_err": float("nan")}
    fails = verdict.failures("nf4", m, mx["smoke_bands"])
    assert sorted(k for k, _ in fails) == ["fp4_rel_err", "nf4_dq_rel_err"]
    assert [line for _, line in fails] == verdict.judge("nf4", m, mx["smoke_bands"])
    assert all(line.startswith(k) for k, line in fails)


def test_only_the_visible_gpus_count_for_the_capability_answer(monkeypatch):
    import torch

    from qdoctor.smoke.preload import capability_from_nvml

    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml([(7, 0), (9, 0)]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1")  # the sm_90 GPU alone
    with capability_from_nvml():
        assert torch.cuda.get_device_capability(0) == (9, 0)


def test_from_pretrained_dtype_argument_follows_the_transformers_release(monkeypatch):
    """transformers 4.53/4.55 passed an unknown `dtype=` on to LlamaForCausalLM.__init__ (measured by
    scripts/verify_matrix.py); the probes name it `torch_dtype` before 4.56."""
    import torch
    import transformers

    from qdoctor.hf_compat import dtype_kwarg

    for ver, key in (("4.46.3", "torch_dtype"), ("4.55.4", "torch_dtype"), ("4.56.0", "dtype"),
                     ("4.57.0.dev0", "dtype"), ("5.24.0", "dtype")):
        monkeypatch.setattr(transformers, "__version__", ver)
        assert dtype_kwarg(torch.float16) == {key: torch.float16}, ver
