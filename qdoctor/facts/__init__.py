"""Observe: collect a JSON-serialisable snapshot of this machine (schema `qdoctor.facts/1`).

Never imports torch, bitsandbytes, transformers or peft in this process: packages, the torch build
and the bitsandbytes libraries are read from files; what needs an import runs in a child
(`deep=True`, see runtime.py). Each collector runs isolated and timed: one that fails or hangs
leaves its section empty (nulls) and an entry in facts["collectors"], and never hides the others.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from qdoctor import __version__
from qdoctor.facts.schema import empty

NVML_TIMEOUT_S = 10.0  # NVML can block on a wedged driver; the rest of the snapshot must still come back


def _timed(facts: dict, name: str, fn, default=None):
    """Run one collector; record ok/duration/error; return its value (or `default` on failure)."""
    t0 = time.perf_counter()
    try:
        val = fn()
        facts["collectors"][name] = {"ok": True, "duration_ms": round((time.perf_counter() - t0) * 1000, 2),
                                     "error": None}
        return val
    except Exception as e:  # a collector bug is a fact, not a crash
        facts["collectors"][name] = {"ok": False, "duration_ms": round((time.perf_counter() - t0) * 1000, 2),
                                     "error": f"{type(e).__name__}: {e}"}
        return default


class _Thread(threading.Thread):
    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error, self.t0, self.t1 = fn, None, None, 0.0, None

    def run(self):
        self.t0 = time.perf_counter()
        try:
            self.result = self.fn()
        except Exception as e:
            self.error = e
        self.t1 = time.perf_counter()


def _gpu_visible(nvidia: dict) -> bool | None:
    """Can torch see a GPU, as far as NVML and CUDA_VISIBLE_DEVICES tell? None = cannot say."""
    status = nvidia.get("status")
    if status in ("no-driver", "no-gpu") or nvidia.get("driver_installed") is False:
        return False
    if status != "ok":
        return None
    return any(g.get("visible", True) for g in nvidia.get("gpus") or [])


def _highest_cc(nvidia: dict) -> str | None:
    from qdoctor.arch import highest

    return highest(g.get("compute_capability") for g in nvidia.get("gpus") or [] if g.get("visible", True))


def collect(deep: bool = False, timeout: float = 60.0, *, paths=None, environ=None, nvml=None,
            use_cache: bool = True, refresh: bool = False, progress=None, in_process: bool = False) -> dict:
    """The facts snapshot of this machine.

    deep: also import torch/bitsandbytes in a child (timeout seconds) and cache that result. A fresh
    cached result for the same environment fingerprint (cache.fingerprint) is merged instead of
    spawning a child (runtime.cached = true), by a plain collect too; refresh=True always re-runs it.
    paths/environ/nvml: what to observe instead of sys.path / os.environ / pynvml (tests inject these).
    progress: called with a one-line notice before the slow step (the deep child), if it runs.
    in_process: deep, without a child, when this process has imported torch already (`train --skip-probes`,
    which imports it anyway) and no GPU is there to be touched (on a GPU, reading every device's properties
    would leave a CUDA context, and its memory, on each of them in this long-lived process): torch's half read
    here, bitsandbytes left to its static facts, nothing cached.
    """
    from qdoctor.facts import (
        bnb,
        bytecode,
        driver,
        env,
        extensions,
        libsearch,
        native,
        nvidia,
        packages,
        platform,
        runtime,
        torch_build,
    )

    environ = os.environ if environ is None else environ
    facts = empty()
    facts["qdoctor_version"] = __version__
    facts["collected_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    # NVML may take a while (driver init) and releases the GIL: run it beside the file readers.
    nv_thread = _Thread(lambda: nvidia.collect(nvml=nvml, environ=environ))
    nv_thread.start()

    facts["platform"] = _timed(facts, "platform", lambda: platform.collect(environ), {})
    facts["env"] = _timed(facts, "env", lambda: env.collect(environ), {})
    pk = _timed(facts, "packages", lambda: packages.collect(paths, use_cache=use_cache), None)
    if pk:
        facts["packages"], facts["conflicts"], facts["requirements"] = (
            pk["packages"], pk["conflicts"], pk["requirements"])
    facts["torch"] = _timed(facts, "torch", lambda: torch_build.collect(paths, facts["packages"]),
                            {"installed": None, "version": None, "cuda": None, "hip": None, "arch_list": None,
                             "error": "the torch collector failed", "source": "static"})
    b = _timed(facts, "bitsandbytes", lambda: bnb.collect(paths, facts["packages"], environ), None)
    facts["bitsandbytes"] = b or {"installed": None, "version": facts["packages"].get("bitsandbytes"),
                                  "binaries": {}, "selected": None, "loads": None,
                                  "error": "the bitsandbytes collector failed"}

    facts["driver"] = _timed(facts, "driver", lambda: driver.collect(libsearch.ld_cache()), {})
    facts["native"] = _timed(facts, "native", lambda: native.collect(environ, paths=paths), {})
    facts["extensions"] = _timed(facts, "extensions",
                                 lambda: extensions.collect(paths, facts["torch"].get("path")), {})
    facts["bytecode"] = _timed(facts, "bytecode", lambda: bytecode.collect(paths, environ), {})

    nv_thread.join(NVML_TIMEOUT_S)
    if nv_thread.is_alive():
        facts["nvidia"] = {"status": "error", "error": f"NVML did not answer within {NVML_TIMEOUT_S:g} s",
                           "driver": None, "cuda_driver": None, "gpus": []}
        facts["collectors"]["nvidia"] = {"ok": False, "duration_ms": NVML_TIMEOUT_S * 1000,
                                         "error": "timed out"}
    else:
        ok = nv_thread.error is None
        facts["nvidia"] = nv_thread.result if ok else {"status": "error", "error": f"collector failed: "
                                                       f"{type(nv_thread.error).__name__}: {nv_thread.error}",
                                                       "driver": None, "cuda_driver": None, "gpus": []}
        facts["collectors"]["nvidia"] = {"ok": ok, "duration_ms": round(((nv_thread.t1 or nv_thread.t0)
                                                                        - nv_thread.t0) * 1000, 2),
                                         "error": None if ok else f"{type(nv_thread.error).__name__}: "
                                                                  f"{nv_thread.error}"}

    facts["runtime"] = {"ran": False, "cached": False, "duration_s": None, "status": None, "error": None}
    if use_cache and paths is None and not (deep and refresh):
        _timed(facts, "runtime_cache", lambda: runtime.from_cache(facts))
    no_gpu = not facts["torch"].get("cuda") or _gpu_visible(facts["nvidia"]) is False
    if deep and not facts["runtime"].get("cached") and in_process and no_gpu and "torch" in sys.modules:
        _timed(facts, "runtime", lambda: runtime.merge(facts, runtime.in_this_process(sys.modules["torch"])))
    elif deep and not facts["runtime"].get("cached"):
        if progress:
            progress(f"importing torch and bitsandbytes in a child process (--deep, at most {timeout:g} s)")
        _timed(facts, "runtime", lambda: runtime.deep(facts, timeout))

    def select():
        cuda_available = facts["torch"].get("cuda_available")
        if cuda_available is None:
            cuda_available = _gpu_visible(facts["nvidia"])
        return bnb.select(facts["bitsandbytes"], facts["torch"], environ, cuda_available=cuda_available,
                          highest_cc=_highest_cc(facts["nvidia"]))

    if b:
        facts["bitsandbytes"] = _timed(facts, "bitsandbytes_selection", select, facts["bitsandbytes"])
    return facts
