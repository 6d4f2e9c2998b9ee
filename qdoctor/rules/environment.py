"""Environment rules (QD6xx): variables and virtualization that change what the stack does.

Values of credential-like variables are never read here beyond "set or not": the facts hold only ***.
"""

from __future__ import annotations

import re

from qdoctor.findings import Finding
from qdoctor.redact import is_secret_name
from qdoctor.rules import rule
from qdoctor.rules.common import (
    all_gpus,
    bnb,
    bnb_libs,
    bnb_pick,
    bnb_version,
    cuda_str,
    group_label,
    torch_cuda,
    visible_gpus,
)

AREA = "environment"
_SHOWN = (
    "CUDA_VISIBLE_DEVICES",
    "BNB_CUDA_VERSION",
    "HF_HUB_OFFLINE",
    "PYTORCH_CUDA_ALLOC_CONF",
    "CUDA_HOME",
)


def _env(facts) -> dict:
    return facts.get("env") or {}


def _truthy(v) -> bool:
    return isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on")


@rule("QD600", "environment-summary", AREA, summary=True)
def env_summary(facts, matrix):
    """One line naming the variables that matter to training and their values, shown when nothing is
    wrong in this area."""
    env = _env(facts)
    if not env:
        return []
    set_ = [f"{k}={env[k]}" for k in _SHOWN if env.get(k) is not None]
    title = ", ".join(set_) if set_ else "no variables that change GPU, library or hub behaviour are set"
    return [
        Finding(
            "QD600",
            "ok",
            title,
            [f"env.{k} = {env[k] if env.get(k) is not None else 'unset'}" for k in _SHOWN],
            None,
            AREA,
        )
    ]


@rule("QD601", "wsl", AREA)
def wsl(facts, matrix):
    """Windows Subsystem for Linux: the driver's libcuda lives in /usr/lib/wsl/lib and is often only
    libcuda.so.1, so triton fails with "libcuda.so cannot found!"; unified memory is limited, so paged
    optimizers may not page. Info with the usual fix."""
    if (facts.get("platform") or {}).get("wsl") is not True:
        return []
    ld = _env(facts).get("LD_LIBRARY_PATH") or ""
    ev = [
        "platform.wsl = true",
        f"env.LD_LIBRARY_PATH contains /usr/lib/wsl/lib: {'/usr/lib/wsl/lib' in ld}",
        "error users see: AssertionError: libcuda.so cannot found!",
    ]
    return [
        Finding(
            "QD601",
            "info",
            "WSL: libcuda.so is in /usr/lib/wsl/lib; paged optimizers are limited",
            ev,
            "export LD_LIBRARY_PATH=/usr/lib/wsl/lib:$LD_LIBRARY_PATH  # and prefer optim='adamw_bnb_8bit' "
            "over paged optimizers",
            AREA,
        )
    ]


@rule("QD602", "vgpu-no-managed-memory", AREA)
def vgpu(facts, matrix):
    """A GPU in NVIDIA vGPU guest mode usually has no CUDA managed (unified) memory unless the host enables
    it: paged optimizers fail ("cuMemAllocManaged() is not supported", "operation not supported").
    Warning per GPU: use a non-paged optimizer. Passthrough GPUs are fine."""
    bad = [
        g
        for g in visible_gpus(facts)
        if isinstance(g.get("virtualization"), str)
        and "vgpu" in g["virtualization"].lower()
        and "host" not in g["virtualization"].lower()
    ]
    if not bad:
        return []
    return [
        Finding(
            "QD602",
            "warning",
            f"{group_label(bad)} is a vGPU: paged optimizers may fail (no managed memory)",
            [f"GPU {g.get('index')}: nvidia virtualization = {g.get('virtualization')}" for g in bad]
            + ["error users see: Sorry, cuMemAllocManaged() is not supported"],
            "TrainingArguments(optim='adamw_bnb_8bit')  # not 'paged_adamw_8bit' / 'paged_adamw_32bit'",
            AREA,
        )
    ]


@rule("QD603", "cuda-visible-devices-hides-all", AREA)
def cvd_hides_all(facts, matrix):
    """CUDA_VISIBLE_DEVICES hides every GPU the driver sees ("", "-1", or indices that do not exist):
    torch reports no GPU and training silently runs on the CPU. Warning."""
    env = _env(facts)
    gpus = all_gpus(facts)
    if "CUDA_VISIBLE_DEVICES" not in env or env.get("CUDA_VISIBLE_DEVICES") is None or not gpus:
        return []
    if visible_gpus(facts):
        return []
    keep = ",".join(str(g.get("index")) for g in gpus)
    return [
        Finding(
            "QD603",
            "warning",
            f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']!r} hides all "
            f"{len(gpus)} GPU{'s' * (len(gpus) != 1)}: training would run on the CPU",
            [
                f"env.CUDA_VISIBLE_DEVICES = {env['CUDA_VISIBLE_DEVICES']!r}",
                f"nvidia.gpus = {group_label(gpus)}",
            ],
            f"unset CUDA_VISIBLE_DEVICES  # or export CUDA_VISIBLE_DEVICES={keep}",
            AREA,
        )
    ]


