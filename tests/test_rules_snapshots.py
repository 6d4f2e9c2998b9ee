"""Rules judged on recorded machines (tests/snapshots/*.json) and on variants of them.

Each case states the exact set of error and warning codes, and words that must appear in the titles,
evidence or fixes, so a rule that fires for the wrong reason, or names the wrong GPU/wheel, fails.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from qdoctor import matrix
from qdoctor.facts.schema import normalize
from qdoctor.rules import judge, load_rules

SNAP = Path(__file__).parent / "snapshots"


def load(name: str) -> dict:
    return normalize(json.loads((SNAP / f"{name}.json").read_text()))


def run(facts: dict):
    return judge(facts, matrix.load())


def problems(findings) -> tuple[set, set]:
    return (
        {f.code for f in findings if f.severity == "error"},
        {f.code for f in findings if f.severity == "warning"},
    )


def text_of(findings, code: str) -> str:
    fs = [f for f in findings if f.code == code]
    assert fs, f"{code} did not fire"
    return "\n".join(f"{f.title}\n" + "\n".join(f.evidence) + f"\n{f.fix or ''}" for f in fs)


# snapshot -> (errors, warnings, {code: [words that must appear in its title/evidence/fix]})
SNAPSHOTS = {
    # h200-cu130 is the real `qdoctor check --deep --json` of the H200 machine; h200-synthetic is the same
    # machine written by hand from shared/facts (the clean base the variants below modify).
    "h200-synthetic": (
        set(),
        set(),
        {
            "QD200": ["580.159.04", "CUDA 13.0", "NVIDIA H200", "sm_90", "140 GiB"],
            "QD300": ["2.11.0+cu130"],
            "QD400": ["cuda130", "GPU 0 (sm_90)"],
        },
    ),
    "h200-cu130": (
        set(),
        set(),
        {
            "QD200": ["580.159.04", "CUDA 13.0", "NVIDIA H200", "sm_90", "140 GiB"],
            "QD300": ["2.11.0+cu130"],
            "QD400": ["cuda130", "GPU 0 (sm_90)"],
            "QD500": ["transformers 5.17.0"],
            "QD100": ["Python 3.12.3"],
        },
    ),
    "v100-cu130": (
        {"QD303", "QD404"},
        {"QD203"},
        {
            "QD303": ["sm_70", "Tesla V100", "torch==2.11.0+cu126", "whl/cu126", "is_available"],
            "QD404": ["sm_70", "cuda130", "cuda126", "cuda128", "torch==2.11.0+cu126", "no kernel image"],
            "QD203": ["fp16=True", "bnb_4bit_compute_dtype=torch.float16"],
            "QD408": ["sm_75", "4-bit is fine"],
        },
    ),
    "p100-cu128": (
        {"QD303", "QD404"},
        {"QD203"},
        {
            "QD303": ["sm_60", "too old", "torch==2.8.0+cu126", "whl/cu126"],
            "QD404": ["cuda128", "sm_60", "cuda126"],
        },
    ),
    "rtx5090-cu124": ({"QD303"}, set(), {"QD303": ["sm_120", "too new", "RTX 5090", "whl/cu128"]}),
    "t4": (set(), {"QD203"}, {"QD203": ["Tesla T4", "sm_75", "emulation", "fp16=True"]}),
    "old-driver": (
        {"QD202"},
        set(),
        {
            "QD202": [
                "535.183.01",
                "CUDA 12.2",
                "CUDA 13.0",
                ">= 580.65.06",
                "whl/cu126",
                "torch==2.11.0+cu126",
            ]
        },
    ),
    "cpu-torch-with-gpu": (
        {"QD302"},
        set(),
        {"QD302": ["2.11.0+cpu", "RTX 4090", "torch==2.11.0+cu128", "whl/cu128"]},
    ),
    "bnb-override-missing": (
        {"QD403"},
        set(),
        {"QD403": ["BNB_CUDA_VERSION=122", "cuda130", "cuda128", "unset BNB_CUDA_VERSION"]},
    ),
    "mixed-gpus": (
        {"QD303", "QD404"},
        {"QD203"},
        {
            "QD303": ["GPU 1", "sm_70", "whl/cu126"],
            "QD404": ["GPU 1", "sm_70"],
            "QD204": ["GPU 0", "GPU 1", "CUDA_VISIBLE_DEVICES=0"],
        },
    ),
    # synthetic: the H200 machine with two GeForce RTX 4090 instead, `check --deep` (no NVLink: the driver
    # offers no peer-to-peer between them, so NCCL goes through host memory)
    "two-rtx4090-deep": (
        set(),
        set(),
        {
            "QD220": ["2 GPUs for data-parallel training (NCCL 2.28.9, peer-to-peer not between all)",
                      "cuda:1 = GPU 1 (NVIDIA GeForce RTX 4090, sm_89, 24 GiB)", "0->1 no"],
            "QD221": ["cuda:0 and cuda:1", "NCCL_P2P_DISABLE=1"],
            "QD222": ["NCCL_DEBUG=WARN"],
        },
    ),
    "peft-transformers-mismatch": (
        {"QD503"},
        set(),
        {"QD503": ["peft 0.14.0", "transformers 4.39.3", "EncoderDecoderCache", "transformers>=4.46"]},
    ),
    "bnb-placeholder": (
        {"QD406"}, set(), {"QD406": ["libcudart.so.13", "pip install nvidia-cuda-runtime-cu13"]}
    ),
    # 8 H100 on NVSwitches, fabric manager stopped: CUDA error 802 (check --deep); one root cause, QD205
    "hgx-fabric-manager-stopped": (
        {"QD205", "QD306", "QD305", "QD407"},
        set(),
        {"QD205": ["not-started", "nvidia-fabricmanager-570", "570.133.20"], "QD306": ["Error 802", "KF43"]},
    ),
    "conflict": (
        {"QD501", "QD502"},
        {"QD504"},
        {
            "QD501": ["bitsandbytes-cuda117", "pip uninstall -y bitsandbytes bitsandbytes-cuda117"],
            "QD502": ["accelerate>=0.21.0", "not installed"],
        },
    ),
    "wsl-vgpu": (
        set(),
        {"QD602", "QD605", "QD608"},
        {
            "QD601": ["/usr/lib/wsl/lib"],
            "QD602": ["vGPU", "adamw_bnb_8bit"],
            "QD605": ["/usr/local/cuda-12.4/lib64", "CUDA 13.0"],
            "QD606": ["HF_HUB_OFFLINE"],
            "QD607": ["HF_TOKEN"],
        },
    ),
    # h200-cu130 with only the bytecode section added, as scripts/import_cost.py measured it there
    # (bench/results/s5/import-cost-call1.txt): PYTHONDONTWRITEBYTECODE set, torch without any .pyc (full
    # counts, not a sample), everything else cached
    "h200-bytecode-uncached": (
        set(),
        {"QD613"},
        {"QD613": ["torch: bytecode not cached", "0 of 2141", "cpython-312", "PYTHONDONTWRITEBYTECODE is set",
                   "/opt/torch/.venv/bin/python3 -m compileall -q -j 0 "
                   "/opt/torch/.venv/lib/python3.12/site-packages/torch", "unset PYTHONDONTWRITEBYTECODE"]},
    ),
    "cpu-only-machine": (set(), set(), {"QD201": ["no NVIDIA GPU", "CPU"]}),
    "cpu-ci-machine": (set(), set(), {"QD201": ["no NVIDIA GPU", "CPU"]}),  # collected by qdoctor.facts
}


def test_every_snapshot_has_expectations():
    assert {p.stem for p in SNAP.glob("*.json")} == set(SNAPSHOTS)


@pytest.mark.parametrize("name", sorted(SNAPSHOTS))
def test_snapshot(name):
    errors, warnings, words = SNAPSHOTS[name]
    fs = run(load(name))
    assert problems(fs) == (errors, warnings), [(f.code, f.severity, f.title) for f in fs]
    for code, ws in words.items():
        txt = text_of(fs, code)
        for w in ws:
            assert w in txt, f"{code}: {w!r} not in\n{txt}"
    assert not [f for f in fs if f.code == "QD001"], "a rule crashed"


def test_one_ok_summary_per_clean_area():
    fs = run(load("h200-cu130"))
    oks = [f for f in fs if f.severity == "ok"]
    assert sorted(f.area for f in oks) == sorted(
        ["platform", "nvidia", "torch", "bitsandbytes", "packages", "environment"]
    )
    # an area with a problem gets no ok line
    fs = run(load("v100-cu130"))
    assert not [f for f in fs if f.severity == "ok" and f.area in ("torch", "bitsandbytes", "nvidia")]


def variant(base: str, **changes) -> dict:
    """A snapshot with dotted-path changes: variant('h200-cu130', **{'torch.cuda': None})."""
    d = copy.deepcopy(load(base))
    for path, val in changes.items():
        cur = d
        keys = path.split(".")
        for k in keys[:-1]:
            cur = cur[k] if not isinstance(cur, list) else cur[int(k)]
        if isinstance(cur, list):
            cur[int(keys[-1])] = val
        elif val is _DEL:
            cur.pop(keys[-1], None)
        else:
            cur[keys[-1]] = val
    return d


_DEL = object()
TORCH_DIR = "/opt/torch/.venv/lib/python3.12/site-packages/torch"
BNB_DIR = "/opt/torch/.venv/lib/python3.12/site-packages/bitsandbytes"
MODEL_8B = {"id": "llama-8b", "max_position_embeddings": 131072, "params": 8_030_261_248,
            "shape": {"hidden": 4096, "intermediate": 14336, "layers": 32, "heads": 32, "kv_heads": 8,
                      "vocab": 128256, "head_dim": None}}
BNB047_BINS = {
    f"cuda{x}": {
        "archs": ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_89", "sm_90"],
        "ptx": ["sm_90"],
        "missing_deps": [],
    }
    for x in (118, 120, 121, 122, 123, 124, 125, 126)
}

# id -> (facts, errors, warnings, {code: words})
VARIANTS = {
    # bitsandbytes' CPU backend (QD413, floors measured) and the verified results of this CPU machine (QD510,
    # matrix/verified/linux-x86_64-cpu.json: this exact stack was run and its nf4 probe failed)
    "bnb-0.46.1-on-cpu": (
        variant("cpu-only-machine", **{"packages.bitsandbytes": "0.46.1", "bitsandbytes.version": "0.46.1"}),
        {"QD510"},
        {"QD413"},
        {"QD413": ["no fp4, optim8bit", "NF4 QLoRA runs", "bitsandbytes>=0.50.0"],
         "QD510": ["probe nf4 fail", "quant_type must be nf4 on CPU, got fp4"]},
    ),
    "bnb-0.45.5-on-cpu": (
        variant("cpu-only-machine", **{"packages.bitsandbytes": "0.45.5", "bitsandbytes.version": "0.45.5",
                                       "packages.transformers": "4.57.6", "packages.accelerate": "1.10.1",
                                       "packages.peft": "0.17.1"}),
        {"QD413"},
        set(),
        {"QD413": ["no nf4, fp4, optim8bit", "Device type not supported for FP4 quantization: cpu"]},
    ),
    "transformers-4.46-bnb-on-cpu": (
        variant("cpu-only-machine", **{"packages.transformers": "4.46.3", "packages.accelerate": "1.1.1",
                                       "packages.peft": "0.13.2"}),
        {"QD503", "QD510"},
        set(),
        {"QD503": ["'frozenset' object has no attribute 'discard'"]},
    ),
    "cc-null": (
        variant("h200-synthetic", **{"nvidia.gpus.0.compute_capability": None}),
        set(),
        {"QD208"},
        {"QD208": ["GPU 0 (NVIDIA H200)", "architecture unknown", "None", "compute_cap"]},
    ),
    "cc-unparseable": (
        variant("h200-synthetic", **{"nvidia.gpus.0.compute_capability": "Hopper"}),
        set(),
        {"QD208"},
        {"QD208": ["'Hopper'", "kernel coverage"]},
    ),
    "python-3.9": (
        variant("h200-synthetic", **{"platform.python": "3.9.18"}),
        {"QD505"},
        {"QD101"},
        {"QD101": ["3.9.18", "3.10"], "QD505": ["transformers 5.17.0", ">=3.10"]},
    ),
    "windows-old-bnb": (
        variant(
            "cpu-only-machine",
            **{
                "platform.system": "Windows",
                "bitsandbytes.version": "0.42.0",
                "packages.bitsandbytes": "0.42.0",
            },
        ),
        {"QD102", "QD503", "QD413"},  # QD413: and no 4-bit on the CPU before 0.46 (measured)
        set(),
        {"QD102": ["0.43.0", "bitsandbytes>=0.43.0"], "QD503": ["bitsandbytes>=0.46.1"]},
    ),
    "macos": (
        variant("cpu-only-machine", **{"platform.system": "Darwin", "platform.machine": "arm64"}),
        set(),
        set(),
        {"QD102": ["macOS", "MPS"]},
    ),
    "collector-failed": (
        variant(
            "h200-synthetic",
            **{"collectors.torch": {"ok": False, "duration_ms": 3000.0, "error": "timed out after 3 s"}},
        ),
        set(),
        set(),
        {"QD103": ["torch", "timed out"]},
    ),
    "nvml-error": (
        variant(
            "h200-synthetic",
            **{
                "nvidia.status": "error",
                "nvidia.error": "Driver/library version mismatch",
                "nvidia.gpus": [],
                "nvidia.driver": None,
                "nvidia.cuda_driver": None,
            },
        ),
        {"QD206"},
        {"QD201"},
        {"QD201": ["Driver/library version mismatch"], "QD206": ["reboot", "rmmod nvidia_uvm"]},
    ),
    "driver-minor-compat": (
        variant(
            "old-driver",
            **{
                "torch.version": "2.11.0+cu128",
                "torch.cuda": "12.8",
                "packages.torch": "2.11.0+cu128",
                "torch.ptx": [],
                "bitsandbytes.selected": "cuda128",
            },
        ),
        set(),
        {"QD202"},
        {"QD202": ["minor-version compatibility", ">= 570.26"]},
    ),
    "driver-derived-from-version": (
        variant("old-driver", **{"nvidia.cuda_driver": None}),
        {"QD202"},
        set(),
        {"QD202": ["CUDA 12.2", ">= 580.65.06"]},
    ),
    "torch-missing-cpu": (
        variant(
            "cpu-only-machine",
            **{"torch": {"installed": False, "version": None, "cuda": None}, "packages.torch": _DEL},
        ),
        {"QD301"},
        {"QD504"},
        {"QD301": ["whl/cpu"],
         "QD504": ["`qdoctor smoke` and `qdoctor train` need torch", 'pip install "qdoctor[train]"']},
    ),
    "torch-missing-gpu": (
        variant(
            "h200-synthetic",
            **{"torch": {"installed": False, "version": None, "cuda": None}, "packages.torch": _DEL},
        ),
        {"QD301"},
        {"QD504"},
        # on a GPU machine the extra alone would pull pip's default torch: the right wheel first
        {"QD301": ["whl/cu130", "torch==2.14.*"],
         "QD504": ["the torch wheel QD301 names first", "qdoctor[train]"]},
    ),
    "torch-import-error": (
        variant("h200-synthetic", **{"torch.error": "ImportError: libtorch_cuda.so: cannot open"}),
        {"QD304"},
        set(),
        {"QD304": ["libtorch_cuda.so", "--force-reinstall"]},
    ),
    "torch-cuda-unavailable": (
        variant("h200-synthetic", **{"torch.cuda_available": False, "torch.source": "runtime"}),
        {"QD305"},
        set(),
        {"QD305": ["is_available", "torch.cuda.init()"]},
    ),
    "rocm-torch-nvidia": (
        variant(
            "h200-synthetic",
            **{
                "torch.cuda": None,
                "torch.hip": "6.4",
                "torch.arch_list": [],
                "torch.version": "2.11.0+rocm6.4",
                "bitsandbytes.selected": "rocm64",
            },
        ),
        {"QD302"},
        set(),
        {"QD302": ["ROCm", "whl/cu130"]},
    ),
    "bnb-missing": (
        variant("h200-synthetic", **{"bitsandbytes": {"installed": False}, "packages.bitsandbytes": _DEL}),
        {"QD401"},
        {"QD504"},
        {"QD401": ["pip install -U bitsandbytes"], "QD504": ["need bitsandbytes (not installed)"]},
    ),
    "bnb-no-lib-facts": (
        variant(
            "h200-synthetic",
            **{
                "bitsandbytes.version": "0.47.0",
                "packages.bitsandbytes": "0.47.0",
                "bitsandbytes.binaries": BNB047_BINS,
                "bitsandbytes.selected_exists": False,
            },
        ),
        {"QD402", "QD510"},  # QD510: the H200's verified matrix measured this combination broken
        set(),
        {"QD402": ["cuda130", "bitsandbytes>=0.48.0", "Configured CUDA binary"],
         "QD510": ["verified broken on linux-x86_64-cuda-sm_90", "bnb_native_loaded"]},
    ),
    "bnb-no-lib-matrix": (
        variant(
            "h200-synthetic",
            **{"bitsandbytes": {"installed": True, "version": "0.45.5"}, "packages.bitsandbytes": "0.45.5"},
        ),
        {"QD402", "QD503"},
        set(),
        {"QD402": ["cuda130", "bitsandbytes>=0.48.0"]},
    ),
    "bnb-missing-deps": (
        variant(
            "h200-synthetic",
            **{"bitsandbytes.binaries.cuda130.missing_deps": ["libcudart.so.13", "libcublas.so.13"]},
        ),
        {"QD405"},
        set(),
        {"QD405": ["libcudart.so.13", "nvidia-cuda-runtime-cu13"]},
    ),
    "bnb-cpu-lib-cuda-torch": (
        variant("h200-synthetic", **{"bitsandbytes.selected": "cpu"}),
        {"QD407"},
        set(),
        {"QD407": ["CPU library", "CUDA 13.0"]},
    ),
    "maxwell": (
        variant(
            "h200-cu130", **{"nvidia.gpus.0.compute_capability": "5.2", "nvidia.gpus.0.name": "Tesla M40"}
        ),
        {"QD303", "QD404", "QD409"},
        {"QD203"},
        {"QD409": ["sm_52", "sm_60"]},
    ),
    "bnb-ancient": (
        variant(
            "h200-synthetic",
            **{"bitsandbytes": {"installed": True, "version": "0.37.2"}, "packages.bitsandbytes": "0.37.2"},
        ),
        {"QD410", "QD503"},
        set(),
        {"QD410": ["0.37.2", "0.39.0", "Linear4bit"]},
    ),
    "torch-below-bnb-min": (
        variant(
            "h200-synthetic",
            **{
                "torch.version": "2.3.1+cu121",
                "packages.torch": "2.3.1+cu121",
                "torch.cuda": "12.1",
                "torch.ptx": [],
                "torch.arch_list": ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"],
                "bitsandbytes.selected": "cuda121",
            },
        ),
        {"QD411"},
        set(),
        {"QD411": [">=2.4", "2.3.1"]},
    ),
    "cvd-hides-all-visible-flag": (
        variant(
            "h200-synthetic",
            **{
                "env.CUDA_VISIBLE_DEVICES": "",
                "nvidia.gpus.0": {**load("h200-synthetic")["nvidia"]["gpus"][0], "visible": False},
            },
        ),
        set(),
        {"QD603"},
        {"QD603": ["hides all 1 GPU", "unset CUDA_VISIBLE_DEVICES"]},
    ),
    "cvd-hides-all-env-only": (
        variant("mixed-gpus", **{"env.CUDA_VISIBLE_DEVICES": "-1"}),
        set(),
        {"QD603"},
        {"QD603": ["'-1'", "CUDA_VISIBLE_DEVICES=0,1"]},
    ),
    "cvd-hides-the-v100": (variant("mixed-gpus", **{"env.CUDA_VISIBLE_DEVICES": "0"}), set(), set(), {}),
    "container-without-gpu": (
        variant("cpu-only-machine", **{"platform.container": "docker", "torch.cuda": "12.8",
                                        "torch.version": "2.9.1+cu128", "packages.torch": "2.9.1+cu128",
                                        "driver": {"device_nodes": []}}),
        set(),
        {"QD610"},
        {"QD610": ["docker", "--gpus all", "CUDA 12.8"]},
    ),
    "container-cpu-torch-no-gpu": (
        variant("cpu-only-machine", **{"platform.container": "docker", "driver": {"device_nodes": []}}),
        set(),
        set(),
        {},
    ),
    # check --model: a Llama-3.1-8B-shaped config, and a 48-layer and a 70B variant on a T4
    "model-fits-h200": (
        variant("h200-synthetic", model=MODEL_8B), set(), set(), {"QD900": ["NVIDIA H200", "micro-batch"]}),
    "model-short-sequences-only": (
        variant("t4", model={**MODEL_8B, "shape": {**MODEL_8B["shape"], "layers": 48}}),
        set(),
        {"QD203", "QD902"},
        {"QD902": ["only below 2048 tokens", "--seq-len 1024"]}),
    "model-too-big": (
        variant("t4", model={**MODEL_8B, "shape": {**MODEL_8B["shape"], "hidden": 8192, "intermediate": 28672,
                                                   "heads": 64, "layers": 80}}),
        {"QD901"}, {"QD203"}, {"QD901": ["FSDP"]}),
    # QD613: silent when the bytecode is cached or will be written; a read-only directory and a prefix that
    # hides the __pycache__ beside the sources get their own fixes
    "bytecode-cached": (
        variant("h200-bytecode-uncached", **{"bytecode.packages.torch.cached": 2141}), set(), set(), {}),
    "bytecode-will-be-written": (
        variant("h200-bytecode-uncached", **{"bytecode.dont_write_bytecode": False}), set(), set(), {}),
    "bytecode-read-only": (
        variant("h200-bytecode-uncached", **{"bytecode.dont_write_bytecode": False,
                                             "bytecode.packages.torch.writable": False}),
        set(),
        {"QD613"},
        {"QD613": ["torch: the .pyc files cannot be written", "not writable",
                   "export PYTHONPYCACHEPREFIX=$HOME/.cache/pycache && "
                   "/opt/torch/.venv/bin/python3 -m compileall"]},
    ),
    "bytecode-prefix-hides-pycache": (
        variant("h200-bytecode-uncached", **{"bytecode.pycache_prefix": "/var/cache/pycache",
                                             "bytecode.packages.torch": {"path": TORCH_DIR, "sampled": 44,
                                                                         "cached": 0, "cached_in_pycache": 44,
                                                                         "writable": True}}),
        set(),
        {"QD613"},
        {"QD613": ["0 of 44", "under PYTHONPYCACHEPREFIX=/var/cache/pycache",
                   "44 are cached in its __pycache__", "run it with PYTHONPYCACHEPREFIX=/var/cache/pycache",
                   "unset PYTHONPYCACHEPREFIX"]},
    ),
    "bytecode-two-packages": (
        variant("h200-bytecode-uncached", **{"bytecode.packages.bitsandbytes":
                                             {"path": BNB_DIR, "sampled": 8, "cached": 1}}),
        set(),
        {"QD613"},
        {"QD613": ["torch, bitsandbytes: bytecode not cached", "compiles them from source",
                   f"-j 0 {TORCH_DIR} {BNB_DIR}"]},
    ),
    "bnb-override-exists": (
        variant(
            "h200-synthetic",
            **{
                "env.BNB_CUDA_VERSION": "128",
                "bitsandbytes.override": "128",
                "bitsandbytes.selected": "cuda128",
            },
        ),
        set(),
        {"QD604"},
        {"QD604": ["BNB_CUDA_VERSION=128", "cuda130"]},
    ),
}


@pytest.mark.parametrize("case", sorted(VARIANTS))
def test_variant(case):
    facts, errors, warnings, words = VARIANTS[case]
    fs = run(facts)
    assert problems(fs) == (errors, warnings), [(f.code, f.severity, f.title) for f in fs]
    for code, ws in words.items():
        txt = text_of(fs, code)
        for w in ws:
            assert w in txt, f"{code}: {w!r} not in\n{txt}"


def test_cpu_only_machine_is_not_an_error():
    fs = run(load("cpu-only-machine"))
    assert not [f for f in fs if f.severity == "error"]
    assert [f.severity for f in fs if f.code == "QD201"] == ["info"]


def test_unknown_is_never_bad():
    """An empty snapshot (every collector failed silently) yields no warning or error."""
    fs = run(normalize({"schema": "qdoctor.facts/1"}))
    assert problems(fs) == (set(), set())
    # nulls everywhere the contract allows them
    d = load("h200-cu130")
    for sec in ("torch", "bitsandbytes", "nvidia", "platform"):
        d[sec] = {k: None for k in d[sec]}
    assert problems(run(d)) == (set(), set())


def test_every_rule_code_is_exercised():
    fired = set()
    for name in SNAPSHOTS:
        fired |= {f.code for f in run(load(name))}
    for facts, *_ in VARIANTS.values():
        fired |= {f.code for f in run(facts)}
    from test_failure_classes import CLASSES  # the survey's failure classes, each with a broken machine

    for _, broken, _, _ in CLASSES.values():
        fired |= {f.code for f in run(broken)}
    registered = {c for r in load_rules() for c in r.codes}
    assert registered - fired == set(), f"never fired: {sorted(registered - fired)}"


def test_rule_crash_is_reported_not_raised():
    from qdoctor import rules as reg

    load_rules()
    i = next(i for i, r in enumerate(reg.REGISTRY) if r.code == "QD303")
    victim = reg.REGISTRY[i]

    def boom(facts, matrix):
        raise KeyError("surprise")

    reg.REGISTRY[i] = reg.Rule(victim.code, victim.slug, victim.area, boom, victim.codes)
    try:
        fs = run(load("h200-cu130"))
    finally:
        reg.REGISTRY[i] = victim
    crash = [f for f in fs if f.code == "QD001"]
    assert crash and "surprise" in crash[0].evidence[0]
    assert any(f.code == "QD200" for f in fs)  # the other rules still ran


def test_one_combination_matched_by_two_matrix_rows_is_reported_once():
    """peft 0.17.1 + transformers 5.2.0 breaks twice over (HybridCache import, the PEFT version check):
    one QD503 carrying both errors, not the same line printed twice."""
    facts = variant("peft-transformers-mismatch",
                    **{"packages.peft": "0.17.1", "packages.transformers": "5.2.0",
                       "packages.accelerate": "1.15.0"})
    fs = [f for f in run(facts) if f.code == "QD503"]
    assert len(fs) == 1, [f.title for f in fs]
    ev = " ".join(fs[0].evidence)
    assert "HybridCache" in ev and "not compatible, please use a version >= 0.18.0" in ev
    assert fs[0].fix == "pip install -U 'peft>=0.18.0'"  # the two rows share their fix: given once


def test_every_rule_runs_once_per_judge(monkeypatch):
    """Area summaries are decided from the findings already made, not by running the rules again."""
    from qdoctor import rules as reg

    load_rules()
    calls: dict[str, int] = {}

    def counted(r):
        def f(facts, matrix):
            calls[r.slug] = calls.get(r.slug, 0) + 1
            return r.func(facts, matrix)
        return f

    monkeypatch.setattr(reg, "REGISTRY", [reg.Rule(r.code, r.slug, r.area, counted(r), r.codes, r.summary)
                                          for r in reg.REGISTRY])
    fs = run(load("mixed-gpus"))
    assert calls and max(calls.values()) == 1, calls
    summaries = {r.slug for r in reg.REGISTRY if r.summary}
    troubled = {f.area for f in fs if f.severity in ("warning", "error")}
    assert summaries
    assert all(calls.get(r.slug, 0) == 0 for r in reg.REGISTRY if r.summary and r.area in troubled)
