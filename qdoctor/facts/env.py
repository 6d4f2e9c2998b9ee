"""Environment variables that change what the stack does; credential-like ones only as "set" (***).

Besides the names listed, every NCCL_* and TORCH_NCCL_* variable that is set: they steer the collectives of a
run on several GPUs (transports, interfaces, timeouts), and a bug report should show them."""

from __future__ import annotations

import os

from qdoctor.redact import is_secret_name, redact_env_value

NAMES = (
    "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES", "CUDA_LAUNCH_BLOCKING",
    "BNB_CUDA_VERSION", "BNB_ROCM_VERSION", "LD_LIBRARY_PATH", "LD_PRELOAD", "CUDA_HOME", "CUDA_PATH",
    "CONDA_PREFIX", "CONDA_DEFAULT_ENV", "VIRTUAL_ENV", "PYTHONPATH", "PYTORCH_CUDA_ALLOC_CONF",
    "PYTORCH_ALLOC_CONF", "PYTORCH_NVML_BASED_CUDA_CHECK", "TORCH_CUDA_ARCH_LIST", "TORCH_HOME",
    "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HF_HOME", "HF_HUB_CACHE", "TRANSFORMERS_CACHE",
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER",
    "HF_ENDPOINT", "NCCL_P2P_DISABLE", "NCCL_IB_DISABLE", "NCCL_DEBUG", "OMP_NUM_THREADS",
    "MKL_NUM_THREADS", "TOKENIZERS_PARALLELISM", "ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION",
    "WANDB_MODE", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "UV_INDEX_URL",
    "UV_EXTRA_INDEX_URL", "HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "https_proxy", "http_proxy", "no_proxy",
    "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "XDG_CACHE_HOME",
)


PREFIXES = ("NCCL_", "TORCH_NCCL_")


def collect(environ=None) -> dict:
    """Every name in NAMES (null when unset) plus the names of credential-like variables that are set."""
    env = os.environ if environ is None else environ
    out = {name: redact_env_value(name, env.get(name)) for name in NAMES}
    for name in sorted(env):
        if name not in out and name.startswith(PREFIXES):
            out[name] = redact_env_value(name, env.get(name))
        elif name not in out and is_secret_name(name) and env.get(name):
            out[name] = "***"
    return out
