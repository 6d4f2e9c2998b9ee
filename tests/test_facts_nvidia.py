"""NVML facts through a fake pynvml: every fallback, per-GPU failures, CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest

from qdoctor.facts import nvidia


class NVMLError(Exception):
    pass


class NVMLError_DriverNotLoaded(NVMLError):  # noqa: N801 - pynvml's names
    pass


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801
    pass


class NVMLError_Unknown(NVMLError):  # noqa: N801
    pass


def fake_nvml(gpus=(), init_error=None, driver="580.159.04", cuda=13000, broken=()):
    """A pynvml stand-in; `broken` names device calls that raise."""
    m = types.SimpleNamespace(NVMLError=NVMLError, shutdowns=0)

    def init():
        if init_error:
            raise init_error

    def call(name, fn):
        def inner(h):
            if name in broken:
                raise NVMLError_Unknown("not supported")
            return fn(h)
        return inner

    m.nvmlInit = init
    m.nvmlShutdown = lambda: setattr(m, "shutdowns", m.shutdowns + 1)
    m.nvmlSystemGetDriverVersion = lambda: driver
    m.nvmlSystemGetCudaDriverVersion = lambda: cuda
    m.nvmlDeviceGetCount = lambda: len(gpus)
    m.nvmlDeviceGetHandleByIndex = lambda i: gpus[i]
    m.nvmlDeviceGetName = call("name", lambda h: h["name"])
    m.nvmlDeviceGetUUID = call("uuid", lambda h: h["uuid"])
    m.nvmlDeviceGetCudaComputeCapability = call("cc", lambda h: h["cc"])
    m.nvmlDeviceGetMemoryInfo = call(
        "mem", lambda h: SimpleNamespace(total=h["mib"] << 20, free=(h["mib"] - 100) << 20))
    m.nvmlDeviceGetVirtualizationMode = call("virt", lambda h: 0)
    return m


H200 = {"name": "NVIDIA H200", "uuid": "GPU-aaaa1111", "cc": (9, 0), "mib": 143771}
T4 = {"name": b"Tesla T4", "uuid": "GPU-bbbb2222", "cc": (7, 5), "mib": 15360}


def test_ok_two_gpus():
    nv = fake_nvml([H200, T4])
    r = nvidia.collect(nvml=nv, environ={})
    assert r["status"] == "ok" and r["error"] is None
    assert (r["driver"], r["cuda_driver"]) == ("580.159.04", "13.0")
    assert [g["name"] for g in r["gpus"]] == ["NVIDIA H200", "Tesla T4"]
    assert [g["compute_capability"] for g in r["gpus"]] == ["9.0", "7.5"]
    assert r["gpus"][0]["memory_total_mib"] == 143771 and r["gpus"][0]["memory_free_mib"] == 143671
    assert r["gpus"][0]["virtualization"] == "none"
    assert all(g["visible"] for g in r["gpus"])
    assert nv.shutdowns == 1


@pytest.mark.parametrize("n,text", [(12080, "12.8"), (13000, "13.0"), (11040, "11.4"), (0, None),
                                    ("x", None)])
def test_cuda_driver_version(n, text):
    assert nvidia.cuda_driver_version(n) == text


@pytest.mark.parametrize("error,status", [
    (NVMLError_DriverNotLoaded("Driver Not Loaded"), "no-driver"),
    (NVMLError_LibraryNotFound("NVML Shared Library Not Found"), "no-nvml"),
    (NVMLError_Unknown("Unknown Error"), "error"),
    (RuntimeError("binding bug"), "error"),
])
def test_init_failures(error, status):
    r = nvidia.collect(nvml=fake_nvml([H200], init_error=error), environ={})
    assert r["status"] == status
    assert r["gpus"] == [] and r["driver"] is None
    assert str(error) in r["error"]


def test_no_gpu():
    r = nvidia.collect(nvml=fake_nvml([]), environ={})
    assert r["status"] == "no-gpu"
    assert r["driver"] == "580.159.04"


def test_one_failing_query_leaves_only_that_value_null():
    r = nvidia.collect(nvml=fake_nvml([H200], broken=("cc", "virt")), environ={})
    g = r["gpus"][0]
    assert r["status"] == "ok"
    assert g["compute_capability"] is None and g["virtualization"] is None
    assert g["name"] == "NVIDIA H200" and g["memory_total_mib"] == 143771


def test_pynvml_not_installed(monkeypatch):
    import ctypes

    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # pretend libnvidia-ml is there
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    r = nvidia.collect(environ={})
    assert r["status"] == "no-nvml"
    assert "nvidia-ml-py" in r["error"]


def test_driver_library_missing(monkeypatch):
    import ctypes

    def no_lib(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", no_lib)
    monkeypatch.setattr(sys, "platform", "linux")
    r = nvidia.collect(environ={})
    assert r["status"] == "no-nvml" and r["driver_installed"] is False


GPUS = [{"index": 0, "uuid": "GPU-aaaa1111"}, {"index": 1, "uuid": "GPU-bbbb2222"},
        {"index": 2, "uuid": "GPU-bbbb3333"}]


@pytest.mark.parametrize("value,visible", [
    (None, None),
    ("", []),
    ("1", [1]),
    ("2,0", [2, 0]),         # CUDA ordinal order: cuda:0 is NVML GPU 2
    ("0,7,1", [0]),          # CUDA stops at the first invalid entry
    ("0,2,-1,1", [0, 2]),    # the CUDA guide's own example
    ("GPU-aaaa", [0]),       # UUID prefix
    ("GPU-bbbb", []),        # ambiguous prefix: names no device
    ("gpu-bbbb3333,1", [2, 1]),
    ("-1", []),
    ("0,0", [0]),
])
def test_parse_visible(value, visible):
    assert nvidia.parse_visible(value, GPUS) == visible


def test_mig_instances_are_not_mapped_and_count_as_all_visible():
    from qdoctor.devices import Unmappable

    with pytest.raises(Unmappable):
        nvidia.parse_visible("MIG-5c1f2d4e-1111-2222-3333-444455556666", GPUS)
    r = nvidia.collect(nvml=fake_nvml([H200, T4]), environ={"CUDA_VISIBLE_DEVICES": "MIG-5c1f2d4e"})
    assert [g["visible"] for g in r["gpus"]] == [True, True]


def test_visible_flag_per_gpu():
    r = nvidia.collect(nvml=fake_nvml([H200, T4]), environ={"CUDA_VISIBLE_DEVICES": "GPU-bbbb2222"})
    assert [g["visible"] for g in r["gpus"]] == [False, True]
    assert r["cuda_visible_devices"] == "GPU-bbbb2222"
