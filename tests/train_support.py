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


def toy_lm(vocab: int = 16, record=None):
    """A two-layer next-token model with the causal LM's call signature (input_ids, labels,
    attention_mask -> .loss), for loop tests that need no transformers model; `record` gets each forward's
    row length."""
    from types import SimpleNamespace

    import torch

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, 8)
            self.out = torch.nn.Linear(8, vocab)

        def forward(self, input_ids, labels, attention_mask=None):
            if record is not None:
                record.append(input_ids.shape[1])
            logits = self.out(self.emb(input_ids))
            return SimpleNamespace(loss=torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100))

    return Toy()
