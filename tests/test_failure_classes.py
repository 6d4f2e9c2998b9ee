"""Each failure class of the 2024-2026 tracker survey, judged from facts in both directions: the rule fires
on the broken machine (with its exact fix) and stays silent on the healthy one next to it."""

from __future__ import annotations

import pytest
from test_rules_snapshots import load, run, variant

H200 = "h200-synthetic"
JIT_MISSING = ["__nvJitLinkComplete_12_4", "__nvJitLinkCreate_12_4"]


def cusparse(origin: str, missing, ld="/usr/local/cuda-12.1/lib64:/opt/tools/lib"):
    where = {"LD_LIBRARY_PATH": "/usr/local/cuda-12.1/lib64/libnvJitLink.so.12",
             "wheel": "/venv/lib/python3.12/site-packages/nvidia/nvjitlink/lib/libnvJitLink.so.12"}[origin]
    cu126 = {"torch.version": "2.6.0+cu124", "packages.torch": "2.6.0+cu124", "torch.cuda": "12.4",
             "torch.arch_list": ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"],
             "torch.ptx": [],
             "bitsandbytes.selected": "cuda124", "packages.nvidia-nvjitlink-cu12": "12.1.105",
             "packages.nvidia-cusparse-cu12": "12.3.1.170"}
    return variant(H200, **cu126, **{
        "env.LD_LIBRARY_PATH": ld,
        "native": {"nvjitlink": {"cusparse": "/venv/lib/python3.12/site-packages/nvidia/cusparse/lib/"
                                             "libcusparse.so.12", "needed": JIT_MISSING, "nvjitlink": where,
                                 "origin": origin, "version": "12.1.105", "missing": missing}}})


def jetson(bnb_tag: str, torch_version: str):
    return variant("cpu-only-machine", **{
        "platform.machine": "aarch64", "torch.version": torch_version, "packages.torch": torch_version,
        "torch.cuda": "12.6", "bitsandbytes.wheel_tag": bnb_tag,
        "driver": {"jetson": {"l4t": "36.4.3", "model": "NVIDIA Jetson AGX Orin Developer Kit"},
                   "device_nodes": ["nvhost-ctrl"]}})


def libstdcxx(glibcxx: str):
    return variant(H200, **{
        "bitsandbytes.binaries.cuda130.requires_versions": {"GLIBC": "2.17", "GLIBCXX": "3.4.32"},
        "native": {"libstdcxx": {"path": "/opt/conda/envs/q/lib/libstdc++.so.6", "origin": "conda",
                                 "provides": {"GLIBCXX": glibcxx, "CXXABI": "1.3.13"}}}})


def glibc(libc: str, with_facts: bool = True):
    base = {"platform.libc": libc, "bitsandbytes.version": "0.45.5", "packages.bitsandbytes": "0.45.5",
            "packages.transformers": "4.57.1", "packages.peft": "0.17.1",
            "torch.version": "2.7.1+cu126", "packages.torch": "2.7.1+cu126", "torch.cuda": "12.6",
            "torch.ptx": [],
            "torch.arch_list": ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"],
            "bitsandbytes.selected": "cuda126"}
    d = variant(H200, **base)
    if with_facts:
        d["bitsandbytes"]["binaries"]["cuda126"]["requires_versions"] = {"GLIBC": "2.34", "GLIBCXX": "3.4.22"}
    return d


def runtime_error(text: str, **more):
    return variant(H200, **{"torch.cuda_available": False, "torch.source": "runtime", "torch.device_count": 0,
                            "runtime.ran": True, "runtime.warnings": [text], **more})


ERR_804 = ("UserWarning: CUDA initialization: Unexpected error from cudaGetDeviceCount(). Did you run some "
           "cuda functions before calling NumCudaDevices() that might have already set an error? Error 804: "
           "forward "
           "compatibility was attempted on non supported HW")
ERR_999 = ("UserWarning: CUDA initialization: CUDA unknown error - this may be due to an incorrectly set up "
           "environment, e.g. changing env variable CUDA_VISIBLE_DEVICES after program start.")
OLD_DRIVER = {"nvidia.driver": "535.183.01", "nvidia.cuda_driver": "12.2"}
GPU_DEVS = ["nvidia-uvm", "nvidia0", "nvidiactl"]