@rule("QD604", "bnb-cuda-version-set", AREA)
def bnb_override(facts, matrix):
    """BNB_CUDA_VERSION overrides bitsandbytes' choice of native library. Pointing it at another CUDA
    version than torch's mixes two CUDA runtimes in one process. Warning when it differs from what the
    loader would pick anyway (a missing library is the error QD403)."""
    env = _env(facts)
    ov = bnb(facts).get("override") or env.get("BNB_CUDA_VERSION")
    if not ov:
        return []
    ov = str(ov).strip()
    ver = bnb_version(facts)
    libs = bnb_libs(facts, matrix, ver)
    if libs is not None and f"cuda{ov}" not in libs:
        return []  # QD403
    tc = torch_cuda(facts)
    default = bnb_pick(matrix, ver, libs, tc) if tc and libs is not None else None
    if default == f"cuda{ov}":
        return []
    ev = [f"env.BNB_CUDA_VERSION = {ov} -> libbitsandbytes_cuda{ov}"]
    if tc:
        ev.append(
            f"torch.cuda = {cuda_str(tc)}" + (f" -> without the override: {default}" if default else "")
        )
    return [
        Finding(
            "QD604",
            "warning",
            f"BNB_CUDA_VERSION={ov} overrides bitsandbytes' library choice",
            ev,
            "unset BNB_CUDA_VERSION  # unless you built or need that library on purpose",
            AREA,
        )
    ]


def _path_cuda_majors(value: str) -> dict:
    out = {}
    for part in (value or "").split(":"):
        for m in re.finditer(r"cuda-?(\d{1,2})(?:\.(\d+))?(?=/|$)", part, re.I):
            out[part] = int(m.group(1))
        for m in re.finditer(r"nvidia/cu(\d{2})(?=/|$)", part):
            out[part] = int(m.group(1))
    return out


@rule("QD605", "ld-library-path-other-cuda", AREA)
def ld_path(facts, matrix):
    """LD_LIBRARY_PATH (or CUDA_HOME) points at a CUDA toolkit of another major than torch's: a second
    libcudart/libcublas may load next to torch's own ("invalid device function", bitsandbytes picking the
    wrong runtime). Warning."""
    tc = torch_cuda(facts)
    if not tc:
        return []
    env = _env(facts)
    hits = {}
    for var in ("LD_LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH"):
        for part, major in _path_cuda_majors(env.get(var) or "").items():
            if major != tc[0]:
                hits[f"{var}: {part}"] = major
    if not hits:
        return []
    return [
        Finding(
            "QD605",
            "warning",
            f"a CUDA {sorted(set(hits.values()))[0]} toolkit is on the library path; "
            f"torch uses CUDA {cuda_str(tc)}",
            [f"{k} (CUDA {v})" for k, v in hits.items()] + [f"torch.cuda = {cuda_str(tc)}"],
            "remove that directory from LD_LIBRARY_PATH (torch and bitsandbytes bring their own CUDA "
            "runtime), e.g. export LD_LIBRARY_PATH=$(echo \"$LD_LIBRARY_PATH\" | tr ':' '\\n' | "
            "grep -v cuda | paste -sd:)",
            AREA,
        )
    ]


@rule("QD606", "hf-offline", AREA)
def hf_offline(facts, matrix):
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is on: models and datasets must already be in the cache or
    be local paths (a hub id fails with "outgoing traffic has been disabled"). Info."""
    env = _env(facts)
    on = [k for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE") if _truthy(env.get(k))]
    if not on:
        return []
    return [
        Finding(
            "QD606",
            "info",
            f"Hugging Face offline mode ({', '.join(on)}): use local paths or cached models",
            [f"env.{k} = {env.get(k)}" for k in on],
            "unset " + " ".join(on) + "  # to download models",
            AREA,
        )
    ]


@rule("QD607", "credentials-present", AREA)
def credentials(facts, matrix):
    """Credential-like variables (*TOKEN*, *KEY*, *SECRET*, *PASSWORD*, ...) are set. Info naming them only:
    their values are redacted in facts and every output."""
    names = sorted(k for k, v in _env(facts).items() if v is not None and is_secret_name(k))
    if not names:
        return []
    return [
        Finding(
            "QD607",
            "info",
            f"credential-like variables set (values redacted everywhere): {', '.join(names)}",
            [f"env.{k} = ***" for k in names],
            None,
            AREA,
        )
    ]


@rule("QD608", "cuda-launch-blocking", AREA)
def launch_blocking(facts, matrix):
    """CUDA_LAUNCH_BLOCKING=1 serialises every kernel launch: useful for debugging, several times slower
    for training. Warning."""
    v = _env(facts).get("CUDA_LAUNCH_BLOCKING")
    if not _truthy(v):
        return []
    return [
        Finding(
            "QD608",
            "warning",
            "CUDA_LAUNCH_BLOCKING=1 makes training much slower",
            [f"env.CUDA_LAUNCH_BLOCKING = {v}"],
            "unset CUDA_LAUNCH_BLOCKING",
            AREA,
        )
    ]
