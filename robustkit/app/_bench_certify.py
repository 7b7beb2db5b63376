"""The benchmark's certificates, on the one certification pipeline (``robustkit.app.certify``):
deterministic ones (IBP / CROWN-IBP / Lipschitz in the threat model's norm, and injected at-eps
certifiers) and randomized-smoothing certificates of the smoothed classifier (``smoothing``, Cohen et
al.; ``dual-smoothing``, Xia et al. 2024, on ``dual-subimage`` models only), per model (see
``robustkit.app.benchmark``).

Built-in certifiers run through ``certify_points`` with the benchmark's seed and the images'
indices, so their per-image certificates equal ``robustkit certify``'s and the quickstart's
for the same model, images, seed and settings. Each record holds the pipeline's results
schema (curve on the one radius grid, ACR, per-image records) plus ``status`` and, at the
threat eps, ``certified_acc``; the per-point "certified at eps" flags (``radius >= eps``)
feed the benchmark's soundness check.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from robustkit.app._bench_report import acc
from robustkit.app.certify import Points, certified_at, certify_points
from robustkit.errors import InputError
from robustkit.modes import device_of

CERTIFY_METHODS = ("ibp", "crown-ibp", "smoothing", "dual-smoothing", "lipschitz")
SMOOTHED = ("smoothing", "dual-smoothing")   # certify the smoothed classifier (L2, probabilistic), not the model
# an injected deterministic at-eps certifier: (model, x (B, C, H, W), y (B,), eps, norm) -> (B,) bool certified
Certifier = Callable[[nn.Module, torch.Tensor, torch.Tensor, float, str], torch.Tensor]
SMOOTHING_BATCH = 1000        # noisy rows per forward pass at least (results do not depend on it)


def _batched(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, bs: int,
             dev: torch.device) -> torch.Tensor:
    """``fn`` over batches of ``x (N, C, H, W)``, ``y (N,)`` on ``dev``; the ``(N,)`` outputs on CPU."""
    return torch.cat([fn(x[i:i + bs].to(dev), y[i:i + bs].to(dev)).cpu() for i in range(0, x.shape[0], bs)])


def _record(res: dict[str, Any]) -> dict[str, Any]:
    """A benchmark record from the pipeline's results (its schema, less what the entry already says)."""
    return {"status": "ok", **{k: v for k, v in res.items() if k not in ("format", "dataset")}}


def certify_deterministic(model: nn.Module, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor,
                          s: dict[str, Any], certifiers: dict[str, Certifier], seconds: dict[str, float]
                          ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Deterministic certificates at eps: ``({name: JSON record}, {name: (N,) bool certified at eps})``.
    Injected ``certifiers`` run on every model (their record: ``certified_acc`` at eps only, no radii);
    built-in IBP / CROWN-IBP / Lipschitz in the threat model's norm (IBP's L2 mode bounds the first layer
    by the dual norm), IBP with its one default bisection (``certify.ibp.IBPCertifier``) split at the
    benchmark's eps, so each record holds the per-image radii and the certified-accuracy curve."""
    import certify  # noqa: F401  (registers the certifiers)
    from certify._layers import UnsupportedLayerError
    from robustkit.registry import CERTIFIERS

    dev, eps, norm = device_of(model), s["eps"], s["norm"]
    names = [c for c in s["certify"] if c not in SMOOTHED] + [c for c in certifiers if c not in s["certify"]]
    records: dict[str, Any] = {}
    flags: dict[str, torch.Tensor] = {}
    for c in names:
        t0 = time.perf_counter()
        try:
            if c in certifiers:
                fn = certifiers[c]
                flags[c] = _batched(lambda xb, yb, f=fn: f(model, xb, yb, eps, norm).bool(), x, y, s["batch_size"],
                                    dev)
                records[c] = {"status": "ok", "deterministic": True, "norm": norm, "eps": eps}
            else:
                # IBP's bisection tops out at max_eps (default 1.0): an L2 eps beyond it doubles the top
                top = {"max_eps": 2.0 * eps} if c in ("ibp", "crown-ibp") and eps > 1.0 else {}
                certifier = CERTIFIERS.get(c)(norm=norm, eps=eps, batch_size=s["batch_size"], **top)
                res = certify_points(model, Points.first(x, y, s["dataset"]), certifier, seed=s["seed"],
                                     progress=False)
                flags[c] = certified_at(res, eps)                              # (N,) radius >= eps, correct
                records[c] = {**_record(res), "eps": eps}
        except UnsupportedLayerError as e:
            records[c] = {"status": "n/a", "reason": str(e)}
            continue
        records[c]["certified_acc"] = acc(flags[c])
        seconds[f"certify_{c}"] = time.perf_counter() - t0
    return records, flags


def certify_smoothing(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: dict[str, Any], sigma: float | None,
                      seconds: dict[str, float], progress: bool, method: str = "smoothing") -> dict[str, Any]:
    """CERTIFY of the smoothed classifier on the first ``n_images`` points: certified L2 accuracy vs
    radius (at eps too on L2 threat models). Each certificate holds w.p. >= 1 - alpha.

    ``method``: ``"smoothing"`` (Cohen et al. 2019, any model) or ``"dual-smoothing"`` (Xia et al. 2024,
    ``certify.dual_smoothing``: a ``dual-subimage`` model only; any other model gets an ``n/a`` record
    with the reason). Both use the benchmark's ``sigma``, ``n0``, ``n``, ``alpha``."""
    if sigma is None:
        return {"status": "n/a", "reason": "no sigma: pass --sigma, or benchmark a run trained with the noise "
                                           "defense (its config's defense.params.sigma is used)"}
    sm = s["smoothing"]
    m = min(int(sm["n_images"]), x.shape[0])
    kw = {"sigma": float(sigma), "n0": sm["n0"], "n": sm["n"], "alpha": sm["alpha"],
          "batch_size": max(s["batch_size"], SMOOTHING_BATCH)}
    if method == "dual-smoothing":
        from certify.dual_smoothing import DualSmoothingCertifier

        certifier: Any = DualSmoothingCertifier(**kw)
        try:
            certifier.check_model(model)
        except InputError as e:                   # not a dual-subimage model: recorded, not fatal
            return {"status": "n/a", "reason": str(e)}
        what = "the dual smoothed classifier (Xia et al. 2024)"
    else:
        from certify.smoothing import SmoothingCertifier

        certifier = SmoothingCertifier(**kw)
        what = "the smoothed classifier (Cohen et al. 2019)"
    t0 = time.perf_counter()
    res = certify_points(model, Points.first(x[:m], y[:m], s["dataset"]), certifier, seed=s["seed"],
                         progress=progress)
    seconds[f"certify_{method}"] = time.perf_counter() - t0
    rec = {**_record(res), "sigma": float(sigma), "n0": sm["n0"], "n": sm["n"], "alpha": sm["alpha"], "n_images": m,
           "guarantee": f"certifies {what}, not the base model; " + res["guarantee"]}
    if s["norm"] == "l2":
        rec["certified_acc"] = acc(certified_at(res, s["eps"]))
    return rec
