"""Run one probe inside its own process (forked by the fork server, or spawned): the probe's wrapper.

Measures time and peak memory, applies fault injection, turns an exception into an error text.
Never imported by the parent with torch loaded: probe modules import torch themselves.
"""

from __future__ import annotations

import importlib
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

SLEEPER_MARK = "qdoctor-smoke-inject-sleeper"
_KEEP: list = []  # the injected sleeper's Popen, kept so that it is never garbage-collected with a warning


def _inject_before(inject: str | None) -> None:
    if inject == "abort":
        sys.stderr.write("qdoctor smoke: injected abort\n")
        sys.stderr.flush()
        os.abort()
    if inject == "hang":
        # a grandchild that would outlive us if the runner did not kill the whole process group
        mark = os.environ.get("QDOCTOR_SMOKE_MARK", SLEEPER_MARK)
        _KEEP.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)", mark],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        sys.stderr.write("qdoctor smoke: injected hang\n")
        sys.stderr.flush()
        while True:
            time.sleep(60)
    if inject == "killserver":  # the fork server dies under a running probe
        import signal

        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(30)
    if inject == "raise":
        raise RuntimeError("qdoctor smoke: injected error")


def run_one(probe: str, target: str, ctx: dict) -> dict:
    """The payload the parent turns into a ProbeResult."""
    from qdoctor.smoke.probes.ctx import Ctx

    if ctx.get("inject") in ("abort", "hang", "killserver"):
        # these never return: they test the runner's isolation, which needs nothing imported, and a
        # spawned probe must not spend its timeout importing torch first
        _inject_before(ctx["inject"])
    try:  # torch may be what is broken: the imports probe must still report it
        import torch

        # The probes are tiny: one CPU thread is as fast, and immune to OpenMP spinning on a busy machine.
        torch.set_num_threads(1)
    except BaseException:
        torch = None

    t0 = time.perf_counter()
    c = Ctx(**ctx)
    workdir = tempfile.mkdtemp(prefix=f"qdoctor-smoke-{probe}-")
    c.workdir = workdir
    out: dict = {"probe": probe, "measurements": {}, "error": None}
    try:
        _inject_before(c.inject)
        mod_name, func = target.split(":")
        res = getattr(importlib.import_module(mod_name), func)(c) or {}
        out["measurements"] = res.get("measurements", {})
        out["skip"] = res.get("skip")
    except BaseException as e:  # the probe's failure is the result
        out["error"] = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-6000:]
        out["error_type"] = type(e).__name__
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    out["duration_s"] = time.perf_counter() - t0
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        from qdoctor.smoke.probes.common import peak_cuda_mib

        out["peak_cuda_mib"] = peak_cuda_mib(c.device) if torch is not None else None
    except BaseException:
        out["peak_cuda_mib"] = None
    return out
