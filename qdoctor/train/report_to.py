"""`--report-to tensorboard`: the training metrics as TensorBoard event files, beside metrics.jsonl.

The transformers ecosystem logs to trackers (`TrainingArguments(report_to=...)`); TensorBoard is the one
that needs no account and no network. It stays optional: `torch.utils.tensorboard` writes the files but
needs the `tensorboard` package, so asking for it without the package is a one-line usage error (exit 2)
before anything runs, and the run never depends on it otherwise. Tags follow the Trainer's names
(train/loss, train/learning_rate, train/grad_norm, eval/loss), so dashboards built for it read these too.
"""

from __future__ import annotations

import math
from importlib.util import find_spec
from pathlib import Path

CHOICES = ("none", "tensorboard")
LOGDIR = "tensorboard"  # inside the run directory
TAGS = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
        "eval_loss": "eval/loss", "tokens_per_s": "train/tokens_per_s", "micro_batch": "train/micro_batch"}


def missing(name: str) -> str | None:
    """Why `name` cannot be used here (one line), or None when it can."""
    if name == "tensorboard" and find_spec("tensorboard") is None:
        return ("--report-to tensorboard needs the tensorboard package, which is not installed: "
                "pip install tensorboard")
    return None


class TensorBoardWriter:
    """One SummaryWriter per process, opened at the first metric. Its purge_step is that first step, so
    after a resume TensorBoard hides what an interrupted run logged past its checkpoint."""

    def __init__(self, output: Path):
        self.logdir = Path(output) / LOGDIR
        self.writer = None

    def write(self, rec: dict) -> None:
        step = rec["step"]
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.logdir), purge_step=step)
        for key, tag in TAGS.items():
            v = rec.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.writer.add_scalar(tag, v, step)

    def flush(self) -> None:
        """To disk: the loop calls it with metrics.jsonl's own flush (every few seconds, before each
        checkpoint, and when the loop ends, however it ends), not on every step."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def writer_for(name: str, output: Path) -> TensorBoardWriter | None:
    return TensorBoardWriter(output) if name == "tensorboard" else None
