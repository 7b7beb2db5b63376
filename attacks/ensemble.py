"""A collection of surrogate models attacked as one (LGV's weight snapshots, any ensemble).

``ModelCollection`` is an ``nn.Module`` whose forward is the mean of its members' logits (what
the collection predicts, and what an ordinary attack on it ascends); ``attacks.lgv`` instead
takes one member per iteration, cycling, as the LGV code does. All members share the input
contract (pixel space ``(B, C, H, W)`` in ``[0, 1]``), the number of classes and the input shape.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from robustkit.errors import InputError


class ModelCollection(nn.Module):
    """``K`` models with one input shape and one number of classes; ``forward`` averages logits."""

    def __init__(self, members: Sequence[nn.Module], name: str = "collection") -> None:
        super().__init__()
        if not members:
            raise InputError("a model collection needs at least one model")
        ks = {getattr(m, "num_classes", None) for m in members}
        shapes = {tuple(getattr(m, "input_shape", ()) or ()) for m in members}
        if len(ks) > 1 or len(shapes) > 1:
            raise InputError(f"the models of a collection must share classes and input shape, got classes "
                             f"{sorted(map(str, ks))} and shapes {sorted(map(str, shapes))}")
        self.members = nn.ModuleList(members)
        self.name = name
        first = members[0]
        self.arch = f"collection of {len(members)} x {getattr(first, 'arch', type(first).__name__)}"
        k, shape = ks.pop(), shapes.pop()
        if isinstance(k, int):
            self.num_classes = k
        if shape:
            self.input_shape = shape

    def __len__(self) -> int:
        return len(self.members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        return torch.stack([m(x) for m in self.members]).mean(0)


def members_of(model: nn.Module) -> list[nn.Module]:
    """The members of a ``ModelCollection``; any other model is a collection of one."""
    return list(model.members) if isinstance(model, ModelCollection) else [model]
