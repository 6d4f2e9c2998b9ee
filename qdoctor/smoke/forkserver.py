"""The fork server: import the stack once, then fork one fresh process per probe.

Started by the runner as `python -m qdoctor.smoke.forkserver EVENT_FD PRELOAD_BNB`. Commands come
as JSON lines on stdin ({"cmd": "run", "id", "probe", "target", "ctx", "timeout"} or {"cmd": "exit"});
events go as JSON lines to EVENT_FD ("ready", "started", "done"). Each probe process is the leader
of its own process group, so a timeout kills it and everything it spawned; it also dies with this
server (PR_SET_PDEATHSIG). Its stdout/stderr go to files whose tail is sent back with the result.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import sys
import tempfile
import time

TAIL = 6000


def _pdeathsig() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _tail(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - TAIL))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


class Server:
    def __init__(self, event_fd: int):
        self.events = os.fdopen(event_fd, "w", buffering=1)
        self.running: dict[int, dict] = {}
        self.logdir = tempfile.mkdtemp(prefix="qdoctor-smoke-fs-")

    def send(self, obj: dict) -> None:
        self.events.write(json.dumps(obj, default=str) + "\n")
        self.events.flush()

    def start(self, cmd: dict) -> None:
        out_path = os.path.join(self.logdir, f"{cmd['id']}.out")
        res_path = os.path.join(self.logdir, f"{cmd['id']}.json")
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the probe process
            code = 0
            try:
                os.setpgid(0, 0)
                _pdeathsig()
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                sys.stdout = os.fdopen(1, "w", buffering=1)
                sys.stderr = os.fdopen(2, "w", buffering=1)
                from qdoctor.smoke.child import run_one

                payload = run_one(cmd["probe"], cmd["target"], cmd["ctx"])
                with open(res_path, "w") as fh:
                    json.dump(payload, fh, default=str)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 70
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        with contextlib.suppress(OSError):  # also here: no race with a kill before the child's own setpgid
            os.setpgid(pid, pid)
        self.running[pid] = {"cmd": cmd, "t0": t0, "deadline": t0 + float(cmd["timeout"]),
                             "out": out_path, "res": res_path}
        self.send({"event": "started", "id": cmd["id"], "probe": cmd["probe"], "pid": pid})

    def _finish(self, pid: int, status: int, rusage, timed_out: bool) -> None:
        info = self.running.pop(pid)
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)  # anything the probe left behind in its group
        payload = None
        try:
            with open(info["res"]) as fh:
                payload = json.load(fh)
        except (OSError, ValueError):
            pass
        ev = {"event": "done", "id": info["cmd"]["id"], "probe": info["cmd"]["probe"],
              "duration_s": time.perf_counter() - info["t0"], "timed_out": timed_out,
              "signal": None, "returncode": None, "payload": payload, "output_tail": _tail(info["out"]),
              "maxrss_mib": rusage.ru_maxrss / 1024 if rusage is not None else None}
        if os.WIFSIGNALED(status):
            ev["signal"] = signal.Signals(os.WTERMSIG(status)).name
        elif os.WIFEXITED(status):
            ev["returncode"] = os.WEXITSTATUS(status)
        for p in (info["out"], info["res"]):
            with contextlib.suppress(OSError):
                os.unlink(p)
        self.send(ev)

    def reap(self) -> None:
        now = time.perf_counter()
        for pid, info in list(self.running.items()):
            try:
                wpid, status, rusage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:
                self._finish(pid, 0, None, False)
                continue
            if wpid:
                self._finish(pid, status, rusage, False)
            elif now > info["deadline"]:
                with contextlib.suppress(OSError):
                    os.killpg(pid, signal.SIGKILL)
                _, status, rusage = os.wait4(pid, 0)
                self._finish(pid, status, rusage, True)

    def kill_all(self) -> None:
        for pid in list(self.running):
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
        self.running.clear()

    def loop(self) -> None:
        buf = b""
        stdin = sys.stdin.fileno()
        while True:
            timeout = 0.02 if self.running else 1.0
            r, _, _ = select.select([stdin], [], [], timeout)
            if r:
                chunk = os.read(stdin, 65536)
                if not chunk:  # the runner is gone
                    self.kill_all()
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if not line.strip():
                        continue
                    cmd = json.loads(line)
                    if cmd.get("cmd") == "exit":
                        self.kill_all()
                        return
                    self.start(cmd)
            self.reap()


def main(argv: list[str]) -> None:
    event_fd = int(argv[0])
    preload_bnb = {"1": True, "0": False}.get(argv[1], argv[1])  # or "nvml"
    extras = len(argv) < 3 or argv[2] == "1"
    _pdeathsig()
    os.dup2(2, 1)  # library prints must not reach the event channel; it is a separate fd anyway
    server = Server(event_fd)
    from qdoctor.smoke.preload import cuda_initialized, preload

    rec = preload(with_bitsandbytes=preload_bnb, extras=extras)
    server.send({"event": "ready", "preload": rec, "cuda_initialized": cuda_initialized(),
                 "pid": os.getpid()})
    server.loop()
    import shutil

    shutil.rmtree(server.logdir, ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
