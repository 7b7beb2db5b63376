"""Accuracy over a loader: clean (here) and robust (attacks). Batched, device-aware, progress bars."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from attacks.base import eval_mode


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512, amp: bool = False) -> torch.Tensor:
    """Predicted labels ``(N,)`` for images ``(N, C, H, W)`` in ``[0, 1]``, in eval mode."""
    dev = _device_of(model)
    out = []
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].to(dev)
            with torch.autocast(dev.type, enabled=amp and dev.type == "cuda"):
                out.append(model(xb).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


@torch.inference_mode()
def clean_accuracy(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], amp: bool = False,
                   progress: bool = False, desc: str = "clean") -> dict[str, Any]:
    """``{"clean_accuracy", "n", "correct" (N,) bool, "seconds"}`` over ``loader``."""
    dev = _device_of(model)
    t0 = time.perf_counter()
    correct = []
    with eval_mode(model):
        for x, y in tqdm(loader, desc=desc, disable=not progress, leave=False):
            x, y = x.to(dev), y.to(dev)
            with torch.autocast(dev.type, enabled=amp and dev.type == "cuda"):
                correct.append((model(x).argmax(1) == y).cpu())
    c = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    return {"clean_accuracy": float(c.float().mean()) if c.numel() else 0.0, "n": int(c.numel()),
            "correct": c, "seconds": time.perf_counter() - t0}