def req(pkg, ver, requirement, installed):
    return [{"package": pkg, "version": ver, "requirement": requirement, "installed": installed}]


def two_gpus(**changes):
    """The H200 machine with a second H200 (tests/test_check_multigpu.py covers these rules in full)."""
    from test_check_multigpu import two_h200

    return two_h200(**changes)


P2P_YES = [[0, 1, True], [1, 0, True]]

# class -> (code, broken facts, healthy facts, words that must be in the broken finding)
CLASSES = {
    "bnb: no library for torch's CUDA": (
        "QD402", variant(H200, **{"bitsandbytes": {"installed": True, "version": "0.45.5"},
                                  "packages.bitsandbytes": "0.45.5", "packages.transformers": "4.57.1",
                                  "packages.peft": "0.17.1"}),
        load(H200), ["cuda130", "bitsandbytes>=0.48.0"]),
    "bnb: release before cu128 builds": (
        "QD402", variant(H200, **{"bitsandbytes": {"installed": True, "version": "0.45.2"},
                                  "packages.bitsandbytes": "0.45.2", "torch.version": "2.7.1+cu128",
                                  "packages.torch": "2.7.1+cu128", "torch.cuda": "12.8",
                                  "packages.transformers": "4.57.1", "packages.peft": "0.17.1"}),
        None, ["cuda128", "bitsandbytes>=0.45.3"]),
    "bnb: BNB_CUDA_VERSION names a library not shipped": (
        "QD403", load("bnb-override-missing"), load(H200), ["unset BNB_CUDA_VERSION"]),
    "bnb: BNB_CUDA_VERSION names a library that cannot load": (
        "QD405", variant(H200, **{"env.BNB_CUDA_VERSION": "118", "bitsandbytes.override": "118",
                                  "bitsandbytes.selected": "cuda118",
                                  "bitsandbytes.binaries.cuda118.missing_deps": ["libcudart.so.11.0"]}),
        load(H200), ["unset BNB_CUDA_VERSION", "CUDA 11"]),
    "glibc older than a library needs (read from the library)": (
        "QD104", glibc("glibc 2.31"), glibc("glibc 2.35"), ["GLIBC_2.34", "2.31", "ubuntu:22.04"]),
    "glibc older than a library needs (matrix, old snapshot)": (
        "QD104", glibc("glibc 2.31", with_facts=False), glibc("glibc 2.39", with_facts=False),
        ["bitsandbytes>=0.50.2", "GLIBC_2.34"]),
    "conda libstdc++ older than a library needs": (
        "QD105", libstdcxx("3.4.29"), libstdcxx("3.4.33"), ["GLIBCXX_3.4.32", "libstdcxx-ng>=13.2", "conda"]),
    "CUDA library shadowed by LD_LIBRARY_PATH": (
        "QD609", cusparse("LD_LIBRARY_PATH", JIT_MISSING), cusparse("LD_LIBRARY_PATH", []),
        ["__nvJitLinkComplete_12_4", "export LD_LIBRARY_PATH=/opt/tools/lib"]),
    "pip nvidia-* wheels disagree": (
        "QD506", cusparse("wheel", JIT_MISSING), cusparse("wheel", []),
        ["nvidia-cusparse-cu12 12.3.1.170", "nvidia-nvjitlink-cu12>=12.4"]),
    "CUDA 802: fabric manager not running": (
        "QD205", load("hgx-fabric-manager-stopped"), load(H200), ["nvidia-fabricmanager-570"]),
    "CUDA 802 seen only in --deep's error": (
        "QD306", runtime_error("Error 802: system not yet initialized"), load(H200),
        ["nvidia-fabricmanager-580"]),
    "CUDA 804: driver too old for the container's CUDA": (
        "QD306", runtime_error(ERR_804, **OLD_DRIVER), load(H200), [">= 580.65.06", "Error 804"]),
    "CUDA 999: unknown error": ("QD306", runtime_error(ERR_999), load(H200), ["modprobe nvidia_uvm"]),
    "kernel module and driver libraries differ": (
        "QD206", variant(H200, **{"driver": {"kernel_module": "550.90.07", "nvml_library": "550.107.02"}}),
        variant(H200, **{"driver": {"kernel_module": "550.107.02", "nvml_library": "550.107.02"}}),
        ["reboot"]),
    "container without /dev/nvidia-uvm": (
        "QD206", variant(H200, **{"platform.container": "docker",
                                  "driver": {"device_nodes": ["nvidia0", "nvidiactl"]}}),
        variant(H200, **{"platform.container": "docker", "driver": {"device_nodes": GPU_DEVS}}),
        ["--gpus all"]),
    "container started without --gpus": (
        "QD610", variant("cpu-only-machine", **{"platform.container": "docker", "torch.cuda": "12.8",
                                                "driver": {"device_nodes": []}}),
        variant("cpu-only-machine", **{"platform.container": "docker", "driver": {"device_nodes": []}}),
        ["--gpus all"]),
    "Jetson with a PyPI torch": (
        "QD207", jetson("cp310-cp310-linux_aarch64", "2.8.0+cpu"), None, ["jp6/cu126", "Orin"]),
    "Jetson with PyPI's aarch64 bitsandbytes": (
        "QD412", jetson("py3-none-manylinux_2_24_aarch64", "2.5.0a0+872d972e41.nv24.08"),
        jetson("cp310-cp310-linux_aarch64", "2.5.0a0+872d972e41.nv24.08"),
        ["named symbol not found", "cmake -DCOMPUTE_BACKEND=cuda"]),
    "flash-attn built for another torch": (
        "QD507", variant(H200, **{"packages.flash-attn": "2.7.4.post1", "extensions": {"flash_attn": {
            "library": "flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so", "c10_needed": 41,
            "c10_missing": ["_ZN3c104cuda9SetDeviceEi"], "c10_missing_count": 1}}}),
        variant(H200, **{"packages.flash-attn": "2.8.3", "extensions": {"flash_attn": {
            "library": "flash_attn_2_cuda.cpython-312-x86_64-linux-gnu.so", "c10_needed": 41,
            "c10_missing": []}}}),
        ["_ZN3c104cuda9SetDeviceEi", "--no-build-isolation", "torch2.11"]),
    "xformers built for another torch": (
        "QD508", variant(H200, **{"packages.xformers": "0.0.32", "extensions": {"xformers": {
            "built_for_torch": "2.10.0+cu128", "built_for_cuda": 1208}}}),
        variant(H200, **{"packages.xformers": "0.0.33", "extensions": {"xformers": {
            "built_for_torch": "2.11.0+cu130", "built_for_cuda": 1300}}}),
        ["2.10.0+cu128", "whl/cu130"]),
    "FlashAttention-2 on a GPU older than Ampere": (
        "QD509", variant("t4", **{"packages.flash-attn": "2.8.3"}),
        variant(H200, **{"packages.flash-attn": "2.8.3"}),
        ["sdpa", "Tesla T4"]),
    "accelerate >= 1.0 with a transformers passing dispatch_batches": (
        "QD503", variant(H200, **{"packages.transformers": "4.39.3", "packages.accelerate": "1.0.1",
                                  "packages.peft": "0.13.2"}),
        variant(H200, **{"packages.transformers": "4.40.2", "packages.accelerate": "1.0.1",
                         "packages.peft": "0.13.2"}), ["dispatch_batches", "transformers>=4.40"]),
    "transformers calling unwrap_model(keep_torch_compile=)": (
        "QD503", variant(H200, **{"packages.accelerate": "1.2.1"}),
        variant(H200, **{"packages.accelerate": "1.3.0"}),
        ["keep_torch_compile", "accelerate>=1.3.0"]),
    "import-time torch floor of transformers": (
        "QD503", variant(H200, **{"packages.transformers": "4.53.0", "packages.torch": "2.0.1",
                                  "torch.version": "2.0.1+cu118", "packages.peft": "0.13.2"}),
        None, ["Disabling PyTorch because PyTorch >= 2.1", "torch>=2.4"]),
    "unsloth <-> unsloth_zoo skew": (
        "QD502", variant(H200, **{"requirements": req("unsloth", "2025.3.19", "unsloth_zoo>=2025.3.17",
                                                     "2025.2.7")}),
        load(H200), ["unsloth_zoo>=2025.3.17"]),
    "trainer framework's declared ranges": (
        "QD502", variant(H200, **{"requirements": req("llamafactory", "0.9.3",
                                                     "transformers<=4.52.4,>=4.45.0",
                                                     "5.17.0")}),
        load(H200), ["llamafactory", "transformers<=4.52.4,>=4.45.0"]),
    "Triton without a C compiler": (
        "QD611", variant(H200, **{"platform.c_compiler": None, "native": {"python_headers": True}}),
        variant(H200, **{"platform.c_compiler": "gcc", "native": {"python_headers": True}}),
        ["build-essential", "Failed to find C compiler"]),
    "Triton without Python headers": (
        "QD611", variant(H200, **{"platform.c_compiler": "gcc", "native": {"python_headers": False}}),
        None, ["python3.12-dev"]),
    "NCCL peer-to-peer turned off on GPUs that have it": (
        "QD222", two_gpus(**{"env.NCCL_P2P_DISABLE": "1", "torch.p2p": P2P_YES}),
        two_gpus(**{"torch.p2p": P2P_YES}), ["unset NCCL_P2P_DISABLE"]),
    "container with a small /dev/shm": (
        "QD612", variant(H200, **{"platform.container": "docker", "driver": {"shm_mib": 64}}),
        variant(H200, **{"platform.container": "docker", "driver": {"shm_mib": 16384}}), ["--ipc=host"]),
    "Python with no torch wheels": (
        "QD106", variant("cpu-only-machine", **{"platform.python": "3.16.0", "torch": {"installed": False},
                                                "packages.torch": None}),
        variant("cpu-only-machine", **{"platform.python": "3.12.3", "torch": {"installed": False},
                                       "packages.torch": None}),
        ["3.16.0", "python3.12 -m venv"]),
}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_class_fires_on_the_broken_machine(name):
    code, broken, _, words = CLASSES[name]
    fs = [f for f in run(broken) if f.code == code and f.severity in ("warning", "error")]
    assert fs, (name, sorted({(f.code, f.severity) for f in run(broken)}))
    text = "\n".join(f"{f.title}\n" + "\n".join(f.evidence) + f"\n{f.fix or ''}" for f in fs)
    for w in words:
        assert w in text, f"{name}: {w!r} not in\n{text}"
    assert all(f.fix or f.caused_by for f in fs), "a problem without a fix and without a cause"


