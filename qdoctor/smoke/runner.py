"""Run probes, each in its own process, and turn what came back into ProbeResults.

Two isolation back-ends share one protocol:
- fork (default on Linux): a fork server imports torch/transformers/peft once (bitsandbytes too on
  CPU) and forks a fresh process per probe. Importing the stack costs ~10 s on the 2-core CPU
  machine and each probe under 1 s, so paying the import once is what makes the suite fast.
- spawn: one `python` per probe through qdoctor.isolate (a fallback: the fork server died while
  importing, CUDA got initialised before a fork, or QDOCTOR_SMOKE_ISOLATION=spawn).
Either way a probe is the leader of its own process group, killed with everything it spawned on
timeout, and a crash or hang of one probe never stops the others.
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
from collections.abc import Callable

from qdoctor.isolate import tail_lines
from qdoctor.redact import redact
from qdoctor.smoke import known_failures, verdict
from qdoctor.smoke.registry import ORDER, PROBES
from qdoctor.smoke.result import ProbeResult

INJECT_ENV = "QDOCTOR_SMOKE_INJECT"
ISOLATION_ENV = "QDOCTOR_SMOKE_ISOLATION"
PRELOAD_BNB_ENV = "QDOCTOR_SMOKE_PRELOAD_BNB"  # "1", "0" or "nvml" (default on CUDA)
PRELOAD_EXTRAS_ENV = "QDOCTOR_SMOKE_PRELOAD_EXTRAS"  # "1"/"0": preload modeling_llama and torch._dynamo
INJECTIONS = ("abort", "hang", "wrong", "raise", "killserver")
CUDA_FORK_ERRORS = ("Cannot re-initialize CUDA in forked subprocess", "CUDA_ERROR_NOT_INITIALIZED",
                    "initialization error")


class ProbeUsageError(ValueError):
    """Bad probe name, device or injection: a one-line message for the user (exit 2)."""


# ---------------------------------------------------------------- pure helpers (tested on recorded facts)

def parse_inject(spec: str | None) -> dict[str, str]:
    """'nf4=abort,lora_step=hang' -> {'nf4': 'abort', 'lora_step': 'hang'}."""
    out = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, _, kind = part.partition("=")
        name, kind = name.strip(), kind.strip()
        if name not in PROBES or kind not in INJECTIONS:
            raise ProbeUsageError(f"bad fault injection {part.strip()!r} "
                                  f"(use probe=one of {', '.join(INJECTIONS)})")
        out[name] = kind
    return out


def select_probes(names) -> list[str]:
    if not names:
        return [p.name for p in ORDER]
    bad = [n for n in names if n not in PROBES]
    if bad:
        raise ProbeUsageError(f"unknown probe {bad[0]!r} (choose from {', '.join(PROBES)})")
    return [p.name for p in ORDER if p.name in set(names)]


def visible_gpu_count(facts: dict | None) -> int | None:
    """GPUs a CUDA program here would see, or None when the facts cannot tell: torch's own count
    when --deep ran, else NVML's GPUs filtered by CUDA_VISIBLE_DEVICES (the rules' reading)."""
    from qdoctor.rules.common import visible_gpus

    if not facts:
        return None
    t = facts.get("torch") or {}
    if isinstance(t.get("device_count"), int):
        return t["device_count"]
    if (facts.get("nvidia") or {}).get("gpus") is None:
        return None
    return len(visible_gpus(facts))


def cuda_usable(facts: dict | None) -> bool:
    if not facts:
        return False
    t = facts.get("torch") or {}
    if t.get("cuda_available") is False:
        return False
    return bool(t.get("cuda")) and bool(visible_gpu_count(facts))


def default_device(facts: dict | None) -> str:
    return "cuda:0" if cuda_usable(facts) else "cpu"


def parse_device(device: str | None, facts: dict | None) -> str:
    """'cpu' | 'cuda' | 'cuda:N' checked against what the facts say is here."""
    if device is None:
        return default_device(facts)
    d = device.strip().lower()
    if d == "cpu":
        return "cpu"
    if d == "cuda":
        d = "cuda:0"
    if not d.startswith("cuda:") or not d[5:].isdigit():
        raise ProbeUsageError(f"bad --device {device!r} (use cpu or cuda:N)")
    idx = int(d[5:])
    if facts:
        t = facts.get("torch") or {}
        if t.get("installed") is not False and t.get("version") and not t.get("cuda") and not t.get("hip"):
            raise ProbeUsageError(f"--device {d}: torch {t.get('version')} here is a CPU-only build")
        n = visible_gpu_count(facts)
        if n is not None and idx >= n:
            raise ProbeUsageError(f"--device {d}: no such device ({n} CUDA device{'s' * (n != 1)} visible)")
    return d


def _installed(facts: dict | None, dist: str) -> bool | None:
    if not facts:
        return None
    sec = facts.get(dist)
    if isinstance(sec, dict) and isinstance(sec.get("installed"), bool):
        return sec["installed"]
    pk = facts.get("packages") or {}
    if not pk:
        return None
    return dist in pk


def static_skip(probe: str, facts: dict | None, device: str) -> str | None:
    """Why the fast check says this probe cannot apply here, or None."""
    p = PROBES[probe]
    for dist in p.needs:
        if _installed(facts, dist) is False:
            return f"{dist} is not installed (`pip install {dist}`)"
    return None


def dependency_skip(probe: str, done: dict[str, ProbeResult]) -> str | None:
    """Why an earlier probe's result makes this one pointless, or None."""
    p = PROBES[probe]
    imp = done.get("imports")
    if imp is not None and probe != "imports":
        if imp.status in ("crash", "timeout"):
            return f"the imports probe {'crashed' if imp.status == 'crash' else 'timed out'}"
        m = imp.measurements
        for dist in p.needs:
            if m.get(f"{dist}_ok") is False:
                return f"{dist} did not import (imports probe)"
        if "bitsandbytes" in p.needs and m.get("bnb_native_loaded") is False:
            return "bitsandbytes' native library did not load (imports probe)"
    dev = done.get("device")
    if p.after_device and dev is not None and dev.status in ("fail", "crash", "timeout"):
        verb = {"fail": "failed", "crash": "crashed", "timeout": "timed out"}[dev.status]
        return f"the device probe {verb}"
    return None


