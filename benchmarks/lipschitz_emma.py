"""Clean and Lipschitz-certified L2 accuracy of a trained Lipschitz-by-construction net.

    robustkit train --config configs/train_emma_mnist5k.yaml --out runs/emma_mnist
    python -m benchmarks.lipschitz_emma --run runs/emma_mnist/checkpoints/last [--dataset mnist5k] [--out FILE]

Certificates, both deterministic and sound (``lipschitz_bound()`` of every layer):

- global: radius = margin / (sqrt(2) L), ``L = model_lipschitz(model)`` (pixel space -> logits,
  Normalize's ``1 / min(std)`` included), margin = top-1 minus runner-up logit;
- pairwise (GloRo / LiResNet): radius = min_j (z_p - z_j) / (L_body * ||W_p - W_j||), with the
  body's sound constant and the last layer's rows; never smaller than the global one.

Radii reported: 36/255 * sqrt(784/3072) (the CIFAR-10 radius per pixel-dimension, ~0.0703, the
"36/255-equivalent" on 28x28 grayscale), 0.3, 0.5 and 1.0. With ``certify/lipschitz.py`` present
its certifier's radii are printed beside ours for comparison.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from robustkit._lipschitz_nets import LipschitzNet, model_lipschitz
from robustkit.data import make_loader
from robustkit.zoo import RobustModel, load, resolve_model_dir

RADII = (36 / 255 * math.sqrt(784 / 3072), 0.3, 0.5, 1.0)


@torch.no_grad()
def lipschitz_radii(model: RobustModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(prediction, global radius, pairwise radius)``, each ``(B,)``, for images ``(B, C, H, W)``."""
    net = model.net
    if not isinstance(net, LipschitzNet):
        raise TypeError(f"{model.arch!r} is not a LipschitzNet")
    logits = model(x)                                                       # (B, K)
    top2 = logits.topk(2, dim=1)
    pred = top2.indices[:, 0]                                               # (B,)
    glob = (top2.values[:, 0] - top2.values[:, 1]) / (math.sqrt(2) * model_lipschitz(model))
    l_body = net.body_lipschitz_bound() / min(model.std)
    w = net.head.get_weight().double()                                      # (K, d)
    pair = (w[pred].unsqueeze(1) - w.unsqueeze(0)).norm(dim=-1) * l_body * (1 + 1e-6)   # (B, K)
    gap = (logits.gather(1, pred.view(-1, 1)) - logits).double()            # (B, K), 0 at pred
    pairwise = (gap / pair).masked_fill(torch.nn.functional.one_hot(pred, logits.shape[1]).bool(), math.inf)
    return pred, glob.double(), pairwise.amin(1)


def evaluate(model: RobustModel, dataset: str, n: int | None = None) -> dict[str, Any]:
    model.eval()
    preds, gl, pw, ys = [], [], [], []
    t0 = time.perf_counter()
    for x, y in make_loader(dataset, "test", batch_size=250, shuffle=False):
        p, g, q = lipschitz_radii(model, x)
        preds.append(p), gl.append(g), pw.append(q), ys.append(y)
    seconds = time.perf_counter() - t0
    pred, glob, pair, y = (torch.cat(t)[:n] for t in (preds, gl, pw, ys))
    ok = pred == y
    out: dict[str, Any] = {"n": len(y), "clean_accuracy": float(ok.float().mean()), "L": model_lipschitz(model),
                           "seconds": seconds, "certified_global": {}, "certified_pairwise": {}}
    for r in RADII:
        out["certified_global"][f"{r:.4f}"] = float((ok & (glob >= r)).float().mean())
        out["certified_pairwise"][f"{r:.4f}"] = float((ok & (pair >= r)).float().mean())
    try:  # the project's Lipschitz certifier, when it exists: same constant?
        import certify  # noqa: F401  (registers certifiers)
        from robustkit.registry import CERTIFIERS
        if "lipschitz" in CERTIFIERS:
            cert = CERTIFIERS.get("lipschitz")()
            x, _ = next(iter(make_loader(dataset, "test", batch_size=250, shuffle=False)))
            c = cert(model, x)
            out["certifier_lipschitz_metadata"] = {k: v for k, v in getattr(c, "metadata", {}).items()
                                                   if isinstance(v, (int, float, str))}
            out["certifier_max_radius_gap"] = float((torch.as_tensor(c.radius).double()
                                                     - gl[0].double()).abs().max())
    except Exception as e:  # noqa: BLE001 - another helper's code: report, do not fail the measurement
        out["certifier_lipschitz_error"] = f"{type(e).__name__}: {e}"[:200]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a model directory, or a run directory (its checkpoints/best, else "
                   "last, as robustkit certify resolves it)")
    p.add_argument("--dataset", default="mnist5k")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    path = resolve_model_dir(a.run)
    res = {"model": str(path), **evaluate(load(path), a.dataset)}
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
