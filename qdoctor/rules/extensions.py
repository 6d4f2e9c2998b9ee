"""Compiled extensions next to the stack (QD507, QD508, QD509): flash-attn and xformers built for another
torch, and FlashAttention-2 on a GPU older than Ampere."""

from __future__ import annotations

from qdoctor.findings import Finding
from qdoctor.rules import rule
from qdoctor.rules.common import (
    TORCH_INDEX,
    base,
    cc_tuple,
    group_label,
    minor,
    torch_cuda,
    torch_version,
    visible_gpus,
)

AREA = "packages"
FA_RELEASES = "https://github.com/Dao-AILab/flash-attention/releases"


def _ext(facts) -> dict:
    return facts.get("extensions") or {}


def _pk(facts) -> dict:
    return facts.get("packages") or {}


def _torch_index(facts) -> str:
    tc = torch_cuda(facts)
    return TORCH_INDEX.format(variant=f"cu{tc[0]}{tc[1]}") if tc else TORCH_INDEX.format(variant="cpu")


@rule("QD507", "flash-attn-built-for-other-torch", AREA)
def flash_attn_abi(facts, matrix):
    """flash-attn's library needs c10 symbols this torch does not export (checked name by name in the
    dynamic symbol tables): it was built for another torch minor or C++ ABI, and `import flash_attn` fails
    with "flash_attn_2_cuda...so: undefined symbol: _ZN3c10...". Error; rebuild it against this torch, or
    take the release wheel made for this torch."""
    fa = _ext(facts).get("flash_attn") or {}
    if not fa.get("c10_missing"):
        return []
    tv = torch_version(facts)
    n = fa.get("c10_missing_count") or len(fa["c10_missing"])
    return [Finding("QD507", "error",
                    f"flash-attn {_pk(facts).get('flash-attn') or ''} was built for another torch than {tv}: "
                    f"{n} c10 symbol{'s' * (n != 1)} missing".replace("  ", " "),
                    [f"{fa.get('library')} needs {fa.get('c10_needed')} c10 symbols; torch {tv} lacks: "
                     + ", ".join(fa["c10_missing"][:3]),
                     f"error users see: {fa.get('library')}: undefined symbol: {fa['c10_missing'][0]}"],
                    "pip uninstall -y flash-attn && pip install flash-attn --no-build-isolation "
                    f"--no-cache-dir  # builds against torch {tv}; or the wheel named torch{minor(tv)} from "
                    f"{FA_RELEASES}",
                    AREA)]


@rule("QD508", "xformers-built-for-other-torch", AREA)
def xformers_other_torch(facts, matrix):
    """xformers' C++/CUDA library was built for another torch than the one installed (xformers/cpp_lib.json):
    it warns "xFormers can't load C++/CUDA extensions. xFormers was built for: PyTorch X (you have Y)" and
    its kernels are unavailable. Error; install the xformers release made for this torch."""
    xf = _ext(facts).get("xformers") or {}
    built, tv = xf.get("built_for_torch"), torch_version(facts)
    if not built or not tv or base(built) == base(tv) and str(built).split("+")[-1] == str(tv).split("+")[-1]:
        return []
    xv = _pk(facts).get("xformers") or ""
    title = f"xformers {xv} was built for torch {built}, this is {tv}".replace("  ", " ")
    return [Finding("QD508", "error", title,
                    [f"xformers/cpp_lib.json: torch {built}, CUDA {xf.get('built_for_cuda')}",
                     f"torch.version = {tv}"],
                    f"pip install -U xformers --index-url {_torch_index(facts)}  # the release built for "
                    f"torch {base(tv)}", AREA)]


@rule("QD509", "flash-attn-needs-ampere", AREA)
def flash_attn_pre_ampere(facts, matrix):
    """flash-attn is installed but a visible GPU is older than Ampere (sm_80): FlashAttention-2 refuses it
    ("FlashAttention only supports Ampere GPUs or newer."). Warning: load models with sdpa attention."""
    if "flash-attn" not in _pk(facts):
        return []
    old = [g for g in visible_gpus(facts) if (c := cc_tuple(g.get("compute_capability"))) and c < (8, 0)]
    if not old:
        return []
    return [Finding("QD509", "warning", f"FlashAttention-2 cannot run on {group_label(old)} (needs sm_80+)",
                    [f"flash-attn {_pk(facts)['flash-attn']} installed",
                     *[f"GPU {g.get('index')}: CC {g.get('compute_capability')} < 8.0" for g in old]],
                    "from_pretrained(..., attn_implementation=\"sdpa\")  # not \"flash_attention_2\"", AREA)]
