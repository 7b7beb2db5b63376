"""``robustkit certify --method ibp|crown-ibp``: the IBP half of the certify command.

``robustkit/commands/certify.py`` parses the arguments and calls ``run_ibp``; this module
batches the images, calls ``certify.ibp`` and shapes the result dict (and the plot).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from certify.ibp import bisection_steps, certified_radius, certify
from robustkit.report import line_plot
from robustkit.threat import parse_eps

DEFAULT_MAX_EPS = 1.0
DEFAULT_TOL = 1e-3
GRID_POINTS = 41


def _batches(n: int, batch_size: int) -> range:
    return range(0, n, max(int(batch_size or 128), 1))


def eps_grid(eps: float, radii: torch.Tensor, points: int = GRID_POINTS) -> list[float]:
    """``points`` evenly spaced radii from 0 to the largest of ``2 * eps`` and the largest radius, plus eps."""
    top = max(2 * eps, float(radii.max()) if radii.numel() else 0.0, 1e-3)
    grid = {round(top * i / (points - 1), 6) for i in range(points)} | {round(eps, 6)}
    return sorted(grid)


def run_ibp(args: argparse.Namespace, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
            device: torch.device | str) -> dict[str, Any]:
    """Certify ``x`` ``(N, C, H, W)`` / ``y`` ``(N,)`` at ``args.eps`` with ``args.method``.

    Uses ``args.method`` ("ibp" | "crown-ibp"), ``args.eps`` (string), ``args.radius`` (bool),
    ``args.batch_size`` and ``args.out`` (plot directory; optional). Optional ``args.max_eps`` /
    ``args.tol`` tune the radius bisection (defaults 1.0 / 1e-3).
    """
    method = str(args.method).lower()
    eps = parse_eps(args.eps)
    want_radius = bool(getattr(args, "radius", False))
    max_eps = float(getattr(args, "max_eps", None) or DEFAULT_MAX_EPS)
    tol = float(getattr(args, "tol", None) or DEFAULT_TOL)
    model = model.to(device).eval()
    t0 = time.perf_counter()
    correct, certified, radii = [], [], []
    passes = 0
    for i in _batches(x.shape[0], args.batch_size):
        xb, yb = x[i:i + args.batch_size].to(device), y[i:i + args.batch_size].to(device)
        with torch.no_grad():
            correct.append((model(xb).argmax(1) == yb).cpu())
        certified.append(certify(model, xb, yb, eps, method).cpu())
        passes += 1
        if want_radius:
            radii.append(certified_radius(model, xb, yb, method, tol=tol, max_eps=max_eps).cpu())
            passes += 1 + bisection_steps(tol, max_eps)
    cert = torch.cat(certified) if certified else torch.zeros(0, dtype=torch.bool)
    corr = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
    n = int(cert.numel())
    res: dict[str, Any] = {
        "method": method, "eps": eps, "norm": "linf", "n": n,
        "clean_accuracy": float(corr.float().mean()) if n else 0.0,
        "certified_accuracy": float(cert.float().mean()) if n else 0.0,
        "certified": [bool(c) for c in cert.tolist()],
        "bound_passes": passes, "guarantee": "deterministic (sound up to floating-point rounding)",
    }
    if want_radius:
        r = torch.maximum(torch.cat(radii), cert.float() * eps)  # a ball certified at eps certifies all smaller
        grid = eps_grid(eps, r)
        curve = [float(((r >= g) & corr).float().mean()) for g in grid]
        res.update(radius=[float(v) for v in r.tolist()], radius_tol=tol, radius_max_eps=max_eps,
                   curve={"eps": grid, "certified_accuracy": curve})
        if getattr(args, "out", None):
            path = line_plot(Path(args.out) / "plots" / "certified_accuracy.png",
                             {method: (grid, curve)}, xlabel="eps (L-inf, pixel space)",
                             ylabel="certified accuracy", title=f"{method} certified accuracy", step=True)
            res["plot"] = str(path)
    res["seconds"] = time.perf_counter() - t0
    return res
