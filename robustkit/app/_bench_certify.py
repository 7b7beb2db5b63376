"""The benchmark's certificates: deterministic (IBP / CROWN-IBP, injected certifiers) at eps and
randomized-smoothing certificates of the smoothed classifier, per model (see robustkit.app.benchmark)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robustkit.app._bench_report import acc

CERTIFY_METHODS = ("ibp", "crown-ibp", "smoothing")
# a deterministic certifier: (model, x (B, C, H, W), y (B,), eps, norm) -> (B,) bool certified
Certifier = Callable[[nn.Module, torch.Tensor, torch.Tensor, float, str], torch.Tensor]

# -- certificates ------------------------------------------------------------------------------
def _batched(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, bs: int,
             dev: torch.device) -> torch.Tensor:
    """``fn`` over batches of ``x (N, C, H, W)``, ``y (N,)`` on ``dev``; the ``(N,)`` outputs on CPU."""
    return torch.cat([fn(x[i:i + bs].to(dev), y[i:i + bs].to(dev)).cpu() for i in range(0, x.shape[0], bs)])


def _ibp(model: nn.Module, method: str, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor,
         s: dict[str, Any], dev: torch.device) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Built-in IBP / CROWN-IBP: certified flags at eps ``(N,)`` and certified accuracy vs eps (radii)."""
    from certify.ibp import certified_radius, certify

    eps, bs = s["eps"], s["batch_size"]
    flags = _batched(lambda xb, yb: certify(model, xb, yb, eps, method, "linf"), x, y, bs, dev)
    top = 2 * eps if eps > 0 else 0.1
    r = _batched(lambda xb, yb: certified_radius(model, xb, yb, method, tol=top / 64, max_eps=top), x, y, bs, dev)
    grid = [round(top * k / 20, 8) for k in range(21)]
    return flags, {"eps": grid, "certified_acc": [acc((r >= g) & correct) for g in grid]}


def certify_deterministic(model: nn.Module, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor,
                          s: dict[str, Any], certifiers: dict[str, Certifier], seconds: dict[str, float]
                          ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Deterministic certificates at eps: ``({name: JSON record}, {name: (N,) bool certified})``.
    Injected ``certifiers`` run on every model; built-in IBP only on L-inf threat models."""
    from certify.ibp import UnsupportedLayerError

    dev, eps, norm = next(model.parameters()).device, s["eps"], s["norm"]
    names = [c for c in s["certify"] if c != "smoothing"] + [c for c in certifiers if c not in s["certify"]]
    records: dict[str, Any] = {}
    flags: dict[str, torch.Tensor] = {}
    for c in names:
        t0 = time.perf_counter()
        try:
            if c in certifiers:
                fn = certifiers[c]
                flags[c] = _batched(lambda xb, yb, f=fn: f(model, xb, yb, eps, norm).bool(), x, y, s["batch_size"],
                                    dev)
                records[c] = {"status": "ok", "deterministic": True, "eps": eps}
            elif norm != "linf":
                records[c] = {"status": "n/a", "reason": f"{c} is benchmarked on L-inf threat models, this is {norm}"}
                continue
            else:
                flags[c], curve = _ibp(model, c, x, y, correct, s, dev)
                records[c] = {"status": "ok", "deterministic": True, "eps": eps, "curve": curve}
        except UnsupportedLayerError as e:
            records[c] = {"status": "n/a", "reason": str(e)}
            continue
        records[c]["certified_acc"] = acc(flags[c])
        seconds[f"certify_{c}"] = time.perf_counter() - t0
    return records, flags


def certify_smoothing(model: nn.Module, x: torch.Tensor, y: torch.Tensor, s: dict[str, Any], sigma: float | None,
                      seconds: dict[str, float], progress: bool) -> dict[str, Any]:
    """Cohen et al. CERTIFY on the first ``n_images`` points: certified L2 accuracy of the *smoothed*
    classifier vs radius (at eps too on L2 threat models). Each certificate holds w.p. >= 1 - alpha."""
    if sigma is None:
        return {"status": "n/a", "reason": "no sigma: pass --sigma, or benchmark a run trained with the noise "
                                           "defense (its config's defense.params.sigma is used)"}
    from certify.smoothing import Smooth

    sm, dev = s["smoothing"], next(model.parameters()).device
    m = min(int(sm["n_images"]), x.shape[0])
    smooth = Smooth(model, int(model.num_classes), float(sigma))
    torch.manual_seed(s["seed"])
    t0 = time.perf_counter()
    ok, radius = [], []
    for i in tqdm(range(0, m, 8), desc="smoothing", disable=not progress, leave=False):
        j = slice(i, min(i + 8, m))
        cert = smooth.certify(x[j].to(dev), sm["n0"], sm["n"], sm["alpha"], max(s["batch_size"], 1000))
        ok.append((cert.prediction.cpu() == y[j]) & ~cert.abstained.cpu())
        radius.append(cert.radius.cpu().float())
    ok_t, r_t = torch.cat(ok), torch.cat(radius)                               # (m,), (m,)
    grid = [round(sigma * k / 4, 8) for k in range(13)]
    seconds["certify_smoothing"] = time.perf_counter() - t0
    rec = {"status": "ok", "sigma": sigma, "n0": sm["n0"], "n": sm["n"], "alpha": sm["alpha"], "n_images": m,
           "guarantee": "certifies the smoothed classifier (Cohen et al. 2019), not the base model; each "
                        f"certificate holds with probability >= {1 - sm['alpha']:g}",
           "curve": {"radius": grid, "certified_acc": [acc(ok_t & (r_t >= g)) for g in grid]}}
    if s["norm"] == "l2":
        rec["certified_acc"] = acc(ok_t & (r_t >= s["eps"]))
    return rec
