"""What the `qdoctor train` end-to-end tests share: a recorded CPU machine and passing probes (the fixtures
that use them, `train_env` and `pf`, are in conftest.py)."""

from __future__ import annotations

from click.testing import CliRunner

from qdoctor.train import cli as train_cli
from qdoctor.train import preflight

CPU_FACTS = {
    "platform": {"memory_total_mib": 24000},
    "nvidia": {"gpus": []},
    "torch": {"cuda": None, "cuda_available": False},
    "bitsandbytes": {"installed": True, "loads": True},
}
PROBES = [{"probe": n, "status": "pass"} for n in preflight.CPU_PROBES]
FAST = ["--max-steps", "6", "--save-every", "2", "--eval-every", "3", "--batch-size", "8"]


def invoke(*args):
    return CliRunner().invoke(train_cli.train, list(args), catch_exceptions=False)
