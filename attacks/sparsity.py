"""Adversarial sparsity: how hard is it to find a successful perturbation in a constrained direction?

Olivier & Raj, "How many perturbations break this model? Evaluating robustness beyond
adversarial accuracy", ICML 2023 (https://arxiv.org/abs/2207.04129; code
``RaphaelOlivier/sparsity``, ``angles/metrics_estimation.py``). For a point ``x`` that is
correctly classified and *vulnerable* (an unconstrained PGD at ``eps`` breaks it), draw ``D``
random directions; in each, binary-search the smallest constraint under which a
direction-constrained PGD still finds an adversarial example within ``eps``:

- L2 (*angular* sparsity): the half-angle ``theta`` of a cone around a uniform random axis
  ``u``, searched in ``[pi/128, pi/2]``;
- L-inf: the number ``k`` of free coordinates, the others fixed at the vertex ``eps * s`` of the
  ball (``s`` random signs; coordinates freed in a random order), searched in ``[16, 1024]``.

The point's sparsity is the mean over directions of that critical value; we report it on
``[0, 1]`` (``theta / (pi/2)``, ``k / d`` with ``d = C*H*W`` coordinates), higher = sparser
adversarial examples = more robust. A correct point the unconstrained attack cannot break gets
1 (the official L-inf code returns ``d``, i.e. 1; its L2 code leaves such points out: the
``mean`` / ``median`` of the summary are over vulnerable points, ``mean_all`` counts them as 1);
misclassified points get NaN.

Defaults (the code's ``scripts/script_utils.py`` and ``run.sh``): 64 directions, 10 search steps;
L2 PGD 10 steps of 0.5 at eps 1 (step ``eps / 2``); L-inf 20 steps of 0.01 at eps 0.0356
(step ``0.281 * eps``); no random start (rows start at ``eps * u`` / ``eps * s``). Each search
step tests the midpoint of the row's interval; the result is the last midpoint, as in the code.

Deviations from the official code (we follow the paper's definitions): the cone projection is
exact (the code's moves the iterate only part of the way into the cone); free L-inf coordinates
are clipped to ``[-eps, eps]`` (the code leaves them unbounded, outside the threat model); a row
counts as broken if any PGD iterate broke it (our shared loop), not only the last; every claimed
success is re-checked on its ``x_adv`` (label flipped, inside the ball and ``[0, 1]``);
``max_pixels`` is capped at ``d`` (1024 exceeds MNIST's 784).

Batched over points and directions: every (point, direction) pair is a row of the shared PGD
loop (``attacks._loop``), ``batch_size`` rows per model call; rows that succeed leave the batch.
Directions come from a generator seeded by ``(seed, image index)``, so results do not depend on
batching and are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attacks._compact import compact_every
from attacks._cones import ConeStep, DirectedStart, directions, free_mask
from attacks._loop import LoopOptions, Record, run
from attacks._losses import loss_fn
from attacks.base import check_inputs, num_classes_of
from robustkit.errors import InputError
from robustkit.evaluate import predict
from robustkit.modes import eval_mode
from robustkit.threat import ThreatModel, parse_eps, parse_norm
from robustkit.validate import integer, positive

ANGLE_RANGE = (math.pi / 128, math.pi / 2)      # the code's angle_small, angle_large
PIXEL_RANGE = (16, 1024)                        # the code's min_pixels, max_pixels
DEFAULTS = {"l2": {"steps": 10, "step": 0.5}, "linf": {"steps": 20, "step": 0.01 / 0.0356}}


@dataclass
class SparsityResult:
    """Per point of a batch of ``N``: ``sparsity (N,)`` in ``[0, 1]`` (NaN: misclassified; 1: not
    vulnerable), ``correct`` / ``vulnerable (N,)`` bool, ``critical (N, D)`` the normalized
    critical value per direction (NaN where not searched), and the settings used."""

    sparsity: torch.Tensor
    correct: torch.Tensor
    vulnerable: torch.Tensor
    critical: torch.Tensor
    settings: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        """``mean`` / ``median`` over vulnerable points (None if none), ``mean_all`` over correct
        points (non-vulnerable ones count as 1), the counts and the settings."""
        v = self.sparsity[self.vulnerable]
        c = self.sparsity[self.correct]
        return {"mean": float(v.mean()) if v.numel() else None,
                "median": float(v.median()) if v.numel() else None,
                "mean_all": float(c.mean()) if c.numel() else None,
                "n": int(self.sparsity.numel()), "n_correct": int(self.correct.sum()),
                "n_vulnerable": int(self.vulnerable.sum()), **self.settings}


class AdversarialSparsity:
    """The sparsity evaluation as a configuration object (keyword-only settings; see the module
    docstring for the paper and its defaults). Call ``sparsity(model, x, y)`` or
    ``sparsity(model, x, y, vulnerable=mask)`` to reuse an evaluation's verified breaks at
    ``eps`` instead of running the unconstrained PGD; ``index (N,)`` are the images' global
    indices (the directions' seeds; default ``0..N-1``)."""

    def __init__(self, *, norm: str = "l2", eps: float | str, directions: int = 64, search_steps: int = 10,
                 steps: int | None = None, step_size: float | None = None,
                 angle_range: tuple[float, float] = ANGLE_RANGE, pixel_range: tuple[int, int] = PIXEL_RANGE,
                 batch_size: int = 2048, amp: bool = False, seed: int = 0) -> None:
        self.norm = parse_norm(norm)
        self.eps = parse_eps(eps)
        if self.eps == 0:
            raise InputError("eps must be > 0 for adversarial sparsity (no perturbation can break a correct point)")
        self.directions = integer("directions", directions, 1)
        self.search_steps = integer("search_steps", search_steps, 1)
        self.steps = integer("steps", DEFAULTS[self.norm]["steps"] if steps is None else steps, 1)
        self.step_size = (DEFAULTS[self.norm]["step"] * self.eps if step_size is None
                          else positive("step_size", step_size))
        lo, hi = (float(v) for v in angle_range)
        if not 0 <= lo < hi <= math.pi:
            raise InputError(f"angle_range must be 0 <= low < high <= pi, got {angle_range!r}")
        self.angle_range = (lo, hi)
        plo, phi = (integer("pixel_range", v, 0) for v in pixel_range)
        if plo >= phi:
            raise InputError(f"pixel_range must be low < high (free coordinates), got {pixel_range!r}")
        self.pixel_range = (plo, phi)
        self.batch_size = integer("batch_size", batch_size, 1)
        self.amp, self.seed = bool(amp), integer("seed", seed)

    def params(self) -> dict[str, Any]:
        return {"norm": self.norm, "eps": self.eps, "directions": self.directions, "search_steps": self.search_steps,
                "steps": self.steps, "step_size": self.step_size, "seed": self.seed,
                **({"angle_range": list(self.angle_range)} if self.norm == "l2" else
                   {"pixel_range": list(self.pixel_range)})}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, vulnerable: torch.Tensor | None = None,
                 index: torch.Tensor | None = None) -> SparsityResult:
        check_inputs(x, y, num_classes_of(model))
        n, dev = x.shape[0], x.device
        y = y.to(dev, torch.long)
        index = torch.arange(n) if index is None else torch.as_tensor(index).long().cpu()
        if index.shape != (n,):
            raise InputError(f"index must be a (N,) tensor of image indices with N={n}, got {tuple(index.shape)}")
        if vulnerable is not None and (not isinstance(vulnerable, torch.Tensor) or vulnerable.shape != (n,)):
            raise InputError(f"vulnerable must be a (N,) bool tensor with N={n}")
        d = math.prod(x.shape[1:])
        lo, hi = self.angle_range if self.norm == "l2" else (min(self.pixel_range[0], d), min(self.pixel_range[1], d))
        if self.norm == "linf" and lo >= hi:
            raise InputError(f"pixel_range {self.pixel_range} leaves nothing to search for images of {d} coordinates")
        with eval_mode(model):
            correct = predict(model, x, self.batch_size).to(y.device) == y                    # (N,)
            vuln = correct & (self._vulnerable(model, x, y) if vulnerable is None else vulnerable.to(dev).bool())
            critical = torch.full((n, self.directions), float("nan"))
            idx = vuln.nonzero().squeeze(1).tolist()
            per_chunk = max(self.batch_size // self.directions, 1)
            for c in range(0, len(idx), per_chunk):
                pts = idx[c:c + per_chunk]
                critical[pts] = self._search(model, x[pts], y[pts], [int(index[i]) for i in pts], lo, hi).cpu()
        scale = (math.pi / 2) if self.norm == "l2" else float(d)
        critical = critical / scale
        sparsity = torch.where(correct.cpu(), torch.ones(n), torch.full((n,), float("nan")))
        sparsity[vuln.cpu()] = critical[vuln.cpu()].mean(1)
        settings = self.params()
        if self.norm == "linf":
            settings["pixel_range"] = [int(lo), int(hi)]                          # as searched (capped at d)
        return SparsityResult(sparsity, correct.cpu(), vuln.cpu(), critical, settings)

    # -- the pieces -------------------------------------------------------------------------
    def _vulnerable(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: our PGD (same steps and step size, no random start, CE) breaks the point,
        verified by the evaluation engine (the code's ``check_point_is_vulnerable``)."""
        from attacks.pgd import PGD
        from robustkit.evaluate import evaluate_attacks

        pgd = PGD(norm=self.norm, eps=self.eps, steps=self.steps, step_size=self.step_size, random_start=False,
                  loss="ce", amp=self.amp)
        ev = evaluate_attacks(model, (x, y), pgd, mode="independent", threat=ThreatModel(self.norm, self.eps),
                              batch_size=self.batch_size)
        return ev.broken[0].to(x.device)

    def _search(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, index: list[int], lo: float,
                hi: float) -> torch.Tensor:
        """The critical constraint ``(P, D)`` (angle in radians / free coordinates) of points
        ``x (P, C, H, W)``, by ``search_steps`` bisection steps over all ``P * D`` rows at once."""
        dirs = [directions(self.norm, tuple(x.shape[1:]), self.directions, self.seed, i) for i in index]
        axis = torch.cat([a for a, _ in dirs]).to(x.device, x.dtype)            # (R, C, H, W)
        perm = None if self.norm == "l2" else torch.cat([p for _, p in dirs]).to(x.device)   # (R, d)
        xr = x.repeat_interleave(self.directions, 0)                             # (R, C, H, W)
        yr = y.repeat_interleave(self.directions, 0)
        r = xr.shape[0]
        low = torch.full((r,), float(lo), device=x.device)
        high = torch.full((r,), float(hi), device=x.device)
        mid = low
        for _ in range(self.search_steps):
            mid = (low + high) / 2 if self.norm == "l2" else torch.div(low + high, 2, rounding_mode="floor")
            hit = self._broken(model, xr, yr, axis, perm, mid)
            high, low = torch.where(hit, mid, high), torch.where(hit, low, mid)
        return mid.view(-1, self.directions)

    def _broken(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, axis: torch.Tensor,
                perm: torch.Tensor | None, constraint: torch.Tensor) -> torch.Tensor:
        """``(R,)`` bool: the direction-constrained PGD breaks row ``r`` under ``constraint[r]``
        (verified on its own ``x_adv``)."""
        tm = ThreatModel(self.norm, self.eps)
        out = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for s in range(0, x.shape[0], self.batch_size):
            sl = slice(s, s + self.batch_size)
            xb, yb, ab = x[sl], y[sl], axis[sl]
            if self.norm == "l2":
                rule = ConeStep("l2", self.eps, self.step_size, ab, theta=constraint[sl])
            else:
                rule = ConeStep("linf", self.eps, self.step_size, ab, free=free_mask(perm[sl], constraint[sl].long()))
            start = DirectedStart(self.norm, self.eps, start=self.eps * ab)
            record = Record.start(xb)
            owners = torch.arange(xb.shape[0], device=x.device)
            run(model, xb, yb, record, start, rule, loss_fn("ce", False), self.steps, owners,
                LoopOptions(compact_every(x.device), self.amp), random_start=True)
            claimed = record.fooled
            if bool(claimed.any()):
                pred = predict(model, record.x, self.batch_size).to(yb.device)
                claimed = claimed & (pred != yb) & tm.contains(record.x, xb)
            out[sl] = claimed
        return out




def adversarial_sparsity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, vulnerable: torch.Tensor | None = None,
                         index: torch.Tensor | None = None, **settings: Any) -> SparsityResult:
    """``AdversarialSparsity(**settings)(model, x, y, vulnerable=..., index=...)``: per-point
    sparsity of ``x (N, C, H, W)`` with labels ``y (N,)`` (see the module docstring)."""
    return AdversarialSparsity(**settings)(model, x, y, vulnerable=vulnerable, index=index)
