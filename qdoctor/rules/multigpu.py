"""Several GPUs (QD220-QD222): what a data-parallel run across them would use and meet: NCCL, peer-to-peer
access between the GPUs, and the NCCL_* variables that steer it. Mixed GPU models are QD204; a container's
/dev/shm, QD612; an NVSwitch machine's fabric manager, QD205.

Sources: NCCL's troubleshooting guide (PCI Access Control Services: "IO virtualization ... can cause hangs or
poor performance", https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/troubleshooting.html#pci-access-
control-services-acs); NVIDIA's answer in https://github.com/NVIDIA/nccl/issues/199 (disable ACS, or
NCCL_P2P_DISABLE=1 to use shared memory instead of CUDA P2P); NCCL's environment variables,
https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html.
"""

from __future__ import annotations

from qdoctor import devices
from qdoctor.findings import Finding
from qdoctor.rules import rule
from qdoctor.rules.common import gib, sm, torch_cuda, visible_gpus

ACS_DOC = ("https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/troubleshooting.html"
           "#pci-access-control-services-acs")
# variables that change which transport NCCL uses: set while chasing a hang, then forgotten
TRANSPORT_OFF = {"NCCL_P2P_DISABLE": "peer-to-peer (NVLink/PCIe)", "NCCL_SHM_DISABLE": "shared memory",
                 "NCCL_IB_DISABLE": "InfiniBand/RoCE"}


def _nccl(facts) -> dict | None:
    """The NCCL torch will load: the torch facts' (collector or --deep), else the nvidia-nccl wheel installed
    (snapshots from before the collector read it)."""
    from qdoctor.facts.torch_build import NCCL_WHEELS

    n = (facts.get("torch") or {}).get("nccl")
    if isinstance(n, dict) and n.get("version"):
        return n
    pk = facts.get("packages") or {}
    return next(({"version": pk[w], "source": f"{w} wheel"} for w in NCCL_WHEELS if pk.get(w)), None)


def _p2p(facts) -> list:
    return [x for x in (facts.get("torch") or {}).get("p2p") or [] if isinstance(x, list) and len(x) == 3]


def _gpu_line(facts, i: int) -> str:
    g = devices.gpu_for(facts, f"cuda:{i}") or {}
    return (f"cuda:{i} = GPU {g.get('index', '?')} ({g.get('name') or 'unknown GPU'}, "
            f"{sm(g.get('compute_capability'))}, {gib(g.get('memory_total_mib'))})")


@rule("QD220", "several-gpus", "nvidia")
def several_gpus(facts, matrix):
    """Two or more GPUs visible to a CUDA build of torch: what `qdoctor train --nproc N` (or torchrun /
    accelerate launch) would use, one process per GPU: the GPUs in CUDA order, the NCCL library that carries
    the gradients (read from the nvidia-nccl wheel or torch/lib, or with --deep from torch itself), and
    whether each pair of GPUs can reach the other's memory directly (--deep). Info."""
    gpus = visible_gpus(facts)
    if len(gpus) < 2 or torch_cuda(facts) is None:
        return []
    nccl = _nccl(facts)
    p2p = _p2p(facts)
    ev = [_gpu_line(facts, i) for i in range(len(gpus))]
    if nccl:
        ev.append(f"NCCL {nccl['version']} ({nccl.get('source')})")
    elif "nccl" in (facts.get("torch") or {}):
        ev.append("NCCL version unknown: no nvidia-nccl wheel and no libnccl in torch/lib (a build that "
                  "links it in); `qdoctor check --deep` asks torch")
    else:
        ev.append("NCCL version not in these facts (recorded before qdoctor read it)")
    if p2p:
        ev.append("peer-to-peer: " + ", ".join(f"{i}->{j} {'yes' if ok else 'no' if ok is False else '?'}"
                                               for i, j, ok in p2p))
    else:
        ev.append("peer-to-peer access: not checked (`qdoctor check --deep` asks torch)")
    ev.append(f"`qdoctor train --nproc {len(gpus)}` puts rank r on cuda:r; `qdoctor smoke --probe ddp` runs "
              "an all-reduce and a DDP QLoRA step on two of them")
    where = f"NCCL {nccl['version']}" if nccl else "NCCL version unknown"
    if p2p:
        where += ", peer-to-peer " + ("between all" if all(ok for *_, ok in p2p) else "not between all")
    return [Finding("QD220", "info", f"{len(gpus)} GPUs for data-parallel training ({where})", ev,
                    "qdoctor smoke --probe ddp  # two processes: an all-reduce and one DDP QLoRA step",
                    "nvidia")]


