"""Run probes, each in its own process, and turn what came back into ProbeResults.

`run_probes` checks its arguments, skips what cannot apply, opens the back-ends (qdoctor.smoke.backends:
a fork server, and spawn as the fallback) and hands the rest to a `Scheduler`, which starts each probe
once its dependencies are done, collects raw results, and turns them into judged ProbeResults. A crash
or hang of one probe never stops the others.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from qdoctor import devices
from qdoctor.isolate import tail_lines
from qdoctor.redact import redact
from qdoctor.smoke import known_failures, verdict
from qdoctor.smoke.backends import ForkBackend, ForkServerFailed, SpawnBackend, orphaned
from qdoctor.smoke.registry import ORDER, PROBES
from qdoctor.smoke.result import ProbeResult

INJECT_ENV = "QDOCTOR_SMOKE_INJECT"
ISOLATION_ENV = "QDOCTOR_SMOKE_ISOLATION"
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


def default_jobs() -> int:
    """Probes in flight at once: 1 on small machines (2 cores: imports are shared anyway); on a big
    machine all eight at once (on CUDA each probe child imports bitsandbytes and peft itself, ~4 s
    on the H200, so overlapping them is what keeps the suite under 20 s there)."""
    n = os.cpu_count() or 1
    return 1 if n < 8 else min(8, n // 2)


# ---------------------------------------------------------------- scheduling

def open_backends(isolation: str, device: str, timeout: float):
    """(fork back-end or None, spawn back-end, note): the fork server when asked for and usable."""
    fork, why = None, None
    if isolation == "fork":
        try:
            fork = ForkBackend(device, start_timeout=max(timeout, 30.0))
            if fork.ready.get("cuda_initialized"):
                fork.close()
                fork, why = None, "CUDA was initialised while importing; probes were spawned"
        except ForkServerFailed as e:
            why = f"fork server failed ({e}); probes were spawned"
        except OSError as e:
            why = f"fork server could not start ({e}); probes were spawned"
    return fork, SpawnBackend(), why


class Scheduler:
    """Starts probes as their dependencies finish, at most `jobs` at a time, on the preferred back-end
    (spawn once the fork server is gone), and judges each raw result as it arrives."""

    def __init__(self, order, pending, done, *, device, timeout, jobs, inject, compute_dtype, matrix,
                 fork, spawn, note):
        self.order, self.pending, self.done = order, list(pending), done
        self.device, self.timeout, self.jobs, self.inject = device, timeout, jobs, inject
        self.compute_dtype, self.matrix, self.note = compute_dtype, matrix, note
        self.spawn = spawn
        self.backend = fork or spawn  # where new probes start
        self.running: dict[int, tuple[str, object, float]] = {}
        self.rid = 0
        self.retried: set[str] = set()

    def run(self) -> None:
        while self.pending or self.running:
            self.launch_ready()
            if self.running:
                for ev in self.collect():
                    self.finish(ev)

    # -- launching
    def _deps(self, name: str) -> list[str]:
        # device needs only torch, so it runs beside imports; the rest wait for both, unless there are
        # cores enough to run every probe at once (then a failed imports probe shows up in each
        # probe's own result instead of as a skip)
        if name == "device" or self.jobs >= len(self.order):
            return []
        return [d for d in ("imports", "device") if d in self.order and d != name]

    def launch_ready(self) -> None:
        for name in list(self.pending):
            if len(self.running) >= self.jobs:
                break
            if any(d not in self.done for d in self._deps(name)):
                continue
            self.pending.remove(name)
            why = dependency_skip(name, self.done)
            if why:
                self.record(name, skipped(name, why))
                continue
            self.start(name, self.backend)
            self.note("start", name, None)

    def start(self, name: str, backend) -> None:
        self.rid += 1
        ctx = {"device": self.device, "compute_dtype": self.compute_dtype, "inject": self.inject.get(name)}
        backend.start(self.rid, name, ctx, self.timeout)
        self.running[self.rid] = (name, backend, time.monotonic())

    # -- collecting
    def collect(self) -> list[dict]:
        """Raw results from every back-end with probes in flight; a dead or stuck fork server's probes
        come back as crashed / timed out, and later probes are spawned."""
        events = []
        for b in {id(b): b for _, b, _ in self.running.values()}.values():
            try:
                events += b.wait(0.05 if len(self.running) > 1 else 0.5)
            except ForkServerFailed as e:  # the server died under its probes: they count as crashed
                events += self._abandon(b, "crash", f"{e}; the probe's result was lost")
                continue
            # the fork server enforces timeouts; if it is itself stuck, the parent does
            if b is not self.spawn and any(b_ is b and time.monotonic() - t0 > self.timeout + 30
                                           for _, b_, t0 in self.running.values()):
                events += self._abandon(b, "timeout", "the fork server stopped answering")
        return events

    def _abandon(self, backend, kind: str, why: str) -> list[dict]:
        owed = {rid: (name, t0) for rid, (name, b, t0) in self.running.items() if b is backend}
        backend.close()
        self.backend = self.spawn
        return orphaned(owed, kind, why)

    def finish(self, ev: dict) -> None:
        name, b, _ = self.running.pop(ev["id"])
        r = build_result(name, ev, self.matrix)
        forked = b is not self.spawn
        tail = (ev.get("output_tail") or "") + str((ev.get("payload") or {}).get("error") or "")
        if (forked and self.device.startswith("cuda") and r.status != "pass" and name not in self.retried
                and any(s in tail for s in CUDA_FORK_ERRORS)):
            self.retried.add(name)  # the fork server's CUDA state leaked: run it spawned instead
            self.start(name, self.spawn)
            return
        if name == "imports" and isinstance(b, ForkBackend):
            r.duration_s = round(r.duration_s + b.preload_s, 3)
            r.measurements["shared_import_s"] = b.preload_s
        r.measurements.setdefault("isolation", "fork" if forked else "spawn")
        self.record(name, r)

    def record(self, name: str, r: ProbeResult) -> None:
        self.done[name] = r
        self.note("done", name, r)


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
    try:
        device = devices.parse_device(device, facts)
    except devices.DeviceError as e:
        raise ProbeUsageError(str(e)) from None
    inj = parse_inject(inject) if isinstance(inject, str) or inject is None else dict(inject)
    if inject is None:
        inj = parse_inject(os.environ.get(INJECT_ENV))
    isolation = isolation or os.environ.get(ISOLATION_ENV) or ("fork" if hasattr(os, "fork") else "spawn")
    if isolation not in ("fork", "spawn"):
        raise ProbeUsageError(f"bad isolation {isolation!r} (fork or spawn)")
    note = progress or (lambda *a: None)

    done: dict[str, ProbeResult] = {}
    for name in order:
        why = static_skip(name, facts, device)
        if why:
            done[name] = skipped(name, why)
            note("done", name, done[name])
    pending = [n for n in order if n not in done]
    fork, spawn, fallback_note = open_backends(isolation if pending else "spawn", device, timeout)
    try:
        Scheduler(order, pending, done, device=device, timeout=timeout, jobs=jobs or default_jobs(),
                  inject=inj, compute_dtype=compute_dtype, matrix=mx, fork=fork, spawn=spawn, note=note).run()
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
