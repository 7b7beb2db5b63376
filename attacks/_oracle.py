"""A hard-label oracle: the only view of the model a decision-based attack gets.

``LabelOracle(model, n, max_queries)`` answers ``oracle(x, idx) -> labels``: the
predicted class of each image in ``x`` (``argmax`` of the logits, computed under
``torch.no_grad``), charged to the images ``idx`` of the attacked batch. It keeps
the model in a closure (no attribute holds it), never returns logits, and refuses
(``QueryBudgetError``) any query that would take an image past ``max_queries``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class QueryBudgetError(RuntimeError):
    """A query would take an image past its budget (a bug in the attack, never silent)."""


class LabelOracle:
    """Label-only access to ``model`` with a per-image query counter.

    counts: (n,) int64, oracle calls charged to each of the ``n`` attacked images.
    """

    __slots__ = ("_labels", "counts", "max_queries", "calls")

    def __init__(self, model: nn.Module, n: int, max_queries: int, device: torch.device | None = None) -> None:
        def labels(x: torch.Tensor) -> torch.Tensor:  # (A, C, H, W) -> (A,) int64; logits never leave
            with torch.no_grad():
                return model(x).argmax(dim=1)

        self._labels: Callable[[torch.Tensor], torch.Tensor] = labels
        self.counts = torch.zeros(n, dtype=torch.long, device=device)  # (n,)
        self.max_queries = int(max_queries)
        self.calls = 0  # batched model calls (one per BO iteration)

    def __call__(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Labels of ``x`` (A, C, H, W); row ``i`` is charged to image ``idx[i]``. Returns (A,) int64."""
        if x.shape[0] != idx.shape[0]:
            raise ValueError(f"oracle got {x.shape[0]} images but {idx.shape[0]} indices")
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=x.device)
        counts = self.counts.index_add(0, idx, torch.ones_like(idx))  # duplicates in idx add up
        if int(counts.max()) > self.max_queries:
            raise QueryBudgetError(f"query budget of {self.max_queries} per image exceeded")
        self.counts = counts
        self.calls += 1
        return self._labels(x)

    def remaining(self) -> torch.Tensor:
        """(n,) int64 queries left per image."""
        return self.max_queries - self.counts
