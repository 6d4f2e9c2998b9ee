"""Rules for several GPUs (QD204 mixed models, QD220-QD222), judged on recorded machines and variants, both
ways: each fires on the machine that has the problem and stays silent on the one next to it."""

from __future__ import annotations

import copy

from test_rules_snapshots import load, problems, run, text_of, variant

H200 = "h200-synthetic"


def two_h200(**changes) -> dict:
    """The H200 machine with a second H200 (an HGX board's first two GPUs)."""
    d = variant(H200, **changes)
    g = copy.deepcopy(d["nvidia"]["gpus"][0])
    d["nvidia"]["gpus"].append({**g, "index": 1})
    return d


def codes(findings, code):
    return [f for f in findings if f.code == code]


# ---- QD204: mixed GPU models, and which one a run uses ----

def test_mixed_models_name_the_gpu_a_run_uses():
    fs = run(load("mixed-gpus"))  # A100 40 GB + V100 16 GB
    text = text_of(fs, "QD204")
    assert "a one-GPU run uses cuda:0 = GPU 0 (NVIDIA A100-PCIE-40GB)" in text
    assert "40960 MiB" in text and "16384 MiB" in text and "--nproc 2" in text
    assert "CUDA_VISIBLE_DEVICES=0" in text


def test_the_run_gpu_follows_cuda_visible_devices():
    d = load("mixed-gpus")
    d["env"]["CUDA_VISIBLE_DEVICES"] = "1,0"
    text = text_of(run(d), "QD204")
    assert "a one-GPU run uses cuda:0 = GPU 1 (Tesla V100-PCIE-16GB)" in text
    assert "under CUDA_VISIBLE_DEVICES=1,0" in text


def test_same_architecture_but_different_memory_is_mixed_too():
    d = two_h200()
    d["nvidia"]["gpus"][1].update(name="NVIDIA H100 80GB HBM3", memory_total_mib=81559)
    text = text_of(run(d), "QD204")
    assert "143771 MiB" in text and "81559 MiB" in text and "only the sm_90, 140 GiB GPUs" in text
    assert not codes(run(two_h200()), "QD204")  # two of the same: silent
    assert not codes(run(load(H200)), "QD204")


# ---- QD220: several GPUs, NCCL, peer-to-peer ----

def test_several_gpus_show_nccl_and_the_processes_they_would_get():
    d = two_h200(**{"torch.nccl": {"version": "2.28.9", "source": "nvidia-nccl-cu13 wheel"}})
    fs = run(d)
    f = codes(fs, "QD220")[0]
    assert f.severity == "info" and f.title == "2 GPUs for data-parallel training (NCCL 2.28.9)"
    text = text_of(fs, "QD220")
    assert "cuda:1 = GPU 1 (NVIDIA H200, sm_90, 140 GiB)" in text and "nvidia-nccl-cu13 wheel" in text
    assert "peer-to-peer access: not checked" in text and "qdoctor smoke --probe ddp" in text
    assert problems(fs) == (set(), set())  # information, not a problem
    assert not codes(run(load(H200)), "QD220")  # one GPU: nothing to say


def test_nccl_from_the_wheel_in_an_older_snapshot_and_from_deep():
    d = two_h200(**{"packages.nvidia-nccl-cu12": "2.21.5"})
    assert "NCCL 2.21.5" in codes(run(d), "QD220")[0].title
    d = two_h200(**{"torch.nccl": None})  # read by this qdoctor, and not found
    assert "no nvidia-nccl wheel" in text_of(run(d), "QD220")
    d = two_h200(**{"torch.nccl": {"version": "2.27.3", "source": "torch.cuda.nccl.version() (--deep)"},
                    "torch.p2p": [[0, 1, True], [1, 0, True]]})
    f = codes(run(d), "QD220")[0]
    assert f.title.endswith("(NCCL 2.27.3, peer-to-peer between all)") and "0->1 yes" in "\n".join(f.evidence)


# ---- QD221: no peer-to-peer access (--deep) ----

