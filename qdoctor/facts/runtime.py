"""Runtime facts (`check --deep`): what torch and bitsandbytes report once really imported.

`probe()` runs in a child process (qdoctor.isolate) because the import can take seconds, crash or
hang; the parent only merges the JSON it hands back. The result is cached under a fingerprint of
the environment, so a plain `check` can show the last deep result without spawning anything.
"""

from __future__ import annotations

import time

from qdoctor import cache
from qdoctor.arch import by_cc, split_arch_list
from qdoctor.isolate import tail_lines

MAX_AGE_S = cache.MAX_AGE_S  # a cached deep result older than this is not shown by a plain check
CACHE_KIND = "runtime"


def probe() -> dict:
    """In the child: import torch and bitsandbytes, report what they see. Never raises."""
    import io
    import logging
    import warnings

    out: dict = {"torch": {"imported": False}, "bitsandbytes": {"imported": False}, "warnings": []}
    log_buf = io.StringIO()
    handler = logging.StreamHandler(log_buf)
    handler.setLevel(logging.WARNING)
    logging.getLogger().addHandler(handler)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            import torch
        except BaseException as e:  # noqa: BLE001 - an import can fail in any way
            out["torch"]["error"] = f"{type(e).__name__}: {e}"
            torch = None
        out["torch"]["import_s"] = round(time.perf_counter() - t0, 3)
        if torch is not None:
            out["torch"].update(_torch_facts(torch))
            t0 = time.perf_counter()
            try:
                import bitsandbytes
                out["bitsandbytes"].update(_bnb_facts(bitsandbytes))
            except BaseException as e:  # noqa: BLE001
                out["bitsandbytes"].update({"loads": False, "error": f"{type(e).__name__}: {e}"})
            out["bitsandbytes"]["import_s"] = round(time.perf_counter() - t0, 3)
    msgs = [f"{w.category.__name__}: {w.message}" for w in caught
            if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    out["warnings"] = list(dict.fromkeys(msgs))[-20:]  # de-duplicated, in order
    out["log"] = tail_lines(log_buf.getvalue(), 40, 4000)
    return out


def _torch_facts(torch) -> dict:
    t: dict = {"imported": True, "version": getattr(torch, "__version__", None)}
    ver = getattr(torch, "version", None)
    t["cuda"] = getattr(ver, "cuda", None)
    t["hip"] = getattr(ver, "hip", None)
    try:
        t["cuda_available"] = bool(torch.cuda.is_available())
    except BaseException as e:  # noqa: BLE001
        t["cuda_available"] = False
        t["error"] = f"torch.cuda.is_available() failed: {type(e).__name__}: {e}"
    try:
        t["device_count"] = int(torch.cuda.device_count())
    except BaseException:  # noqa: BLE001
        t["device_count"] = None
    try:
        t["arch_list"] = list(torch.cuda.get_arch_list())
    except BaseException:  # noqa: BLE001
        t["arch_list"] = None
    devices = []
    if t.get("cuda_available"):
        for i in range(t.get("device_count") or 0):
            d: dict = {"index": i}
            try:
                d["name"] = torch.cuda.get_device_name(i)
                major, minor = torch.cuda.get_device_capability(i)
                d["capability"] = f"{major}.{minor}"
            except BaseException as e:  # noqa: BLE001
                d["error"] = f"{type(e).__name__}: {e}"
            try:
                with torch.cuda.device(i):
                    try:
                        d["bf16_supported"] = bool(torch.cuda.is_bf16_supported(including_emulation=False))
                    except TypeError:  # torch < 2.4 has no including_emulation
                        d["bf16_supported"] = bool(torch.cuda.is_bf16_supported())
            except BaseException as e:  # noqa: BLE001
                d["bf16_error"] = f"{type(e).__name__}: {e}"
            devices.append(d)
    t["devices"] = devices
    t["p2p"] = _peer_access(torch, len(devices)) if len(devices) > 1 else []
    try:
        v = torch.cuda.nccl.version() if t.get("cuda_available") else None
        t["nccl_version"] = ".".join(map(str, v)) if isinstance(v, tuple) else (str(v) if v else None)
    except BaseException:  # noqa: BLE001 - a CPU build, or NCCL missing
        t["nccl_version"] = None
    return t


def _peer_access(torch, n: int) -> list:
    """[[i, j, can i read j's memory directly]] for every ordered pair of CUDA devices (what NCCL's P2P
    transport uses; False means its traffic goes through host memory)."""
    out = []
    for i in range(n):
        for j in range(n):
            if i != j:
                try:
                    out.append([i, j, bool(torch.cuda.can_device_access_peer(i, j))])
                except BaseException:  # noqa: BLE001
                    out.append([i, j, None])
    return out


def _bnb_facts(bnb) -> dict:
    b: dict = {"imported": True, "version": getattr(bnb, "__version__", None)}
    try:
        from bitsandbytes import cextension
    except BaseException as e:  # noqa: BLE001
        return {**b, "loads": False, "error": f"bitsandbytes.cextension: {type(e).__name__}: {e}"}
    lib = getattr(cextension, "lib", None)
    kind = type(lib).__name__ if lib is not None else None
    b["library_class"] = kind
    if lib is None:
        b["loads"] = False
        b["error"] = "bitsandbytes.cextension.lib is None (native library not loaded)"
    elif kind == "ErrorHandlerMockBNBNativeLibrary":
        b["loads"] = False
        b["error"] = str(getattr(lib, "error_msg", "") or getattr(lib, "formatted_error", "") or kind)
        b["error_detail"] = tail_lines(str(getattr(lib, "formatted_error", "")), 40, 4000)
    else:
        b["loads"] = True
        b["compiled_with_cuda"] = bool(getattr(lib, "compiled_with_cuda", False))
        inner = getattr(lib, "_lib", None)
        path = getattr(inner, "_name", None)
        b["library_path"] = path
        if path:
            import os
            import re

            m = re.match(r"^libbitsandbytes_(.+?)\.(?:so|dll|dylib)$", os.path.basename(path))
            b["library"] = m.group(1) if m else os.path.basename(path)
    return b


def run_child(timeout: float) -> dict:
    """Spawn the probe; return the `runtime` section plus the child's payload."""
    from qdoctor.isolate import run_module_function

    res = run_module_function("qdoctor.facts.runtime", "probe", {}, timeout=timeout)
    section = {"ran": True, "cached": False, "duration_s": round(res.duration_s, 3), "status": res.status,
               "error": None, "stderr_tail": tail_lines(res.stderr, 20, 4000),
               "collected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if res.status == "timeout":
        section["error"] = f"importing torch/bitsandbytes did not finish within {timeout:g} s"
    elif res.status == "crash":
        section["error"] = f"the child importing torch/bitsandbytes was killed by {res.signal_name}"
    elif res.payload is None:
        section["error"] = f"the child exited with code {res.returncode} without a result"
    return {"runtime": section, "payload": res.payload}


def in_this_process(torch) -> dict:
    """The torch half of the child's result (as run_child returns it), read from a torch this process has
    already imported: `train --skip-probes` imports torch anyway, so a child importing it again only costs
    seconds. bitsandbytes is left to its static facts (nothing here imports it). Not cached."""
    t0 = time.perf_counter()
    payload = {"torch": _torch_facts(torch), "bitsandbytes": {}}
    section = {"ran": True, "cached": False, "in_process": True, "status": "ok", "error": None,
               "duration_s": round(time.perf_counter() - t0, 3),
               "collected_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return {"runtime": section, "payload": payload}


def merge(facts: dict, result: dict) -> dict:
    """Fold a (fresh or cached) child result into facts; static facts stay where the child said nothing."""
    section = dict(result.get("runtime") or {})
    payload = result.get("payload") or {}
    facts["runtime"] = {**facts.get("runtime", {}), **section}
    t = payload.get("torch") or {}
    torch = facts.setdefault("torch", {})
    if t.get("imported"):
        torch["source"] = "runtime"
        for key in ("cuda_available", "device_count"):
            torch[key] = t.get(key)
        devices = t.get("devices") or []
        torch["devices"] = devices
        if "p2p" in t:
            torch["p2p"] = t["p2p"]
        if t.get("nccl_version"):
            torch["nccl"] = {"version": t["nccl_version"], "source": "torch.cuda.nccl.version() (--deep)"}
        flags = [d.get("bf16_supported") for d in devices if "bf16_supported" in d]
        no_gpu = t.get("cuda_available") is False
        torch["bf16_supported"] = all(flags) if flags else (False if no_gpu else None)
        runtime_arch = t.get("arch_list")
        if runtime_arch:
            torch["runtime_arch_list"] = runtime_arch
            sass, ptx = split_arch_list(runtime_arch)
            if sass:
                torch["arch_list"] = sass
            if ptx:
                torch["ptx"] = by_cc([*(torch.get("ptx") or []), *ptx])
        if t.get("error"):
            torch["error"] = t["error"]
    elif t.get("error"):
        torch["error"] = t["error"]
        torch["source"] = "runtime"
        torch["cuda_available"] = None
    b = payload.get("bitsandbytes") or {}
    bnb = facts.setdefault("bitsandbytes", {})
    if "loads" in b:
        bnb["loads"] = b["loads"]
        bnb["error"] = b.get("error") if not b["loads"] else bnb.get("error")
        for key in ("library", "library_class", "library_path", "compiled_with_cuda", "error_detail"):
            if key in b:
                bnb[key] = b[key]
        bnb["source"] = "runtime"
    if payload.get("warnings") or payload.get("log"):
        facts["runtime"]["warnings"] = payload.get("warnings") or []
        facts["runtime"]["log"] = payload.get("log") or ""
    return facts


_early: dict = {}  # the child start_early() began: {"thread": Thread, "result": run_child's dict or None}


def start_early(timeout: float, in_process: bool = False) -> None:
    """Begin the deep child now, in a background thread, when a deep collect will follow in this process:
    `train` imports torch, transformers and peft meanwhile (on a fresh H200 machine the child took 12.3 s
    and this process's imports longer; bench/NOTES.md). deep() waits for this child instead of starting
    another. Nothing is spawned where the deep collect would not spawn one: a fresh cached result, or
    `in_process` (train --skip-probes) on a machine without a GPU."""
    if "thread" in _early:
        return
    import threading

    def go():
        from qdoctor.facts import _gpu_visible, collect

        facts = collect()
        if facts["runtime"].get("cached"):
            return
        no_gpu = not facts["torch"].get("cuda") or _gpu_visible(facts["nvidia"]) is False
        if in_process and no_gpu:
            return
        _early["result"] = run_child(timeout)

    t = threading.Thread(target=go, daemon=True, name="qdoctor-deep-facts")
    _early["thread"] = t
    t.start()


def _take_early(timeout: float) -> dict | None:
    t = _early.pop("thread", None)
    if t is None:
        return None
    t.join(timeout + 30)
    return _early.pop("result", None)


def deep(facts: dict, timeout: float) -> dict:
    """Run the child (or take the one start_early began), cache its result under the environment
    fingerprint, merge it."""
    result = _take_early(timeout) or run_child(timeout)
    if result["runtime"]["status"] == "ok" and result.get("payload") is not None:
        cache.store(CACHE_KIND, cache.fingerprint(facts), result)
    return merge(facts, result)


def from_cache(facts: dict) -> dict:
    """Merge a fresh cached deep result for this exact environment, if there is one (runtime.cached)."""
    hit = cache.load(CACHE_KIND, cache.fingerprint(facts), max_age_s=MAX_AGE_S)
    if not isinstance(hit, dict) or not isinstance(hit.get("runtime"), dict):
        return facts
    hit = {**hit, "runtime": {**hit["runtime"], "cached": True}}
    return merge(facts, hit)
