"""Per-image trust regions for the BO attack (TuRBO: Eriksson, Pearce, Gardner, Turner, Poloczek,
"Scalable Global Optimization via Local Bayesian Optimization", NeurIPS 2019).

Each image keeps a hypercube of side ``length`` (in units of the search box's width) centred on
its incumbent latent; the acquisition is maximized inside it. ``succ_tol`` improvements in a row
double the side (up to ``length_max``), ``fail_tol`` non-improvements in a row halve it; below
``length_min`` it restarts at ``length_init``. TuRBO's defaults: 0.8 / 0.5**7 / 1.6, success
tolerance 3, failure tolerance ``max(4, d)`` for one point per step; its lengthscale-shaped box
is replaced here by a cube (the GP's lengthscales are not read back).
"""

from __future__ import annotations

import torch


class TrustRegions:
    """State for ``n`` images: side length (n,), success / failure streaks (n,)."""

    def __init__(self, n: int, d: int, device: torch.device | None = None, length_init: float = 0.8,
                 length_min: float = 0.5**7, length_max: float = 1.6, succ_tol: int = 3,
                 fail_tol: int | None = None) -> None:
        self.length_init, self.length_min, self.length_max = length_init, length_min, length_max
        self.succ_tol, self.fail_tol = succ_tol, max(4, d) if fail_tol is None else fail_tol
        self.length = torch.full((n,), length_init, dtype=torch.float64, device=device)  # (n,)
        self.succ = torch.zeros(n, dtype=torch.long, device=device)
        self.fail = torch.zeros(n, dtype=torch.long, device=device)

    def bounds(self, centre: torch.Tensor, rows: torch.Tensor, box: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower / upper corners (A, d) of the regions of images ``rows`` (A,) around ``centre`` (A, d),
        clipped to ``[-box, box]^d``."""
        half = (self.length[rows] * box).unsqueeze(1)                        # (A, 1): side * (2 box) / 2
        return (centre - half).clamp(-box, box), (centre + half).clamp(-box, box)

    def update(self, rows: torch.Tensor, improved: torch.Tensor) -> None:
        """Record one step of images ``rows`` (A,): ``improved`` (A,) bool."""
        succ = torch.where(improved, self.succ[rows] + 1, 0)
        fail = torch.where(improved, 0, self.fail[rows] + 1)
        length = self.length[rows]
        grow, shrink = succ >= self.succ_tol, fail >= self.fail_tol
        length = torch.where(grow, (2 * length).clamp(max=self.length_max), length)
        length = torch.where(shrink, length / 2, length)
        length = torch.where(length < self.length_min, self.length_init, length)   # restart
        self.succ[rows], self.fail[rows] = torch.where(grow, 0, succ), torch.where(shrink, 0, fail)
        self.length[rows] = length
