"""The run directory: whether a new run or a resume may use it, its lock, and its record (run.json).

run.json holds the run's identity (what changes the math: model and data content, resolved hyperparameters)
and its max_steps. A resume must agree on the identity; max_steps may grow, and the warmup recorded in the
identity stays. One process trains in a directory at a time: an exclusive flock on <output>/.qdoctor.lock,
released by the kernel when the process ends, even on kill -9. The directory is checked twice: before
pre-flight without writing anything (a fast one-line error), and again under the lock before the first write.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

from qdoctor import strict_json
from qdoctor.atomic import write_text

LOCK = ".qdoctor.lock"
RECORD = "run.json"


class RunDirError(ValueError):
    """The output directory cannot be used as asked; one line for the user (exit 2)."""


def check(output: Path, resume: bool, *, locked: bool = False) -> dict | None:
    """Refuse what would mix two runs; returns the record of the run to resume (None for a new run)."""
    if output.exists() and not output.is_dir():
        raise RunDirError(f"output {output} exists and is not a directory")
    if not locked:
        pid = holder(output)
        if pid is not None:
            raise RunDirError(f"{_in_use(output, pid)}; wait for it to end or choose another --output")
    if resume:
        if not output.is_dir():
            raise RunDirError(f"--resume: {output} does not exist; give the --output of the run to continue")
        if not (output / RECORD).is_file():
            raise RunDirError(f"--resume: {output} holds no qdoctor run (no {RECORD}); check --output")
        return read_record(output)
    entries = [p for p in output.iterdir() if p.name != LOCK] if output.is_dir() else []
    if not entries:
        _check_writable(output)
        return None
    if not (output / RECORD).is_file():
        raise RunDirError(
            f"output directory {output} is not empty and holds no qdoctor run; choose a fresh --output"
        )
    raise RunDirError(
        f"output directory {output} already holds a run; add --resume to continue it or choose a fresh "
        "--output"
    )


def _check_writable(output: Path) -> None:
    p = output.absolute()
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        raise RunDirError(f"cannot create output directory {output}: {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot create output directory {output}: {p} is not writable")


def read_record(output: Path) -> dict:
    f = output / RECORD
    try:
        rec = json.loads(f.read_text())
    except (OSError, ValueError):
        raise RunDirError(f"{f} is unreadable; choose a fresh --output") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("identity"), dict):
        raise RunDirError(f"{f} holds no run identity; choose a fresh --output")
    return rec


def write_record(output: Path, identity: dict, **info) -> None:
    write_text(output / RECORD, strict_json.dumps({"identity": identity, **info}, indent=2) + "\n")


def identity_diff(old: dict, new: dict) -> list[str]:
    """Keys whose values differ (strict JSON: 1 and 1.0 are the same number)."""
    return [
        k
        for k in sorted(set(old) | set(new))
        if json.loads(strict_json.dumps(old.get(k))) != json.loads(strict_json.dumps(new.get(k)))
    ]


def check_identity(output: Path, old: dict, new: dict) -> None:
    diff = identity_diff(old.get("identity") or {}, new)
    if diff:
        shown = "; ".join(f"{k}: {old['identity'].get(k)!r} -> {new.get(k)!r}" for k in diff[:3])
        raise RunDirError(
            f"output directory {output} holds a different run (differs in {', '.join(diff)}: {shown}); "
            "resume it with the same settings or choose a fresh --output"
        )


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
# how a failed write reads when it comes from torch's zip writer or safetensors' Rust writer, not an OSError
SPACE_TEXTS = ("No space left", "os error 28", "Disk quota exceeded", "os error 122")
WRITE_TEXTS = ("Read-only file system", "os error 30", "PytorchStreamWriter failed", "unexpected pos",
               "file write failed")


def write_failure(e: BaseException) -> str | None:
    """Why writing the run failed, when `e` is the storage refusing (full disk, quota, read-only,
    permissions) rather than a bug; None otherwise."""
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        return (e.strerror or str(e)) + (f" ({e.filename})" if e.filename else "")
    text = str(e)
    if any(t in text for t in SPACE_TEXTS):
        return "No space left on device"
    if any(t in text for t in WRITE_TEXTS):
        return "a write failed (is the disk full or read-only?)"
    return None


def holder(output: Path) -> int | None:
    """The pid holding the run's lock (0 when unknown), None when it is free."""
    f = output / LOCK
    if not f.is_file():
        return None
    try:
        fd = os.open(f, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _try_lock(fd, shared=True):
            return None
        with contextlib.suppress(OSError, ValueError):
            return int(os.pread(fd, 32, 0).decode().strip() or 0)
        return 0
    finally:
        os.close(fd)


class Lock:
    """Exclusive lock on the run directory for the life of the run (or of this object)."""

    def __init__(self, output: Path):
        output.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(output / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(self.fd, shared=False):
            os.close(self.fd)
            raise RunDirError(_in_use(output, holder(output)))
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def _in_use(output: Path, pid: int | None) -> str:
    return f"output directory {output} is in use by another qdoctor train" + (f" (pid {pid})" if pid else "")


def _try_lock(fd: int, shared: bool) -> bool:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock (qdoctor's stack is Linux-first)
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError:
        return False
    if shared:
        fcntl.flock(fd, fcntl.LOCK_UN)
    return True
