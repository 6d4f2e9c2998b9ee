"""A small JSON cache under ~/.cache/qdoctor, so the second `check` costs almost nothing.

What is cached is always re-derivable: ELF/fatbin scans keyed by (path, size, mtime), requirement
checks keyed by the installed set, the `--deep` child's result keyed by an environment fingerprint
(which includes qdoctor's version), and train pre-flight's probe results keyed by `probe_key`: the
fingerprint, a hash of matrix/ (a changed smoke band or failure pattern re-judges) and the device.
Probe results and the deep result are reused for at most MAX_AGE_S (24 h): what no fingerprint sees
(a driver reload, a GPU that started failing) gets re-probed at least daily.
Every failure here (read-only home, full disk, a corrupt file) is a cache miss, never an error.
`QDOCTOR_CACHE_DIR` overrides the location (tests point it at a tmp dir); `QDOCTOR_NO_CACHE=1`
disables it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time

from qdoctor import strict_json

VERSION = 1  # bump to orphan every old entry when a cached format changes
MAX_AGE_S = 24 * 3600  # probe and deep-import results older than this are run again

FINGERPRINT_ENV = ("CUDA_VISIBLE_DEVICES", "BNB_CUDA_VERSION", "BNB_ROCM_VERSION", "LD_LIBRARY_PATH")


def cache_dir(environ=None) -> str:
    env = os.environ if environ is None else environ
    if env.get("QDOCTOR_CACHE_DIR"):
        return env["QDOCTOR_CACHE_DIR"]
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qdoctor")


def enabled(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return env.get("QDOCTOR_NO_CACHE", "") in ("", "0")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _path(kind: str, key: str) -> str:
    safe_kind = "".join(c if c.isalnum() or c in "-_" else "_" for c in kind) or "misc"
    return os.path.join(cache_dir(), f"v{VERSION}", safe_kind, _digest(key) + ".json")


def load(kind: str, key: str, max_age_s: float | None = None):
    """The object stored under (kind, key), or None (missing, stale, corrupt, or another key's hash)."""
    if not enabled():
        return None
    path = _path(kind, key)
    try:
        if max_age_s is not None and time.time() - os.path.getmtime(path) > max_age_s:
            return None
        with open(path, encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("key") != key:
        return None
    return rec.get("value")


def store(kind: str, key: str, obj) -> bool:
    """Write atomically; return False (and carry on) if the cache cannot be written."""
    if not enabled():
        return False
    path = _path(kind, key)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(strict_json.dumps({"key": key, "stored_at": time.time(), "value": obj}))
        os.replace(tmp, path)
        return True
    except (OSError, TypeError, ValueError):
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False


def file_key(path: str) -> str | None:
    """(path, size, mtime) identity of a file, or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"


def fingerprint(facts: dict) -> str:
    """What a runtime (import torch) result depends on; a change in any of these invalidates it.

    qdoctor's version, Python (executable, version), every reported package version (the stack, its
    neighbours and the nvidia-* wheels), the driver, the GPU models, and CUDA_VISIBLE_DEVICES /
    BNB_CUDA_VERSION / BNB_ROCM_VERSION / LD_LIBRARY_PATH.
    """
    from qdoctor import matrix

    plat = facts.get("platform") or {}
    pkgs = facts.get("packages") or {}
    nv = facts.get("nvidia") or {}
    env = facts.get("env") or {}
    from qdoctor import __version__

    parts = {
        "qdoctor": __version__,  # a newer qdoctor may probe or parse differently
        # the interpreter's directory, not its name: venv/bin/python and venv/bin/python3 are one Python
        "python": [os.path.dirname(plat.get("python_executable") or ""), plat.get("python")],
        "packages": {**{n: pkgs.get(n) for n in (*matrix.stack(), "triton")}, **pkgs},
        "driver": nv.get("driver"),
        "gpus": [g.get("name") for g in nv.get("gpus") or [] if isinstance(g, dict)],
        "env": {k: env.get(k) for k in FINGERPRINT_ENV},
    }
    return _digest(json.dumps(parts, sort_keys=True, default=str))


def matrix_digest() -> str:
    """A hash of every matrix/*.toml file's bytes: the knowledge a cached verdict was judged with."""
    from qdoctor import matrix

    h = hashlib.sha256()
    d = matrix.matrix_dir()
    for f in sorted(d.glob("*.toml")):
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def probe_key(fingerprint: str, device: str, probes) -> str:
    """The key of train pre-flight's cached probe results (see the module docstring)."""
    return f"{fingerprint}|matrix={matrix_digest()}|{device}|{','.join(probes)}"
