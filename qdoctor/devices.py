"""Which GPUs a CUDA program started here sees, and which NVML GPU each CUDA ordinal is.

NVML (facts.nvidia.gpus) lists every GPU by its NVML index; the CUDA runtime sees only what
CUDA_VISIBLE_DEVICES lets through, renumbered 0..n-1 in the order the variable names them. Everywhere
in qdoctor `cuda:N` (smoke --device, train --device, the plan) means the N-th *visible* GPU; this
module is the one place that turns it into an NVML GPU (name, capability, memory), and the one place
that picks the default device. Cheap to import (no packaging, no torch): `check` uses it too.

CUDA's reading of the variable (CUDA C Programming Guide, "CUDA Environment Variables",
https://docs.nvidia.com/cuda/cuda-c-programming-guide/index.html#cuda-environment-variables):
- unset: every GPU; set but empty: none;
- comma-separated integer ordinals, GPU UUIDs ("GPU-8932f937-d72c-...") or a UUID prefix that names
  one GPU ("GPU-8932f937"), visible in the order given;
- the first entry that names no device ends the list ("0,2,-1,1" is 0 and 2; "-1" hides all); a
  repeated device is treated the same way.
Not modelled: MIG instances ("MIG-..."). NVML facts list whole GPUs, so a list naming a MIG instance
cannot be mapped: every GPU is then assumed visible in NVML order and `Visible.known` is False.
Ordinals follow NVML (PCI bus) order, as CUDA numbers GPUs with CUDA_DEVICE_ORDER=PCI_BUS_ID. Its
default, FASTEST_FIRST, may number GPUs of different models otherwise: when runtime facts (`check
--deep`) name each CUDA device, they decide; else `Visible.note` says what was assumed.
"""

from __future__ import annotations

from dataclasses import dataclass


class DeviceError(ValueError):
    """A device the user named that is malformed or not here: one line for the user (exit 2)."""


class Unmappable(ValueError):
    """CUDA_VISIBLE_DEVICES names devices these facts cannot map to NVML GPUs (MIG, or UUIDs unknown)."""


def parse_visible(value: str | None, gpus: list[dict]) -> list[int] | None:
    """NVML indices a CUDA program sees, in CUDA ordinal order; None when the variable is unset (all).

    Raises Unmappable for an entry naming a MIG instance, or a GPU UUID when no GPU here has one.
    """
    if value is None:
        return None
    out: list[int] = []
    by_index = {g.get("index"): g for g in gpus}
    for raw in value.split(","):
        tok = raw.strip()
        if not tok:
            break
        idx = None
        if tok.upper().startswith("MIG-"):
            raise Unmappable(f"CUDA_VISIBLE_DEVICES names a MIG instance ({tok[:12]}...)")
        if tok.lstrip("+").isdigit():
            i = int(tok)
            idx = i if i in by_index else None
        elif tok.upper().startswith("GPU-"):
            if not any(g.get("uuid") for g in gpus):
                raise Unmappable("CUDA_VISIBLE_DEVICES names GPU UUIDs and these facts have none")
            found = [g["index"] for g in gpus
                     if g.get("uuid") and str(g["uuid"]).lower().startswith(tok.lower())]
            idx = found[0] if len(found) == 1 else None
        if idx is None or idx in out:
            break
        out.append(idx)
    return out


@dataclass(frozen=True)
class Visible:
    """The GPUs CUDA sees, `gpus[N]` being `cuda:N` (NVML GPU dicts, as in facts.nvidia.gpus)."""

    gpus: tuple[dict, ...]
    known: bool = True  # False: CUDA_VISIBLE_DEVICES could not be mapped; all GPUs assumed visible
    note: str | None = None  # what was assumed, for the user (plan reasons)


def all_gpus(facts: dict) -> list[dict]:
    return [g for g in ((facts.get("nvidia") or {}).get("gpus") or []) if isinstance(g, dict)]


def cvd_value(facts: dict) -> str | None:
    """CUDA_VISIBLE_DEVICES as observed: the env section (which a user may edit in a snapshot to ask
    "what if"), else the value the nvidia collector recorded."""
    env = facts.get("env") or {}
    if "CUDA_VISIBLE_DEVICES" in env:
        v = env.get("CUDA_VISIBLE_DEVICES")
    else:
        v = (facts.get("nvidia") or {}).get("cuda_visible_devices")
    return None if v is None else str(v)


def visible(facts: dict) -> Visible:
    """The visible GPUs in CUDA ordinal order (see the module docstring for the rules)."""
    gpus = all_gpus(facts)
    try:
        order = parse_visible(cvd_value(facts), gpus)
    except Unmappable as e:
        # the collector's per-GPU flags (it saw the real UUIDs) when there are any, else all of them
        keep = [g for g in gpus if g.get("visible") is not False]
        return Visible(tuple(keep), known=False, note=f"{e}: assuming {_indices(keep)} in NVML order")
    if order is None:
        vis = gpus
    else:
        by_index = {g.get("index"): g for g in gpus}
        vis = [by_index[i] for i in order]
    return _runtime_order(facts, vis)


