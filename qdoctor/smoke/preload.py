"""Import the QLoRA stack once, recording what happened (child side only).

The fork server calls `preload()` before forking one process per probe, so each probe starts
with torch, transformers and peft already imported; the `imports` probe then reads this record
instead of importing again. On CUDA machines bitsandbytes is *not* preloaded: its import queries
the GPUs, which initialises CUDA, and a process that has initialised CUDA cannot hand a usable
GPU to a forked child. `PYTORCH_NVML_BASED_CUDA_CHECK=1` keeps torch.cuda.is_available() from
initialising CUDA for the same reason.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
import traceback
import warnings


def _stack() -> tuple[str, ...]:
    from qdoctor import matrix

    return matrix.stack()


STACK = _stack()  # import names = distribution names for the whole stack
# Heavy submodules every probe needs; importing them here moves their cost out of each probe.
EXTRA = ("torch._dynamo", "transformers.models.llama.modeling_llama", "peft.tuners.lora")

# `import peft` imports bitsandbytes too (peft/tuners/lora/bnb.py).
BNB_IMPORTERS = ("bitsandbytes", "peft")

RECORD: dict = {"modules": {}, "warnings": [], "logs": [], "done": False}


class _ListHandler(logging.Handler):
    def __init__(self, sink: list):
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record):
        with contextlib.suppress(Exception):  # a logging failure must not break the probe
            self.sink.append(f"{record.name}: {record.levelname}: {record.getMessage()}"[:2000])


def import_recorded(name: str, record: dict | None = None) -> bool:
    rec = RECORD if record is None else record
    t0 = time.perf_counter()
    handler = _ListHandler(rec["logs"])
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            importlib.import_module(name)
        for w in caught:
            rec["warnings"].append(f"{name}: {w.category.__name__}: {w.message}"[:2000])
        rec["modules"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 3), "error": None}
        return True
    except BaseException as e:  # an import may raise anything, SystemExit included
        tb = traceback.format_exception_only(type(e), e)[-1].strip()
        rec["modules"][name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 3), "error": tb}
        return False
    finally:
        logging.getLogger().removeHandler(handler)


def _nvml_capabilities() -> list[tuple[int, int]]:
    """Compute capability of every GPU this process's CUDA sees (qdoctor.devices reads
    CUDA_VISIBLE_DEVICES), read through NVML: no CUDA context is created."""
    import os

    import pynvml

    from qdoctor.devices import Unmappable, parse_visible

    pynvml.nvmlInit()
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid = pynvml.nvmlDeviceGetUUID(h)
            gpus.append({"index": i, "uuid": uuid.decode() if isinstance(uuid, bytes) else uuid,
                         "cc": tuple(pynvml.nvmlDeviceGetCudaComputeCapability(h))})
    finally:
        pynvml.nvmlShutdown()
    try:
        order = parse_visible(os.environ.get("CUDA_VISIBLE_DEVICES"), gpus)
    except Unmappable:
        order = None
    keep = gpus if order is None else [g for g in gpus if g["index"] in order]
    return sorted(g["cc"] for g in keep)


@contextlib.contextmanager
def capability_from_nvml():
    """While bitsandbytes imports, answer torch.cuda.get_device_capability from NVML.

    bitsandbytes asks each GPU's capability at import (cuda_specs.get_compute_capabilities) and
    torch answers by initialising CUDA, after which a forked probe cannot use the GPU. Its library
    choice depends on torch's CUDA version, not on the answer, so when every GPU has the same
    capability NVML's answer is exact and the import costs no CUDA context. Otherwise nothing is
    patched (the caller then leaves bitsandbytes to each probe).
    """
    import torch

    caps = _nvml_capabilities()
    if not caps or caps[0] != caps[-1]:
        raise RuntimeError("GPUs differ in compute capability")
    real = torch.cuda.get_device_capability
    torch.cuda.get_device_capability = lambda device=None: caps[-1]
    try:
        yield
    finally:
        torch.cuda.get_device_capability = real


def preload(with_bitsandbytes: bool | str = True, extras: bool = True) -> dict:
    """Import the stack (bitsandbytes: True, False, or "nvml" = import it without creating a CUDA
    context, see capability_from_nvml) and, if asked, the heavy submodules; never raises."""
    t0 = time.perf_counter()
    if with_bitsandbytes == "nvml":
        try:
            if not import_recorded("torch"):
                raise RuntimeError("torch did not import")
            with capability_from_nvml():
                with_bitsandbytes = import_recorded("bitsandbytes") and not cuda_initialized()
        except Exception as e:  # no NVML, mixed GPUs: leave bitsandbytes to each probe
            RECORD["logs"].append(f"qdoctor: bitsandbytes not preloaded ({e})")
            with_bitsandbytes = False
        if not with_bitsandbytes:
            RECORD["modules"].pop("bitsandbytes", None)
    for name in STACK:
        if (name in BNB_IMPORTERS and not with_bitsandbytes) or name in RECORD["modules"]:
            continue
        import_recorded(name)
    for name in EXTRA if extras else ():
        top = name.split(".")[0]
        if RECORD["modules"].get(top, {}).get("ok"):
            import_recorded(name, {"modules": {}, "warnings": RECORD["warnings"], "logs": RECORD["logs"]})
    RECORD["done"] = True
    RECORD["seconds"] = round(time.perf_counter() - t0, 3)
    return RECORD


def cuda_initialized() -> bool:
    import sys

    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:
        return False
