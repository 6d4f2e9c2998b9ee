"""Environment variables and platform detection: secrets never leave, containers and WSL are seen."""

from __future__ import annotations

import json

from qdoctor.facts import env, platform


def test_env_masks_credentials_and_keeps_what_matters():
    environ = {"PIP_INDEX_URL": "https://alice:s3cr3tpw@pypi.example.com/simple",
               "HF_TOKEN": "hf_abcdefghijklmnopqrstuvwxyz", "MY_API_KEY": "k-123456",
               "CUDA_VISIBLE_DEVICES": "0,1", "BNB_CUDA_VERSION": "128", "UNRELATED": "x",
               "HTTPS_PROXY": "http://bob:hunter22@proxy:3128"}
    out = env.collect(environ)
    assert out["CUDA_VISIBLE_DEVICES"] == "0,1" and out["BNB_CUDA_VERSION"] == "128"
    assert out["HF_TOKEN"] == "***" and out["MY_API_KEY"] == "***"
    assert out["PIP_INDEX_URL"] == "https://***@pypi.example.com/simple"
    assert "UNRELATED" not in out
    assert out["LD_LIBRARY_PATH"] is None  # listed, unset -> null
    text = json.dumps(out)
    for secret in ("s3cr3tpw", "alice", "hf_abcdefghijklmnopqrstuvwxyz", "k-123456", "hunter22"):
        assert secret not in text


def test_container_detection():
    assert platform.container({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "kubernetes"
    assert platform.container({}, exists=lambda p: p == "/.dockerenv", read=lambda p: "") == "docker"
    assert platform.container({}, exists=lambda p: p == "/run/.containerenv", read=lambda p: "") == "podman"
    assert platform.container({}, exists=lambda p: False, read=lambda p: "0::/lxc/payload") == "lxc"
    assert platform.container({}, exists=lambda p: False, read=lambda p: "0::/init.scope") is None


def test_wsl_from_environment():
    assert platform.wsl({"WSL_DISTRO_NAME": "Ubuntu"}) is True


def test_platform_collect_has_the_contract_keys():
    p = platform.collect({})
    for key in ("system", "release", "machine", "python", "python_executable", "libc", "wsl", "container",
                "cpu_count", "memory_total_mib"):
        assert key in p
    assert p["python"].count(".") == 2 and p["cpu_count"] >= 1