@pytest.mark.parametrize("name", sorted(n for n, c in CLASSES.items() if c[2] is not None))
def test_class_is_silent_on_the_healthy_machine(name):
    code, _, healthy, _ = CLASSES[name]
    assert not [f for f in run(healthy) if f.code == code and f.severity in ("warning", "error")], name


def test_jetson_is_not_called_a_cpu_only_machine():
    fs = run(jetson("cp310-cp310-linux_aarch64", "2.5.0a0+872d972e41.nv24.08"))
    codes = {f.code: f for f in fs}
    assert "QD201" not in codes and codes["QD207"].severity == "info" and "sm_87" in codes["QD207"].title


def test_shadowed_nvjitlink_is_the_cause_of_the_torch_import_error():
    d = cusparse("LD_LIBRARY_PATH", JIT_MISSING)
    d["torch"]["error"] = ("ImportError: /venv/lib/python3.12/site-packages/nvidia/cusparse/lib/"
                           "libcusparse.so.12: "
                           "undefined symbol: __nvJitLinkComplete_12_4, version libnvJitLink.so.12")
    codes = {f.code: f for f in run(d)}
    assert codes["QD304"].caused_by == "QD609" and codes["QD304"].fix is None


def test_glibc_cause_folds_the_bitsandbytes_load_failure():
    d = glibc("glibc 2.31")
    d["bitsandbytes"].update(loads=False, error="OSError: /lib/x86_64-linux-gnu/libc.so.6: version "
                             "`GLIBC_2.34' "
                             "not found (required by .../bitsandbytes/libbitsandbytes_cuda126.so)")
    codes = {f.code: f for f in run(d)}
    assert codes["QD406"].caused_by == "QD104"
