"""Small helpers shared by the baseline tricks: per-epoch metric sums and the weight-decay switch."""
from __future__ import annotations

from typing import Any, Iterable

import torch


class EpochMeter:
    """Running sums kept on the device and read once per epoch, so no step waits for the host.

    The names are fixed up front: every process then reduces a tensor of the same shape, whatever
    it saw, and `pop` gives identical values on all processes (sum over processes, then divide).
    """

    def __init__(self, names: Iterable[str]):
        self.names = tuple(names)
        self.reset()

    def reset(self) -> None:
        self.totals: dict[str, list[Any]] = {n: [0.0, 0.0] for n in self.names}  # [sum, count]

    def add(self, name: str, value, count=1) -> None:
        total = self.totals[name]
        for i, x in enumerate((value, count)):
            total[i] = total[i] + (x.detach().double() if torch.is_tensor(x) else float(x))

    def pop(self, accelerator=None) -> dict[str, float]:
        """sum / count per name over all processes (names never fed are left out); then reset."""
        if not self.names:
            return {}
        device = accelerator.device if accelerator is not None else "cpu"
        flat = torch.stack([torch.as_tensor(x, dtype=torch.float64).to(device).reshape(())
                            for n in self.names for x in self.totals[n]])
        if accelerator is not None and accelerator.num_processes > 1:
            flat = accelerator.reduce(flat, reduction="sum")
        flat = flat.cpu().tolist()
        self.reset()
        return {n: flat[2 * i] / flat[2 * i + 1] for i, n in enumerate(self.names) if flat[2 * i + 1] > 0}


def disable_weight_decay(optimizer: torch.optim.Optimizer) -> None:
    """Explicit-penalty regularizers replace the optimizer's weight decay (the L2-SP and DELTA papers)."""
    for group in optimizer.param_groups:
        group["weight_decay"] = 0.0


def squared_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """sum ||t||^2 over the tensors, in float32 or wider."""
    terms = [t.float().pow(2).sum() for t in tensors]
    return torch.stack(terms).sum() if terms else torch.zeros(())

