"""The two ways a probe gets its own process; both answer the scheduler (qdoctor.smoke.runner) alike.

- ForkBackend (default on Linux): a fork server imports torch/transformers/peft once (bitsandbytes too
  on CPU) and forks a fresh process per probe. Importing the stack costs ~10 s on the 2-core CPU
  machine and each probe under 1 s, so paying the import once is what makes the suite fast.
- SpawnBackend: one `python` per probe through qdoctor.isolate (a fallback: the fork server died
  while importing, CUDA got initialised before a fork, or QDOCTOR_SMOKE_ISOLATION=spawn).
Protocol: start(rid, probe, ctx, timeout); wait(timeout) -> raw results ({"id", "probe", "kind":
ok|crash|timeout|error, "payload", "signal", "returncode", "output_tail", "duration_s", "timeout"});
close(). Either way a probe leads its own process group, killed with everything it spawned on timeout.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time

from qdoctor.smoke.registry import PROBES

PRELOAD_BNB_ENV = "QDOCTOR_SMOKE_PRELOAD_BNB"  # "1", "0" or "nvml" (default on CUDA)
PRELOAD_EXTRAS_ENV = "QDOCTOR_SMOKE_PRELOAD_EXTRAS"  # "1"/"0": preload modeling_llama and torch._dynamo


class SpawnBackend:
    """One `python` per probe via qdoctor.isolate, run in threads so up to `jobs` overlap."""

    name = "spawn"

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self.threads: list[threading.Thread] = []

    def start(self, rid: int, probe: str, ctx: dict, timeout: float) -> None:
        from qdoctor.isolate import run_module_function

        def work():
            cr = run_module_function("qdoctor.smoke.child", "run_one",
                                     {"probe": probe, "target": PROBES[probe].target, "ctx": ctx}, timeout)
            kind = {"ok": "ok", "error": "error", "crash": "crash", "timeout": "timeout"}[cr.status]
            self.q.put({"id": rid, "probe": probe, "kind": kind, "payload": cr.payload,
                        "signal": cr.signal_name, "returncode": cr.returncode,
                        "output_tail": cr.stderr[-6000:], "duration_s": cr.duration_s, "timeout": timeout})

        t = threading.Thread(target=work, daemon=True)
        t.start()
        self.threads.append(t)

    def wait(self, timeout: float) -> list[dict]:
        try:
            out = [self.q.get(timeout=timeout)]
        except queue.Empty:
            return []
        while not self.q.empty():
            out.append(self.q.get_nowait())
        return out

    def close(self) -> None:
        for t in self.threads:
            t.join(timeout=5)


class ForkServerFailed(RuntimeError):
    pass


class ForkBackend:
    """The fork server (qdoctor.smoke.forkserver) as a child process; see its docstring."""

    name = "fork"

    def __init__(self, device: str, start_timeout: float):
        r, w = os.pipe()
        env = dict(os.environ)
        env["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # torch.cuda.is_available() without initialising CUDA
        env.setdefault("PYTHONWARNINGS", "default")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # On CUDA bitsandbytes is imported without creating a CUDA context (NVML answers its
        # capability query); if that cannot be done, each probe imports it, and then preloading the
        # heavy submodules only delays every probe, since CUDA probes run side by side.
        preload_bnb = os.environ.get(PRELOAD_BNB_ENV, "nvml" if device.startswith("cuda") else "1")
        extras = os.environ.get(PRELOAD_EXTRAS_ENV, "0" if preload_bnb == "0" else "1")
        # the server's own output goes to a file: a pipe nobody reads could fill up and block it
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-m", "qdoctor.smoke.forkserver", str(w), preload_bnb,
                                      extras],
                                     stdin=subprocess.PIPE, stdout=self.log, stderr=self.log,
                                     pass_fds=(w,), env=env, start_new_session=True)
        os.close(w)
        self.events = os.fdopen(r, "rb", buffering=0)
        self.buf = b""
        self.pgids: set[int] = set()
        self.timeouts: dict[int, float] = {}
        self.ready = self._wait_ready(start_timeout)
        self.preload_s = float(self.ready.get("preload", {}).get("seconds") or 0.0)

    def _lines(self, timeout: float) -> list[dict]:
        out = []
        r, _, _ = select.select([self.events], [], [], max(0.0, timeout))
        if r:
            chunk = os.read(self.events.fileno(), 1 << 20)
            if not chunk:
                raise ForkServerFailed("the fork server exited")
            self.buf += chunk
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                out.append(json.loads(line))
        return out

    def _wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for ev in self._lines(min(0.5, deadline - time.monotonic())):
                    if ev.get("event") == "ready":
                        return ev
            raise ForkServerFailed(f"the fork server did not finish importing within {timeout:.0f} s")
        except ForkServerFailed as e:
            self.close(keep_log=True)
            self.log.seek(0, 2)
            self.log.seek(max(0, self.log.tell() - 2000))
            tail = self.log.read().decode("utf-8", "replace").strip().splitlines()[-1:]
            self.log.close()
            raise ForkServerFailed(f"{e}{': ' + tail[0] if tail else ''}") from None

    def start(self, rid: int, probe: str, ctx: dict, timeout: float) -> None:
        cmd = {"cmd": "run", "id": rid, "probe": probe, "target": PROBES[probe].target, "ctx": ctx,
               "timeout": timeout}
        self.timeouts[rid] = timeout
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> list[dict]:
        done = []
        for ev in self._lines(timeout):
            if ev.get("event") == "started":
                self.pgids.add(int(ev["pid"]))
            elif ev.get("event") == "done":
                kind = "timeout" if ev.get("timed_out") else ("crash" if ev.get("signal") else (
                    "ok" if ev.get("returncode") == 0 else "error"))
                ev.update(kind=kind, timeout=self.timeouts.get(ev["id"]))
                done.append(ev)
        return done

    def close(self, keep_log: bool = False) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(b'{"cmd": "exit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=5)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        for pg in [self.proc.pid, *self.pgids]:  # the server's group and every probe's group
            with contextlib.suppress(OSError):
                os.killpg(pg, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        for f in (self.proc.stdin, self.events) + (() if keep_log else (self.log,)):
            with contextlib.suppress(OSError, ValueError):
                f.close()


def orphaned(owed: dict[int, tuple[str, float]], kind: str, why: str) -> list[dict]:
    """Raw results for the probes ({rid: (probe, start time)}) a dead or stuck back-end still owed."""
    return [{"id": rid, "probe": name, "kind": kind, "payload": None, "signal": None, "returncode": None,
             "output_tail": why, "duration_s": time.monotonic() - t0, "timeout": None}
            for rid, (name, t0) in owed.items()]
