"""`qdoctor explain`: real error texts of every known failure class are recognised, consequences fold
under their cause, a machine's facts sharpen the fix, and the exit codes are 0 (known) / 1 (unknown) /
2 (bad input)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_support import qd

from qdoctor import matrix
from qdoctor.explain import judge_text

MX = matrix.load()
SNAP = Path(__file__).parent / "snapshots"
FAILURES = MX["failures"]["failure"]


@pytest.mark.parametrize("f", FAILURES, ids=lambda f: f["code"])
def test_every_known_failure_has_a_real_example_that_explain_recognises(f):
    assert f.get("example"), f"{f['code']} has no example error text"
    fs = judge_text(f["example"], MX)
    assert f["code"] in {x.code for x in fs}, [x.code for x in fs]


# Real texts from the survey's failure classes (sources in matrix/failures.toml), one per class.
CLASS_TEXTS = {
    "no bnb library for torch's CUDA": (
        "RuntimeError: Configured CUDA binary not found at /opt/venv/lib/python3.11/site-packages/"
        "bitsandbytes/libbitsandbytes_cuda129.so", "KF04"),
    "glibc too old": (
        "OSError: /lib/x86_64-linux-gnu/libc.so.6: version `GLIBC_2.34' not found (required by "
        "/opt/conda/lib/python3.10/site-packages/bitsandbytes/libbitsandbytes_cuda126.so)", "KF40"),
    "conda libstdc++ too old": (
        "ImportError: /opt/conda/lib/libstdc++.so.6: version `GLIBCXX_3.4.32' not found", "KF41"),
    "CUDA libraries shadowed": (
        "ImportError: /usr/local/lib/python3.10/dist-packages/torch/lib/../../nvidia/cusparse/lib/"
        "libcusparse.so.12: undefined symbol: __nvJitLinkComplete_12_4, version libnvJitLink.so.12", "KF42"),
    "CUDA error 802": ("RuntimeError: Unexpected error from cudaGetDeviceCount(). Did you run some cuda "
                       "functions before calling NumCudaDevices() that might have already set an error? "
                       "Error 802: system not yet initialized", "KF43"),
    "CUDA error 802 from a tensor op": (
        "RuntimeError: CUDA error: system not yet initialized\nCUDA kernel errors might be asynchronously "
        "reported at some other API call", "KF43"),
    "CUDA error 804": ("Error 804: forward compatibility was attempted on non supported HW", "KF44"),
    "CUDA unknown error": ("RuntimeError: CUDA unknown error - this may be due to an incorrectly set up "
                           "environment, e.g. changing env variable CUDA_VISIBLE_DEVICES after program "
                           "start. Setting the available devices to be zero.", "KF45"),
    "no GPU in the container": ("RuntimeError: Found no NVIDIA driver on your system. Please check that you "
                                "have an NVIDIA GPU and installed a driver", "KF47"),
    "Jetson": ("Error named symbol not found at line 233 in file /src/csrc/ops.cu", "KF48"),
    "flash-attn ABI": ("ImportError: /usr/local/lib/python3.10/dist-packages/flash_attn_2_cuda.cpython-310-"
                       "x86_64-linux-gnu.so: undefined symbol: _ZN3c104cuda9SetDeviceEi", "KF49"),
    "FA2 before Ampere": ("RuntimeError: FlashAttention only supports Ampere GPUs or newer.", "KF50"),
    "xformers for another torch": ("xFormers was built for:\n    PyTorch 2.10.0+cu128 with CUDA 1208 "
                                   "(you have 2.11.0+cu130)", "KF51"),
    "accelerate drift": ("TypeError: Accelerator.__init__() got an unexpected keyword argument "
                         "'dispatch_batches'", "KF53"),
    "accelerate drift 2": ("TypeError: Accelerator.unwrap_model() got an unexpected keyword argument "
                           "'keep_torch_compile'", "KF54"),
    "trl drift": ("TypeError: SFTTrainer.__init__() got an unexpected keyword argument 'tokenizer'", "KF55"),
    "unsloth_zoo skew": ("ImportError: cannot import name 'patch_compiled_autograd' from "
                         "'unsloth_zoo.patching_utils'", "KF56"),
    "import-time torch floor": ("Disabling PyTorch because PyTorch >= 2.1 is required but found 2.0.1",
                                "KF57"),
    "peft <-> transformers 5": ("ImportError: cannot import name 'HybridCache' from 'transformers'", "KF33"),
    "triton needs a compiler": ("RuntimeError: Failed to find C compiler. Please specify via CC environment "
                                "variable.", "KF63"),
    "small /dev/shm": ("ERROR: Unexpected bus error encountered in worker. This might be caused by "
                       "insufficient shared memory (shm).", "KF65"),
    "no wheel for this Python": ("ERROR: No matching distribution found for torch", "KF66"),
    "framework gate": ("ImportError: transformers>=4.55.0,<=5.2.0 is required for a normal functioning of "
                       "this module, but found transformers==5.3.0.", "KF62"),
}


@pytest.mark.parametrize("name", sorted(CLASS_TEXTS))
def test_failure_class_texts(name):
    text, code = CLASS_TEXTS[name]
    assert [f.code for f in judge_text(text, MX)] == [code]


CPU_ONLY = ("RuntimeError: Method 'cquantize_blockwise_fp16_nf4' not available in CPU-only version of "
            "bitsandbytes.")


def test_ci_log_with_colour_codes_finds_each_failure_once_and_folds_the_consequence():
    log = "\n".join([
        "2026-11-30T10:00:00Z \x1b[36m##[group]Run python train.py\x1b[0m",
        "Collecting bitsandbytes",
        "RuntimeError: Configured CUDA binary not found at /x/bitsandbytes/libbitsandbytes_cuda129.so",
        "  warn(msg)",
        CPU_ONLY,
        CPU_ONLY,
        "\x1b[31mError: Process completed with exit code 1.\x1b[0m",
    ])
    fs = {f.code: f for f in judge_text(log, MX)}
    assert set(fs) == {"KF04", "KF02"}
    assert fs["KF02"].caused_by == "KF04" and fs["KF02"].fix is None
    assert "line 3:" in fs["KF04"].evidence[0]
    assert fs["KF02"].evidence[0].startswith("line 5:") and "(and 1 more line)" in fs["KF02"].evidence[0]


def test_cli_exit_codes_and_text(tmp_path):
    p = tmp_path / "err.txt"
    p.write_text(CLASS_TEXTS["CUDA error 802"][0] + "\n")
    r = qd("explain", str(p), "--no-facts")
    assert r.exit_code == 0, r.output
    assert "KF43" in r.output and "nvidia-fabricmanager" in r.output
    assert r.output.rstrip().splitlines()[-1].startswith("Verdict: 1 known failure: KF43")
    r = qd("explain", "-", "--no-facts", input="AssertionError: 3 != 4\n")
    assert r.exit_code == 1
    assert "no known failure" in r.output and "KF43 cuda-error-802-fabric-manager" in r.output
    for args, inp in ((["explain", str(tmp_path / "missing.txt")], None), (["explain", "-"], ""),
                      (["explain", "-", "--facts", "x.json", "--no-facts"], "x")):
        r = qd(*args, input=inp)
        assert r.exit_code == 2, (args, r.output)
        assert "Traceback" not in r.output
    (tmp_path / "bin").write_bytes(b"\x7fELF\x00\x00\x01")
    assert qd("explain", str(tmp_path / "bin")).exit_code == 2


def test_facts_of_the_failing_machine_sharpen_the_fix():
    text = CLASS_TEXTS["CUDA error 802"][0]
    r = qd("explain", "-", "--facts", str(SNAP / "hgx-fabric-manager-stopped.json"), "--json", input=text)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["schema"] == "qdoctor.explain/1" and doc["verdict"] == "known-failure"
    (f,) = doc["findings"]
    assert f["code"] == "KF43" and "nvidia-fabricmanager-570" in f["fix"]  # the driver's branch (facts)
    assert any("QD205" in e for e in f["evidence"])


def test_json_when_nothing_is_known_lists_what_was_looked_for():
    r = qd("explain", "-", "--no-facts", "--json", input="all good\n")
    doc = json.loads(r.output)
    assert r.exit_code == 1 and doc["findings"] == [] and len(doc["looked_for"]) == len(FAILURES)


def test_secrets_in_the_log_are_not_printed():
    secret = "hf_abcdefghijklmnopqrstuvwx123"
    text = f"token={secret}\nError 802: system not yet initialized {secret}\n"
    r = qd("explain", "-", "--no-facts", "-v", input=text)
    assert r.exit_code == 0 and secret not in r.output


def test_a_predicting_check_finding_lends_the_fix_of_its_root_cause_and_a_cycle_ends_the_walk():
    from qdoctor.findings import Finding

    text = CLASS_TEXTS["CUDA error 802"][0]
    kf43 = next(f for f in FAILURES if f["code"] == "KF43")
    pred = kf43["check_codes"][0]
    check = [Finding(pred, "error", "predicts it", [], None, caused_by="QD999"),
             Finding("QD999", "error", "the root", [], "fix the root")]
    (f,) = judge_text(text, MX, check)
    assert f.fix == "fix the root" and any("QD999 the root" in e for e in f.evidence)
    loop = [Finding(pred, "error", "predicts it", [], "own fix", caused_by="QD999"),
            Finding("QD999", "error", "loops back", [], "loop fix", caused_by=pred)]
    (f,) = judge_text(text, MX, loop)  # used to spin forever on A -> B -> A
    assert f.fix == "loop fix"