def test_missing_peer_access_is_reported_with_what_to_do_if_it_hangs():
    d = two_h200(**{"torch.p2p": [[0, 1, False], [1, 0, False]]})
    fs = run(d)
    f = codes(fs, "QD221")[0]
    assert f.severity == "info" and "cuda:0 and cuda:1" in f.title and "host memory" in f.title
    assert "NCCL_P2P_DISABLE=1" in f.fix and "pci-access-control-services-acs" in f.fix
    assert "peer-to-peer not between all" in codes(fs, "QD220")[0].title
    assert not codes(run(two_h200(**{"torch.p2p": [[0, 1, True], [1, 0, True]]})), "QD221")
    assert not codes(run(two_h200()), "QD221")  # not checked is not missing


# ---- QD222: NCCL variables ----

def test_nccl_variables_are_listed():
    d = two_h200(**{"env.NCCL_DEBUG": "INFO", "env.NCCL_SOCKET_IFNAME": "eth0"})
    f = codes(run(d), "QD222")[0]
    assert f.severity == "info" and f.title == "NCCL settings: NCCL_DEBUG, NCCL_SOCKET_IFNAME"
    assert "NCCL_SOCKET_IFNAME=eth0" in f.evidence
    assert not codes(run(two_h200()), "QD222")


def test_a_transport_turned_off_where_the_gpus_have_it_is_a_warning():
    p2p = [[0, 1, True], [1, 0, True]]
    fs = run(two_h200(**{"env.NCCL_P2P_DISABLE": "1", "torch.p2p": p2p}))
    assert "QD222" in problems(fs)[1]
    title = codes(fs, "QD222")[0].title
    assert "NCCL_P2P_DISABLE turns off NCCL's peer-to-peer (NVLink/PCIe) transport" in title
    # both off: sockets
    fs = run(two_h200(**{"env.NCCL_P2P_DISABLE": "1", "env.NCCL_SHM_DISABLE": "1"}))
    assert codes(fs, "QD222")[0].title.endswith("NCCL falls back to sockets")
    # P2P off where there is none anyway (consumer GPUs), or on a one-GPU machine: only listed
    fs = run(two_h200(**{"env.NCCL_P2P_DISABLE": "1", "torch.p2p": [[0, 1, False], [1, 0, False]]}))
    assert codes(fs, "QD222")[0].severity == "info"
    assert codes(run(variant(H200, **{"env.NCCL_P2P_DISABLE": "1"})), "QD222")[0].severity == "info"


def test_nccl_values_stay_redacted():
    from qdoctor.facts import env

    e = env.collect({"NCCL_IB_HCA": "https://user:secret@host", "NCCL_DEBUG": "WARN", "PATH": "/bin"})
    assert e["NCCL_DEBUG"] == "WARN" and "secret" not in e["NCCL_IB_HCA"] and "PATH" not in e


# ---- the facts behind them ----

def test_nccl_version_is_read_without_importing_torch(tmp_path):
    from qdoctor.facts import torch_build

    assert torch_build.nccl({"nvidia-nccl-cu13": "2.28.9"}, None) == {"version": "2.28.9",
                                                                     "source": "nvidia-nccl-cu13 wheel"}
    (tmp_path / "libnccl.so.2.21.5").write_bytes(b"")
    got = torch_build.nccl({}, str(tmp_path))
    assert got == {"version": "2.21.5", "source": "torch/lib/libnccl.so.2.21.5"}
    assert torch_build.nccl({}, str(tmp_path / "missing")) is None


def test_deep_facts_carry_peer_access_and_nccl():
    from qdoctor.facts import runtime

    facts = {"torch": {"nccl": None}, "bitsandbytes": {}}
    payload = {"torch": {"imported": True, "cuda_available": True, "device_count": 2,
                         "devices": [{"index": 0}, {"index": 1}], "p2p": [[0, 1, False], [1, 0, False]],
                         "nccl_version": "2.27.3"}}
    out = runtime.merge(facts, {"runtime": {"ran": True}, "payload": payload})
    assert out["torch"]["p2p"] == [[0, 1, False], [1, 0, False]]
    assert out["torch"]["nccl"] == {"version": "2.27.3", "source": "torch.cuda.nccl.version() (--deep)"}


def test_peer_access_pairs_are_asked_of_torch():
    from types import SimpleNamespace

    from qdoctor.facts.runtime import _peer_access

    fake = SimpleNamespace(cuda=SimpleNamespace(can_device_access_peer=lambda i, j: (i, j) != (1, 2)))
    assert _peer_access(fake, 3) == [[0, 1, True], [0, 2, True], [1, 0, True], [1, 2, False], [2, 0, True],
                                     [2, 1, True]]
