"""The probe context: what the runner tells a probe (device, dtype, seed, faults). No torch import."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Ctx:
    device: str = "cpu"  # "cpu" | "cuda:N"
    compute_dtype: str | None = None  # None: chosen for the device (see choose_compute_dtype)
    seed: int = 0
    inject: str | None = None  # fault injection for tests (runner.INJECTIONS)
    workdir: str | None = None  # a private temporary directory
    extra: dict = field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    def torch_device(self):
        import torch

        dev = torch.device(self.device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return dev

    def dtype(self):
        from qdoctor.smoke.probes.common import DTYPES, choose_compute_dtype

        return DTYPES[self.compute_dtype or choose_compute_dtype(self.device)]

    def corrupt(self, t):
        """Fault injection `wrong`: shift a result so that the parent's verdict must catch it."""
        if self.inject != "wrong":
            return t
        import torch

        g = torch.Generator(device="cpu").manual_seed(1234)
        noise = torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.device, t.dtype)
        return t + noise * (t.float().abs().mean() + 1).to(t.dtype)