def _indices(gpus) -> str:
    return "GPU " + ", ".join(str(g.get("index", "?")) for g in gpus) if gpus else "no GPU"


def _runtime_order(facts: dict, vis: list[dict]) -> Visible:
    """Reorder by the names torch reported per CUDA ordinal (--deep) when they are a permutation of the
    visible GPUs' names; else keep NVML order, noting the assumption when the GPUs differ in model."""
    names = [g.get("name") for g in vis]
    if len(set(names)) < 2:
        return Visible(tuple(vis))
    rt = [d.get("name") for d in ((facts.get("torch") or {}).get("devices") or []) if isinstance(d, dict)]
    if len(rt) == len(vis) and sorted(map(str, rt)) == sorted(map(str, names)):
        left = list(vis)
        ordered = []
        for n in rt:
            g = next(g for g in left if g.get("name") == n)
            left.remove(g)
            ordered.append(g)
        return Visible(tuple(ordered))
    order = ((facts.get("env") or {}).get("CUDA_DEVICE_ORDER") or "").strip().upper()
    if order == "PCI_BUS_ID":
        return Visible(tuple(vis))
    return Visible(tuple(vis), note="cuda:N counted in NVML (PCI bus) order; CUDA's default FASTEST_FIRST "
                                    "order may differ on mixed GPUs: export CUDA_DEVICE_ORDER=PCI_BUS_ID")


def count(facts: dict | None) -> int | None:
    """GPUs a CUDA program sees, or None when the facts cannot tell: torch's own count when runtime
    facts exist (--deep), else the NVML GPUs CUDA_VISIBLE_DEVICES lets through."""
    if not facts:
        return None
    t = facts.get("torch") or {}
    if isinstance(t.get("device_count"), int):
        return t["device_count"]
    if (facts.get("nvidia") or {}).get("gpus") is None:
        return None
    return len(visible(facts).gpus)


def ordinal(device: str) -> int | None:
    """'cuda:3' -> 3; 'cuda' -> 0; anything else -> None."""
    d = device.strip().lower()
    if d == "cuda":
        return 0
    if d.startswith("cuda:") and d[5:].isdigit():
        return int(d[5:])
    return None


def gpu_for(facts: dict, device: str) -> dict | None:
    """The NVML GPU behind `cuda:N` (the N-th visible GPU), or None (cpu, or not in the facts)."""
    n = ordinal(device)
    vis = visible(facts).gpus
    return vis[n] if n is not None and n < len(vis) else None


def describe(facts: dict, device: str) -> str:
    """'cuda:0 = GPU 1 (NVIDIA A100-SXM4-80GB)', with CUDA_VISIBLE_DEVICES when it renumbers."""
    g = gpu_for(facts, device)
    if g is None:
        return device
    text = f"{device} = GPU {g.get('index', '?')} ({g.get('name') or 'unknown GPU'})"
    cvd = cvd_value(facts)
    return text + (f" under CUDA_VISIBLE_DEVICES={cvd}" if cvd is not None else "")


def cuda_usable(facts: dict | None) -> bool:
    """Would torch here compute on a GPU? Its runtime answer when known, else a CUDA build of torch and
    at least one visible GPU."""
    if not facts:
        return False
    t = facts.get("torch") or {}
    if t.get("cuda_available") is False:
        return False
    n = count(facts)
    if t.get("cuda_available") is True:
        return n is None or n > 0
    return bool(t.get("cuda")) and bool(n)


def default_device(facts: dict | None) -> str:
    """What smoke, train pre-flight and the plan use when the user names no device."""
    return "cuda:0" if cuda_usable(facts) else "cpu"


def parse_device(device: str | None, facts: dict | None) -> str:
    """A user's 'cpu' | 'cuda' | 'cuda:N' checked against the facts; None -> default_device."""
    if device is None:
        return default_device(facts)
    d = device.strip().lower()
    if d == "cpu":
        return "cpu"
    n = ordinal(d)
    if n is None:
        raise DeviceError(f"bad --device {device!r} (use cpu or cuda:N)")
    d = f"cuda:{n}"
    if facts:
        t = facts.get("torch") or {}
        if t.get("installed") is not False and t.get("version") and not t.get("cuda") and not t.get("hip"):
            raise DeviceError(f"--device {d}: torch {t.get('version')} here is a CPU-only build")
        c = count(facts)
        if c is not None and n >= c:
            hint = ""
            if c == 0 and all_gpus(facts) and cvd_value(facts) is not None:
                hint = f"; CUDA_VISIBLE_DEVICES={cvd_value(facts)!r} hides every GPU"
            raise DeviceError(f"--device {d}: no such device ({c} CUDA device{'s' * (c != 1)} visible{hint})")
    return d
