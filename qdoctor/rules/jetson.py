"""NVIDIA Jetson rules (QD207, QD412): an L4T board has a GPU but no NVML, and needs Jetson builds.

A Jetson is recognised by /etc/nv_tegra_release (facts.driver.jetson), not by NVML, which L4T does not
ship: it is never "a machine without a GPU". NVIDIA's Jetson torch wheels carry an `nvXX.YY` version tag;
PyPI's aarch64 wheels are built for server ARM (aarch64-sbsa) and do not run their CUDA code on L4T.
"""

from __future__ import annotations

from qdoctor.findings import Finding
from qdoctor.rules import rule
from qdoctor.rules.common import bnb, bnb_version, sm, torch_version


def _jetson(facts) -> dict | None:
    return (facts.get("driver") or {}).get("jetson")


def _board_cc(matrix, model: str | None) -> str | None:
    for b in (matrix.get("jetson") or {}).get("board", []):
        if model and b["model"].lower() in model.lower():
            return b["cc"]
    return None


def _index(matrix) -> str:
    return ((matrix.get("jetson") or {}).get("index") or {}).get("url", "https://pypi.jetson-ai-lab.io/")


@rule("QD207", "jetson", "nvidia")
def jetson(facts, matrix):
    """An NVIDIA Jetson (L4T): an integrated GPU without NVML, so the driver and GPU facts are read from
    /etc/nv_tegra_release and the board model. Info with a Jetson build of torch (version tagged nvXX.YY);
    error when torch is CPU-only or a PyPI aarch64 build, which cannot use the Jetson GPU."""
    j = _jetson(facts)
    if not j:
        return []
    t = facts.get("torch") or {}
    tv = torch_version(facts) or ""
    cc = _board_cc(matrix, j.get("model"))
    title = f"NVIDIA Jetson: {j.get('model') or 'unknown board'}, L4T R{j.get('l4t')}" + (
        f", GPU {sm(cc)}" if cc else "")
    ev = [f"driver.jetson.l4t = {j.get('l4t')}", f"driver.jetson.model = {j.get('model')}",
          "no NVML on L4T: GPU facts come from the board"]
    if not tv or (t.get("cuda") and ".nv" in tv):
        return [Finding("QD207", "info", title, ev + ([f"torch.version = {tv}"] if tv else []),
                        None, "nvidia")]
    what = ("a CPU-only build" if not t.get("cuda")
            else "not a Jetson build (PyPI aarch64 wheels target server ARM)")
    return [Finding("QD207", "error", f"{title}; torch {tv} is {what}: it cannot use the Jetson GPU",
                    ev + [f"torch.version = {tv}, torch.cuda = {t.get('cuda')}"],
                    f"pip install torch --index-url {_index(matrix).rstrip('/')}/jp6/cu126  "
                    f"# JetPack 6 (L4T R36); other JetPacks: {_index(matrix)}", "nvidia")]


@rule("QD412", "bitsandbytes-pypi-wheel-on-jetson", "bitsandbytes")
def bnb_on_jetson(facts, matrix):
    """A PyPI manylinux aarch64 bitsandbytes wheel on a Jetson: it is built against the aarch64-sbsa CUDA
    toolkit, not L4T's, so `import bitsandbytes` works and the first 4-bit kernel fails with "Error named
    symbol not found at line 233 in file /src/csrc/ops.cu". Error; build it on the Jetson or install a
    Jetson build."""
    j = _jetson(facts)
    b = bnb(facts)
    tag = b.get("wheel_tag") or ""
    if not j or not b.get("installed") or "manylinux" not in tag:
        return []
    return [Finding("QD412", "error",
                    f"bitsandbytes {bnb_version(facts)} is the PyPI aarch64 wheel ({tag}): its CUDA code "
                    "does not run on a Jetson",
                    [f"bitsandbytes.wheel_tag = {tag}", f"driver.jetson.l4t = {j.get('l4t')}",
                     "error users see: Error named symbol not found at line 233 in file /src/csrc/ops.cu"],
                    "git clone https://github.com/bitsandbytes-foundation/bitsandbytes && cd bitsandbytes && "
                    "cmake -DCOMPUTE_BACKEND=cuda -S . && make && pip install .  "
                    f"# or a Jetson build from {_index(matrix)}", "bitsandbytes")]
