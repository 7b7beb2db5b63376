"""GP timings of the BO attack benchmark (``benchmarks.bo_attack``): our batched acquisition
optimizer vs BoTorch ``optimize_acqf`` per image, and one BO step vs the number of images batched."""

from __future__ import annotations

import time
from typing import Any

import torch


def _gp_problem(a: int, n: int, d: int, raw: int, seed: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                         list[torch.Generator], dict[str, Any]]:
    """Seeded GP data for ``a`` images (``n`` points in ``[-2, 2]^d``, graded values) and ``propose``'s
    keyword arguments over the full box."""
    g = torch.Generator().manual_seed(seed)
    tx = 4 * torch.rand(a, n, d, generator=g, dtype=torch.float64) - 2
    ty = -torch.rand(a, n, 1, generator=g, dtype=torch.float64)
    box = torch.full((a, d), 2.0, dtype=torch.float64)
    kw = {"acquisition": "ei", "beta": 1.0, "lower": -box, "upper": box, "raw_samples": raw, "acq_steps": 10,
          "fit_maxiter": 25}
    return tx, ty, [torch.Generator().manual_seed(seed) for _ in range(a)], kw


def acq_optimizer_timing(a: int = 20, n: int = 50, d: int = 49, raw: int = 100, seed: int = 0) -> dict[str, Any]:
    """Seconds to pick the next point for ``a`` images (GPs fitted on ``n`` points in ``d`` dims): our
    batched screen + Adam (one call for all images) vs BoTorch ``optimize_acqf`` (L-BFGS-B, one call
    per image; it cannot return a separate candidate per batch member of a batched GP)."""
    from botorch.acquisition import LogExpectedImprovement
    from botorch.optim import optimize_acqf

    from attacks._bo_gp import fit_gp, propose

    tx, ty, gens, kw = _gp_problem(a, n, d, raw, seed)
    propose(tx[:1], ty[:1], {}, gens[:1], **{**kw, "lower": kw["lower"][:1], "upper": kw["upper"][:1]})  # warm-up
    t0 = time.perf_counter()
    propose(tx, ty, {}, gens, **kw)
    t_ours_with_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    gp = fit_gp(tx, ty, {}, 25)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(a):
        gp_i = fit_gp(tx[i:i + 1], ty[i:i + 1], {k: v[i:i + 1] for k, v in gp.named_parameters()}, 1)
        bounds = torch.tensor([[-2.0] * d, [2.0] * d], dtype=torch.float64)
        optimize_acqf(LogExpectedImprovement(gp_i, best_f=ty[i:i + 1].amax(1)), bounds, q=1, num_restarts=1,
                      raw_samples=raw)
    t_loop = time.perf_counter() - t0
    return {"images": a, "gp_points": n, "latent_dim": d, "raw_samples": raw,
            "ours_batched_fit_plus_acq_s": round(t_ours_with_fit, 2), "batched_fit_only_s": round(t_fit, 2),
            "ours_batched_acq_only_s_est": round(max(t_ours_with_fit - t_fit, 0.0), 2),
            "optimize_acqf_per_image_loop_s": round(t_loop, 2),
            "note": "the loop re-wraps each image's fitted GP (1 L-BFGS step, included) then runs optimize_acqf "
                    "(num_restarts=1, raw_samples as ours, L-BFGS-B to convergence)"}


def bo_step_scaling(sizes: tuple[int, ...] = (1, 8, 32, 100), n: int = 100, d: int = 49, reps: int = 5,
                    seed: int = 0) -> dict[str, Any]:
    """Wall time of one BO step (warm-started GP refit + acquisition, as inside the attack: the data gain
    a point every step) for ``A`` images at once; per image-step it shows what batching buys here."""
    from attacks._bo_gp import propose

    out: dict[str, Any] = {"gp_points": n, "latent_dim": d, "median_of": reps}
    for a in sizes:
        tx, ty, gens, kw = _gp_problem(a, n, d, 100, seed)
        g = torch.Generator().manual_seed(seed + 1)                              # the new points' values
        z, state = propose(tx, ty, {}, gens, **kw)
        times = []
        for _ in range(reps):
            tx = torch.cat([tx[:, 1:], z.unsqueeze(1)], 1)
            ty = torch.cat([ty[:, 1:], -torch.rand(a, 1, 1, generator=g, dtype=torch.float64)], 1)
            t0 = time.perf_counter()
            z, state = propose(tx, ty, state, gens, **kw)
            times.append(time.perf_counter() - t0)
        step = sorted(times)[reps // 2]
        out[f"A={a}"] = {"step_ms": round(1000 * step, 1), "per_image_step_ms": round(1000 * step / a, 1)}
    return out
