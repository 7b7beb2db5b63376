"""The corruption registry and the signature every corruption has.

A corruption is ``fn(x, severity, gens) -> x_c``: ``x (B, C, H, W)`` float in ``[0, 1]``,
``severity`` in ``1..5``, ``gens`` one CPU ``torch.Generator`` per image (all its randomness);
returns a new tensor of the same shape, dtype and device, in ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from robustkit.registry import Registry

Corruption = Callable[[torch.Tensor, int, Sequence[torch.Generator]], torch.Tensor]
CORRUPTIONS: Registry[Corruption] = Registry("corruption")


def level(params: Sequence, severity: int):  # -> one entry of a 5-entry parameter table
    """The parameters of ``severity`` (1..5) from a table of five, as in make_cifar_c (``c[severity - 1]``)."""
    return params[severity - 1]