def build_result(probe: str, raw: dict, matrix: dict) -> ProbeResult:
    """Turn what a probe process left (raw) into a judged ProbeResult.

    raw: {"kind": ok|crash|timeout|error, payload, signal, returncode, output_tail, duration_s, maxrss_mib}.
    """
    payload = raw.get("payload") or {}
    tail = raw.get("output_tail") or ""
    m = payload.get("measurements") or {}
    r = ProbeResult(probe, "pass", duration_s=round(float(raw.get("duration_s") or 0.0), 3),
                    peak_memory_mib=payload.get("peak_rss_mib") or raw.get("maxrss_mib"),
                    peak_cuda_mib=payload.get("peak_cuda_mib"), measurements=m)
    if r.peak_memory_mib is not None:
        r.peak_memory_mib = round(r.peak_memory_mib, 1)
    if r.peak_cuda_mib is not None:
        r.peak_cuda_mib = round(r.peak_cuda_mib, 1)
    kind = raw.get("kind")
    if kind == "timeout":
        r.status = "timeout"
        r.reason = f"no result within {raw.get('timeout', '?')} s; its process group was killed"
        r.error = tail_lines(tail, 30) or None
    elif kind == "crash" or (kind == "error" and not payload):
        sig = raw.get("signal")
        r.status = "crash"
        if sig:
            r.reason = f"the probe process was killed by {sig}"
        elif raw.get("returncode") is not None:
            r.reason = f"the probe process exited with code {raw.get('returncode')} without a result"
        else:
            r.reason = (tail.strip().splitlines() or ["the probe process ended without a result"])[-1][:300]
        r.error = tail_lines(tail, 30) or None
    elif payload.get("error"):
        r.status = "fail"
        first = payload["error"].strip().splitlines()[-1]
        r.reason = f"raised {first[:300]}"
        r.error = tail_lines(payload["error"] + ("\n" + tail if tail else ""), 40)
    elif payload.get("skip"):
        r.status, r.reason = "skip", payload["skip"]
    else:
        fails = verdict.failures(probe, m, matrix.get("smoke_bands", {}))
        r.failed_checks = [line for _, line in fails]
        r.failed_keys = [key for key, _ in fails]
        if r.failed_checks:
            more = len(r.failed_checks) - 1
            r.status = "fail"
            r.reason = r.failed_checks[0].split(" (")[0] + (f" (+{more} more)" if more else "")
    if r.status != "pass":
        errors = probe_errors(m)
        if errors and not r.error:
            r.error = "\n".join(errors)  # the real exception text behind "peft_ok = False"
        text = "\n".join(x for x in (r.error, tail, *errors, "\n".join(m.get("logs") or [])) if x)
        kf = known_failures.match(text, matrix)
        r.finding = kf.to_dict() if kf else None
    if r.error:
        r.error = redact(r.error)
    return r


