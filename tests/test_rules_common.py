"""The helpers every rule leans on: architecture coverage, driver support, wheel choice."""

from __future__ import annotations

from qdoctor import matrix
from qdoctor.arch import by_cc, split_arch_list
from qdoctor.rules.common import arch_runs, driver_runs, pick_wheel, pip_torch, visible_gpus

M = matrix.load()


def test_arch_runs_binary_and_ptx_compatibility():
    assert arch_runs("8.9", ["sm_80", "sm_86"], []) is True  # Ada runs sm_86 cubins
    assert arch_runs("8.0", ["sm_86"], []) is False  # a higher minor does not run
    assert arch_runs("7.0", ["sm_75", "sm_80"], ["sm_120"]) is False  # V100 on cu130
    assert arch_runs("12.0", ["sm_90"], []) is False  # RTX 5090 on cu124
    assert arch_runs("12.0", ["sm_90"], ["sm_90"]) is True  # PTX JIT upwards
    assert arch_runs("9.0", ["sm_90a"], []) is True and arch_runs("10.0", ["sm_90a"], []) is False
    assert arch_runs(None, ["sm_90"], []) is None and arch_runs("9.0", None, None) is None


def test_split_arch_list_names_ptx_in_sm_spelling_sorted_by_capability():
    assert split_arch_list(["sm_75", "sm_120", "compute_120", "compute_90"]) == (["sm_75", "sm_120"],
                                                                              ["sm_120", "sm_90"])
    assert by_cc(["sm_120", "sm_90", "sm_120", "sm_100"]) == ["sm_90", "sm_100", "sm_120"]  # not by text


def facts(driver, cuda_driver):
    return {"nvidia": {"driver": driver, "cuda_driver": cuda_driver}, "platform": {"system": "Linux"}}


def test_driver_runs():
    assert driver_runs(facts("580.159.04", "13.0"), M, "13.0") == "full"
    assert driver_runs(facts("580.159.04", "13.0"), M, "12.6") == "full"
    assert driver_runs(facts("535.183.01", "12.2"), M, "12.8") == "minor-compat"
    assert driver_runs(facts("535.183.01", "12.2"), M, "13.0") == "no"
    assert driver_runs(facts("470.256.02", "11.4"), M, "12.1") == "no"
    assert driver_runs(facts(None, None), M, "12.6") is None


def test_pick_wheel_prefers_installed_minor_and_driver():
    f = facts("535.183.01", "12.2")
    w, m, mode = pick_wheel(f, M, ["7.0"], "2.11.0+cu130")
    assert (w["variant"], m, mode) == ("cu126", "2.11", "minor-compat")
    w, m, mode = pick_wheel(facts("580.159.04", "13.0"), M, ["9.0"], "2.11.0+cpu")
    assert (w["variant"], m, mode) == ("cu130", "2.11", "full")
    assert pip_torch(w, m, "2.11.0+cpu") == (
        "pip install 'torch==2.11.0+cu130' --index-url https://download.pytorch.org/whl/cu130"
    )
    # sm_120 on torch 2.5: the smallest newer torch that has it
    w, m, _ = pick_wheel(facts("575.64.03", "12.9"), M, ["12.0"], "2.5.1+cu124")
    assert (w["variant"], m) == ("cu128", "2.7")
    assert pip_torch(w, m, "2.5.1+cu124").startswith("pip install 'torch==2.7.*'")


def test_visible_gpus():
    gpus = [{"index": 0}, {"index": 1}]
    assert visible_gpus({"nvidia": {"gpus": gpus}, "env": {}}) == gpus
    assert visible_gpus({"nvidia": {"gpus": gpus}, "env": {"CUDA_VISIBLE_DEVICES": "1"}}) == [{"index": 1}]
    assert visible_gpus({"nvidia": {"gpus": gpus}, "env": {"CUDA_VISIBLE_DEVICES": ""}}) == []
    assert visible_gpus({"nvidia": {"gpus": gpus}, "env": {"CUDA_VISIBLE_DEVICES": "GPU-3f2a"}}) == gpus
    # the collector's flags decide only where the variable cannot be read here (UUIDs anonymised away)
    flagged = [{"index": 0, "visible": False}, {"index": 1, "visible": True}]
    def vis(cvd):
        return visible_gpus({"nvidia": {"gpus": flagged}, "env": {"CUDA_VISIBLE_DEVICES": cvd}})

    assert vis("GPU-9") == [flagged[1]]
    assert vis("0") == [flagged[0]]


def test_visible_gpus_reads_cuda_visible_devices_like_the_collector():
    from qdoctor.rules.common import visible_gpus

    gpus = [{"index": i, "name": f"g{i}"} for i in range(4)]

    def vis(cvd):
        facts = {"nvidia": {"gpus": gpus}, "env": {"CUDA_VISIBLE_DEVICES": cvd}}
        return [g["index"] for g in visible_gpus(facts)]

    assert vis("2,0") == [2, 0]  # CUDA ordinal order
    assert vis("1,7,2") == [1]  # CUDA stops at the first ordinal that names no device
    assert vis("") == []
    assert vis("GPU-1234") == [0, 1, 2, 3]  # no UUIDs in this snapshot: cannot tell, assume all
