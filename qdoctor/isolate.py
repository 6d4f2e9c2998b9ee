"""Run risky Python code in a child process with a timeout.

Importing torch or bitsandbytes, or touching CUDA, can crash (abort, segfault) or hang. The child
runs in its own process group so a timeout kills it *and* anything it spawned; the parent only
ever sees a `ChildResult`, never an exception from the child.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

RESULT_MARK = "@@QDOCTOR-RESULT@@"


@dataclass
class ChildResult:
    status: str  # "ok" | "error" (non-zero exit) | "crash" (killed by a signal) | "timeout"
    returncode: int | None
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    payload: dict | None = None  # the JSON the child printed after RESULT_MARK
    signal_name: str | None = None
    extra: dict = field(default_factory=dict)

    def stderr_tail(self, lines: int = 20) -> str:
        return tail_lines(self.stderr, lines)


def tail_lines(text: str | None, lines: int = 20, chars: int | None = None) -> str:
    """The last `lines` lines of a child's output (and at most `chars` characters): what a report shows."""
    out = "\n".join((text or "").strip().splitlines()[-lines:])
    return out[-chars:] if chars else out


def emit(payload: dict) -> None:
    """Called inside the child: hand a JSON result back to the parent."""
    sys.stdout.write("\n" + RESULT_MARK + json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


def _parse_payload(stdout: str) -> dict | None:
    idx = stdout.rfind(RESULT_MARK)
    if idx < 0:
        return None
    line = stdout[idx + len(RESULT_MARK):].splitlines()[0] if stdout[idx + len(RESULT_MARK):] else ""
    try:
        return json.loads(line)
    except ValueError:
        return None


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        with contextlib.suppress(OSError):
            proc.kill()


def run_python(
    args: list[str],
    timeout: float,
    env: dict | None = None,
    cwd: str | None = None,
    python: str | None = None,
) -> ChildResult:
    """Run `python args...` isolated; never raises for anything the child does."""
    cmd = [python or sys.executable, *args]
    child_env = dict(os.environ if env is None else env)
    child_env.setdefault("PYTHONUNBUFFERED", "1")
    child_env.setdefault("PYTHONWARNINGS", "default")
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=child_env,
            cwd=cwd,
            start_new_session=True,
            text=True,
            errors="replace",
        )
    except OSError as e:
        return ChildResult("error", None, time.perf_counter() - t0, stderr=str(e))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out, err = proc.communicate()
        return ChildResult("timeout", None, time.perf_counter() - t0, out or "", err or "",
                           _parse_payload(out or ""))
    finally:
        # The child may have left grandchildren in its group: end them too.
        if proc.poll() is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
                os.killpg(proc.pid, signal.SIGKILL)
    dt = time.perf_counter() - t0
    rc = proc.returncode
    payload = _parse_payload(out)
    if rc is not None and rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return ChildResult("crash", rc, dt, out, err, payload, signal_name=name)
    return ChildResult("ok" if rc == 0 else "error", rc, dt, out, err, payload)


def run_module_function(module: str, func: str, kwargs: dict, timeout: float, env=None) -> ChildResult:
    """Run `module.func(**kwargs)` in a child; its returned dict becomes the payload."""
    code = (
        "import json,sys\n"
        "from qdoctor.isolate import emit\n"
        f"import importlib; m = importlib.import_module({module!r})\n"
        f"emit(getattr(m, {func!r})(**json.loads(sys.argv[1])))\n"
    )
    return run_python(["-c", code, json.dumps(kwargs)], timeout=timeout, env=env)
