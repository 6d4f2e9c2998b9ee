"""Which libbitsandbytes_* a bitsandbytes release loads: the one function that decides it.

Facts (qdoctor.facts.bnb) record what is shipped and the environment and ask `select_library`; the
rules ask `pick` what-if questions (another torch CUDA, another release). How each release behaves is
data, the [[loader]] entries of matrix/bitsandbytes.toml, read from bitsandbytes' own loader at each
tag; tests/bnb_loader_cases.json holds what that code picked, release by release, and the test suite
compares this function with it. Pure and cheap: nothing here imports bitsandbytes or torch.
"""

from __future__ import annotations

import functools
import re

from qdoctor.arch import cc_tuple

LIB_RE = re.compile(r"^libbitsandbytes_(?P<name>.+?)\.(?:so|dll|dylib)$")


def rules(matrix: dict) -> list[dict]:
    return (matrix.get("bitsandbytes") or {}).get("loader", [])


@functools.lru_cache(maxsize=256)
def _contains(spec: str, version: str) -> bool | None:
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        return SpecifierSet(spec).contains(Version(version), prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return None


def rule_for(version: str | None, loader_rules: list[dict]) -> dict | None:
    """The first [[loader]] entry whose `versions` contains `version`."""
    if not version:
        return None
    for r in loader_rules:
        if _contains(r["versions"], str(version)):
            return r
    return None


def split_version(compact: str, hip: bool) -> tuple[int, int] | None:
    """Library digits -> (major, minor): CUDA '130' -> (13, 0); ROCm '72' -> (7, 2), '714' -> (7, 14)."""
    if not compact.isdigit() or len(compact) < 2:
        return None
    return (int(compact[:1]), int(compact[1:])) if hip else (int(compact[:2]), int(compact[2:]))


def runtime_tuple(text) -> tuple[int, int] | None:
    """torch.version.cuda / .hip ('12.8', '7.1.52802') -> (12, 8) as bitsandbytes reads it."""
    parts = str(text or "").split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return None


def _digits(t: tuple[int, int], style: str) -> str:
    return f"{t[0] * 10 + t[1]}" if style == "times10" else f"{t[0]}{t[1]}"


def _override(name: str, value: str, style: str) -> str:
    """The library name after BNB_CUDA_VERSION rewrote `name` (the release's own string operation)."""
    full = f"libbitsandbytes_{name}.so"
    if style == "slice":  # 0.41-0.42: binary_name[:-6] + value + '.so'
        full = full[:-6] + f"{value}.so"
    elif style == "rstrip":  # 0.43.0-0.43.3: the stem's trailing digits replaced
        stem, _, ext = full.rpartition(".")
        full = f"{stem.rstrip('0123456789')}{value}.{ext}"
    elif style == "resub":  # 0.44-0.49: re.sub(r"cuda\d+", ...) once
        full = re.sub(r"cuda\d+", f"cuda{value}", full, count=1)
    m = LIB_RE.match(full)
    return m.group("name") if m else full


def select_library(bnb_version, torch_cuda, torch_hip, available, environ, loader_rules, *,
                   torch_installed=True, cuda_available=None, highest_cc=None, torch_xpu=None) -> dict:
    """What the installed bitsandbytes would load with this torch, these GPUs and this environment.

    `available`: shipped library names ('cuda130', 'cpu', 'rocm72', 'cuda121_nocublaslt', ...).
    `cuda_available`: False when torch cannot see a GPU (the CPU library is loaded), None when unknown
    (assumed True). `highest_cc`: the best visible GPU ('7.0'), for the `_nocublaslt` variants.
    Returns {'selected', 'selected_exists', 'selected_reason', 'override', 'error', 'fallback'}:
    `selected` is the library the loader looks for; when it is not shipped, `fallback` says what the
    release does then ('cpu': it warns and loads the CPU library; None: loading fails).
    """
    available = set(available)
    out = {"selected": None, "selected_reason": None, "selected_exists": None, "override": None,
           "error": None, "fallback": None}
    if not torch_installed:
        out["selected_reason"] = "torch is not installed; bitsandbytes cannot load without it"
        return out
    rule = rule_for(bnb_version, loader_rules)
    if rule is None:
        out["selected_reason"] = f"no loader rule known for bitsandbytes {bnb_version!r}"
        return out
    if rule.get("on_missing") == "cpu":
        out["fallback"] = "cpu"

    def result(name, reason, **kw):
        return {**out, "selected": name, "selected_exists": name in available, "selected_reason": reason,
                **kw}

    hip = bool(torch_hip)
    xpu = rule.get("xpu", "none")
    if torch_xpu and not torch_cuda and not hip and xpu != "none":
        versioned = f"xpu{str(torch_xpu)[:4]}"
        name = versioned if xpu == "versioned" and versioned in available else "xpu"
        return result(name, f"torch is an XPU build ({torch_xpu})", fallback=None)
    if not torch_cuda and not hip:
        return result("cpu", "torch is a CPU-only build", fallback=None)
    if cuda_available is False:
        return result("cpu", "torch cannot see a GPU, so bitsandbytes loads its CPU library", fallback=None)
    if hip and rule.get("rocm", "none") == "none":
        return {**out, "selected_exists": False, "fallback": None,
                "error": f"bitsandbytes {bnb_version} has no ROCm support (its loader reads "
                         "torch.version.cuda, which a ROCm build leaves unset)",
                "selected_reason": "a ROCm torch: this release's loader fails"}
    prefix = "rocm" if hip else "cuda"
    runtime = runtime_tuple(torch_hip if hip else torch_cuda)
    if runtime is None:
        what = "HIP" if hip else "CUDA"
        out["selected_reason"] = f"cannot parse torch's {what} version {torch_hip or torch_cuda!r}"
        return out
    suffix = ""
    below, cc = rule.get("nocublaslt_below_cc"), cc_tuple(highest_cc)
    if below and not hip and cc and cc < cc_tuple(below):
        suffix = "_nocublaslt"
    exact = f"{prefix}{_digits(runtime, rule.get('version_string', 'concat'))}{suffix}"

    style = rule.get("override_style")
    if hip:
        var = rule.get("rocm_override_var")
        cuda_ov = environ.get(rule.get("override_var") or "")
        if rule.get("cuda_override_on_rocm") == "error" and cuda_ov:
            return {**out, "override": cuda_ov, "selected_exists": False, "fallback": None,
                    "error": f"BNB_CUDA_VERSION={cuda_ov} is set for a ROCm torch: the loader raises",
                    "selected_reason": "BNB_CUDA_VERSION is set with a ROCm torch"}
    else:
        var = rule.get("override_var")
    value = environ.get(var) if var else None
    if value is not None and (style == "digits" or value != ""):
        out["override"] = value
        if style == "digits":
            if not value.isdigit():
                return {**out, "selected_exists": False, "fallback": None,
                        "error": f"{var}={value!r}: value must be digits only (e.g. '124' for 12.4)",
                        "selected_reason": f"{var} is set to a non-digit value; the loader raises"}
            name = f"{prefix}{value}"
        else:
            name = _override(exact, value, style)
        return result(name, f"{var}={value} overrides the automatic choice")

    label = f"torch {'ROCm' if hip else 'CUDA'} {runtime[0]}.{runtime[1]}"
    if exact in available or rule["strategy"] == "exact":
        why = (f"exact match for {label}" if exact in available
               else f"bitsandbytes {bnb_version} needs the exact library for {label}; it does not ship it")
        return result(exact, why)
    shipped = {}
    for name in available:
        if name.startswith(prefix):
            v = split_version(name[len(prefix):], hip)
            if v:
                shipped[v] = name
    lower = [v for v in shipped if v[0] == runtime[0] and v < runtime]
    higher = [v for v in shipped if v[0] == runtime[0] and v > runtime]
    if lower:
        v = max(lower)
        reason = f"no library for {label}; the highest lower one of the same major ({v[0]}.{v[1]})"
    elif higher:
        v = min(higher)
        reason = f"no library for {label}; the lowest higher one of the same major ({v[0]}.{v[1]})"
    else:
        return result(exact, f"no library of the same major as {label} (never across majors)")
    return result(shipped[v], reason)


def loaded(sel: dict) -> str | None:
    """The library that ends up loaded ('cuda128', 'cpu'), or None when loading fails."""
    if sel.get("error") or sel.get("selected") is None:
        return None
    if sel.get("selected_exists"):
        return sel["selected"]
    return sel.get("fallback")


def pick(version, libs, cuda, loader_rules, highest_cc=None) -> str | None:
    """What-if for the rules: the CUDA library release `version` would load for a torch built with CUDA
    `cuda`, shipping `libs`, with no override; None when it would find none."""
    if libs is None or not cuda:
        return None
    if isinstance(cuda, tuple):
        cuda = f"{cuda[0]}.{cuda[1]}"
    sel = select_library(version, str(cuda), None, libs, {}, loader_rules, highest_cc=highest_cc)
    return sel["selected"] if sel.get("selected_exists") else None