@rule("QD221", "gpu-peer-access-missing", "nvidia")
def peer_access_missing(facts, matrix):
    """(--deep) Some visible GPUs cannot read each other's memory directly
    (torch.cuda.can_device_access_peer): NCCL then moves gradients through host memory, which is slower and
    needs a large /dev/shm in containers.
    Common on consumer GPUs without NVLink. Where P2P is offered but broken (PCIe ACS, an IOMMU), collectives
    hang instead: `qdoctor smoke --probe ddp` finds that, and NCCL_P2P_DISABLE=1 works around it. Info."""
    missing = [(i, j) for i, j, ok in _p2p(facts) if ok is False]
    if not missing:
        return []
    pairs = sorted({tuple(sorted(p)) for p in missing})
    ev = [f"torch.cuda.can_device_access_peer({i}, {j}) = False" for i, j in missing]
    ev.append("NCCL uses its shared-memory transport between these GPUs instead")
    return [Finding("QD221", "info",
                    "no peer-to-peer access between " + ", ".join(f"cuda:{a} and cuda:{b}" for a, b in pairs)
                    + ": NCCL goes through host memory (slower)", ev,
                    "nothing to do if `qdoctor smoke --probe ddp` passes; if collectives hang, check PCIe "
                    f"ACS and the IOMMU ({ACS_DOC}) or export NCCL_P2P_DISABLE=1", "nvidia")]


@rule("QD222", "nccl-variables-set", "environment")
def nccl_variables(facts, matrix):
    """NCCL_* / TORCH_NCCL_* variables are set (values redacted like every value qdoctor prints): they change
    how a run on several GPUs communicates, so they are listed (info). Turning off a transport the GPUs of
    this host would use is a warning: NCCL_P2P_DISABLE=1 where the GPUs have peer-to-peer access (--deep),
    NCCL_SHM_DISABLE=1 where peer-to-peer is off or missing (with both off NCCL falls back to sockets). Often
    set to chase a hang and then forgotten, they make every all-reduce slower."""
    env = facts.get("env") or {}
    set_ = {k: v for k, v in sorted(env.items()) if k.startswith(("NCCL_", "TORCH_NCCL_")) and v is not None}
    if not set_:
        return []
    off = {k for k in TRANSPORT_OFF if str(set_.get(k, "")).strip().lower() in ("1", "true", "yes")}
    ev = [f"{k}={v}" for k, v in set_.items()]
    several = len(visible_gpus(facts)) > 1
    p2p = _p2p(facts)
    costly = []
    if "NCCL_P2P_DISABLE" in off and any(ok for *_, ok in p2p):
        costly.append("NCCL_P2P_DISABLE")
    if "NCCL_SHM_DISABLE" in off and ("NCCL_P2P_DISABLE" in off or any(ok is False for *_, ok in p2p)):
        costly.append("NCCL_SHM_DISABLE")
    p2p_works = "NCCL_P2P_DISABLE" in costly
    if several and costly:
        both = "NCCL_P2P_DISABLE" in off and "NCCL_SHM_DISABLE" in off
        return [Finding("QD222", "warning",
                        f"{', '.join(costly)} turn{'s' * (len(costly) == 1)} off NCCL's "
                        f"{' and '.join(TRANSPORT_OFF[k] for k in costly)} transport"
                        + (": NCCL falls back to sockets" if both else ": slower collectives"),
                        ev + (["the GPUs can access each other peer-to-peer (--deep)"] if p2p_works else []),
                        f"unset {' '.join(costly)} unless it works around a hang here (then see {ACS_DOC})",
                        "environment")]
    return [Finding("QD222", "info", f"NCCL settings: {', '.join(set_)}", ev, None, "environment")]
