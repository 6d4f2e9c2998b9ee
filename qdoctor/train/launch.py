"""`qdoctor train --nproc N`: pre-flight and the plan run here, once; then torchrun starts N copies of the
same command, and each reads this process's pre-flight instead of running its own.

torchrun (`python -m torch.distributed.run --standalone`) picks a free rendezvous port, starts the ranks in
sessions of their own and sets RANK, WORLD_SIZE and LOCAL_RANK. This parent relays their output through
redaction, and on Ctrl-C or SIGTERM signals the ranks themselves, not torchrun (which would kill them
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds later, 30 by default, whether the step had ended or not): they agree
on a step boundary, rank 0 saves a checkpoint, and the run ends with exit 130 like a one-process run. A second
signal stops torchrun and everything under it. The ranks exit 0 to torchrun once they agree on an outcome (so
it prints no failure report) and leave the real exit code in a file; a rank that dies alone makes torchrun
stop the others (within its shutdown timeout) and this parent exit 1.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from qdoctor.console import EXIT_FINDINGS, out
from qdoctor.train.distributed import LAUNCH_ENV


def torchrun_command(nproc: int) -> list[str]:
    """The ranks run this module, which reads the `train` arguments from the launch file: on torchrun's own
    command line, an option of ours that begins one of its own (--nproc) would be taken as an abbreviation."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "qdoctor.train.launch"]


def worker_env(nproc: int, launch_file: str, cpu: bool, environ=None) -> dict:
    """The ranks' environment: the launch file, and on CPU the cores shared out (torchrun would set
    OMP_NUM_THREADS=1 with a banner)."""
    env = dict(os.environ if environ is None else environ)
    env[LAUNCH_ENV] = launch_file
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc) if cpu else 1))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def write_launch(directory: Path, preflight: dict, args: list[str]) -> tuple[Path, Path]:
    """The launch file (the `train` arguments, the pre-flight, and where rank 0 leaves the exit code),
    private to this user."""
    status = directory / "status"
    launch = directory / "launch.json"
    launch.write_text(json.dumps({"args": args, "preflight": preflight, "status": str(status)}))
    return launch, status


def read_launch(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_status(path: str | None, code: int) -> None:
    if path:
        Path(path).write_text(f"{code}\n")


def _relay(stream, err: bool) -> None:
    """Copy a rank's output through redaction, line by line (a carriage-return progress bar included)."""
    buf = b""
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            break
        buf += chunk
        while True:
            cut = max(buf.rfind(b"\n"), buf.rfind(b"\r"))
            if cut < 0:
                break
            out(buf[: cut + 1].decode("utf-8", "replace"), err=err)
            buf = buf[cut + 1 :]
    if buf:
        out(buf.decode("utf-8", "replace"), err=err)


def _ranks(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=False)]
    except Exception:  # psutil missing, or torchrun already gone
        return []


def run(nproc: int, args: list[str], preflight: dict, *, cpu: bool) -> int:
    """Start the ranks; return the run's exit code (what rank 0 reported, else 1 if torchrun failed)."""
    tmp = Path(tempfile.mkdtemp(prefix="qdoctor-launch-"))
    os.chmod(tmp, 0o700)
    launch, status = write_launch(tmp, preflight, args)
    proc = subprocess.Popen(torchrun_command(nproc), env=worker_env(nproc, str(launch), cpu),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    relays = [threading.Thread(target=_relay, args=(proc.stdout, False), daemon=True),
              threading.Thread(target=_relay, args=(proc.stderr, True), daemon=True)]
    for t in relays:
        t.start()
    asked: list[int] = []

    def on_signal(signum, _frame):
        if not asked:  # first: the ranks stop at the next step boundary with a checkpoint
            for pid in _ranks(proc.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signum)
        else:  # again: torchrun stops everything now
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGTERM)
        asked.append(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
        for t in relays:
            t.join(timeout=10)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        try:
            code = int(status.read_text().strip()) if status.is_file() else None
        except ValueError:
            code = None
        shutil.rmtree(tmp, ignore_errors=True)
    if code is not None:
        return code
    out(f"qdoctor: error: a training process failed (torchrun exited with {rc}; its report is above)\n",
        err=True)
    return EXIT_FINDINGS


def worker_main() -> None:
    """A rank of `train --nproc`: `qdoctor train` with the launcher's arguments."""
    from qdoctor.train.cli import train

    train.main(args=read_launch(os.environ[LAUNCH_ENV])["args"], prog_name="qdoctor train")


if __name__ == "__main__":
    worker_main()