def probe_errors(m: dict) -> list[str]:
    """Exception texts a probe recorded in its measurements: `*_error` values, and the import errors of the
    imports probe (modules.<name>.error), each as '<module>: <error>'."""
    out = [v for k, v in m.items() if k.endswith("_error") and isinstance(v, str) and v]
    for name, rec in (m.get("modules") or {}).items():
        if isinstance(rec, dict) and not rec.get("ok") and isinstance(rec.get("error"), str):
            out.append(f"{name}: {rec['error']}")
    return out


def skipped(probe: str, reason: str) -> ProbeResult:
    return ProbeResult(probe, "skip", reason=reason)


# ---------------------------------------------------------------- back-ends

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


def _orphaned(running: dict, backend, kind: str, why: str) -> list[dict]:
    """Raw results for the probes a dead or stuck back-end still owed."""
    return [{"id": rid, "probe": name, "kind": kind, "payload": None, "signal": None, "returncode": None,
             "output_tail": why, "duration_s": time.monotonic() - t0, "timeout": None}
            for rid, (name, b, t0) in running.items() if b is backend]


def default_jobs() -> int:
    """Probes in flight at once: 1 on small machines (2 cores: imports are shared anyway); on a big
    machine all eight at once (on CUDA each probe child imports bitsandbytes and peft itself, ~4 s
    on the H200, so overlapping them is what keeps the suite under 20 s there)."""
    n = os.cpu_count() or 1
    return 1 if n < 8 else min(8, n // 2)


# ---------------------------------------------------------------- orchestration

def run_probes(names: list[str] | None, device: str, timeout: float, facts: dict | None = None, *,
               compute_dtype: str | None = None, inject: dict | str | None = None, jobs: int | None = None,
               isolation: str | None = None, progress: Callable | None = None,
               matrix: dict | None = None) -> list[ProbeResult]:
    """Run the named probes (all when None) on `device`; each in its own process, `timeout` s each.

    `facts` (a qdoctor.facts snapshot) lets probes that cannot apply be skipped up front. Raises
    ProbeUsageError for a bad name, device or injection; never raises for what a probe does.
    """
    from qdoctor import matrix as matrix_mod

    mx = matrix if matrix is not None else matrix_mod.load()
    order = select_probes(names)
    device = parse_device(device, facts)
    inj = parse_inject(inject) if isinstance(inject, str) or inject is None else dict(inject)
    if inject is None:
        inj = parse_inject(os.environ.get(INJECT_ENV))
    jobs = jobs or default_jobs()
    isolation = isolation or os.environ.get(ISOLATION_ENV) or ("fork" if hasattr(os, "fork") else "spawn")
    if isolation not in ("fork", "spawn"):
        raise ProbeUsageError(f"bad isolation {isolation!r} (fork or spawn)")
    note = progress or (lambda *a: None)

    done: dict[str, ProbeResult] = {}
    pending = list(order)
    for name in list(pending):
        why = static_skip(name, facts, device)
        if why:
            done[name] = skipped(name, why)
            pending.remove(name)
            note("done", name, done[name])

    backend, fallback_note = None, None
    to_run = [n for n in pending]
    if to_run and isolation == "fork":
        try:
            backend = ForkBackend(device, start_timeout=max(timeout, 30.0))
            if backend.ready.get("cuda_initialized"):
                backend.close()
                backend, fallback_note = None, "CUDA was initialised while importing; probes were spawned"
        except ForkServerFailed as e:
            backend, fallback_note = None, f"fork server failed ({e}); probes were spawned"
        except OSError as e:
            backend, fallback_note = None, f"fork server could not start ({e}); probes were spawned"
    spawn = SpawnBackend()
    fork = backend
    if backend is None:
        backend = spawn

    running: dict[int, tuple[str, object]] = {}
    rid = 0
    retried: set[str] = set()
    try:
        while pending or running:
            # launch what is ready: its dependencies have finished
            for name in list(pending):
                if len(running) >= jobs:
                    break
                # device needs only torch, so it runs beside imports; the rest wait for both, unless
                # there are cores enough to run every probe at once (then a failed imports probe
                # shows up in each probe's own result instead of as a skip)
                deps = [] if name == "device" or jobs >= len(order) else [
                    d for d in ("imports", "device") if d in order and d != name]
                if any(d not in done for d in deps):
                    continue
                why = dependency_skip(name, done)
                pending.remove(name)
                if why:
                    done[name] = skipped(name, why)
                    note("done", name, done[name])
                    continue
                rid += 1
                ctx = {"device": device, "compute_dtype": compute_dtype, "inject": inj.get(name)}
                backend.start(rid, name, ctx, timeout)
                running[rid] = (name, backend, time.monotonic())
                note("start", name, None)
            if not running:
                continue
            events = []
            for b in {id(b): b for _, b, _ in running.values()}.values():
                try:
                    events += b.wait(0.05 if len(running) > 1 else 0.5)
                except ForkServerFailed as e:  # the server died under its probes: they count as crashed
                    events += _orphaned(running, b, "crash", f"{e}; the probe's result was lost")
                    b.close()
                    backend = spawn
                    continue
                # the fork server enforces timeouts; if it is itself stuck, the parent does
                late = [rid_ for rid_, (_, b_, t0) in running.items()
                        if b_ is b and b is not spawn and time.monotonic() - t0 > timeout + 30]
                if late:
                    events += _orphaned(running, b, "timeout", "the fork server stopped answering")
                    b.close()
                    backend = spawn
            for ev in events:
                name, b, _ = running.pop(ev["id"])
                r = build_result(name, ev, mx)
                tail = (ev.get("output_tail") or "") + str((ev.get("payload") or {}).get("error") or "")
                forked_cuda = b is not spawn and device.startswith("cuda")
                if (forked_cuda and r.status != "pass" and name not in retried
                        and any(s in tail for s in CUDA_FORK_ERRORS)):
                    retried.add(name)  # the fork server's CUDA state leaked: run it spawned instead
                    rid += 1
                    spawn.start(rid, name, {"device": device, "compute_dtype": compute_dtype,
                                            "inject": inj.get(name)}, timeout)
                    running[rid] = (name, spawn, time.monotonic())
                    continue
                if name == "imports" and b is not spawn and isinstance(b, ForkBackend):
                    r.duration_s = round(r.duration_s + b.preload_s, 3)
                    r.measurements["shared_import_s"] = b.preload_s
                r.measurements.setdefault("isolation", "spawn" if b is spawn else "fork")
                done[name] = r
                note("done", name, r)
    finally:
        if fork is not None:
            fork.close()
        spawn.close()
    results = [done[n] for n in order]
    if fallback_note:
        for r in results:
            if r.status != "skip":
                r.measurements.setdefault("isolation_note", fallback_note)
    return results
