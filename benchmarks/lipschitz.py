"""Lipschitz certificates vs IBP and randomized smoothing: the same images, one L2 radius axis, times.

Three models trained once through the ``Trainer`` (cached, ``benchmarks/_common.cached_model``) on
mnist5k: ``sll-small`` with EMMA (Hu et al. 2023; 1-Lipschitz by construction), ``ibp-small`` with IBP
training (Gowal et al. 2018, L2 eps 0.5) and ``ibp-small`` with Gaussian noise (Cohen et al. 2019,
sigma 0.25). Every model is certified on the **same** first ``n`` test images by every certifier, each
through ``robustkit.app.certify.certify_points`` (the pipeline of ``robustkit certify``):

- ``lipschitz`` (deterministic, L2): margin / (sqrt(2) L) with L from Gram iteration / the layers' own
  ``lipschitz_bound()``, plus its per-class-pair variant;
- ``ibp`` (deterministic, L2 via the first layer's dual norm): the largest certified radius by bisection;
- ``smoothing`` (probabilistic, each certificate holds with probability >= 1 - alpha, of the *smoothed*
  classifier, not the base model): Cohen et al.'s CERTIFY, sigma 0.25, n0 100, n 10,000, alpha 0.001.

Reported per (model, certifier): certified accuracy at L2 radii 36/255 * sqrt(784/3072) (~0.0703: the
CIFAR-10 radius 36/255 per pixel-dimension, the "36/255-equivalent"), 0.25, 0.5 and 1.0; the average
certified radius; seconds per image (the constant L is computed once per model and included in its
first chunk); a model a certifier does not support (IBP on SLL layers) is recorded as such. One PNG puts
every curve on one L2 axis (``--plot``, default beside ``--out``).

    python -m benchmarks.lipschitz [--quick] [--n N] [--device auto] [--threads 1] [--plot FILE]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

import certify  # noqa: F401  (registers the certifiers)
import defenses  # noqa: F401  (registers the objectives)
from benchmarks._common import Recipe, cached_model, log, parser, setup, write_results
from certify._layers import UnsupportedLayerError
from robustkit.app.certify import certify_points, load_points
from robustkit.registry import CERTIFIERS
from robustkit.report import certified_accuracy_curve, line_plot

RADII = (36 / 255 * math.sqrt(784 / 3072), 0.25, 0.5, 1.0)


def recipes(quick: bool) -> dict[str, Recipe]:
    n = 512 if quick else None
    return {
        "sll-small+emma": Recipe("sll-small-emma-mnist5k", "sll-small", 1 if quick else 20, 1e-3, 128,
                                 defense="emma", defense_params={"preset": "mnist"}, schedule="cosine",
                                 n_train=n, grad_clip=3.0),
        "ibp-small+ibp": Recipe("ibp-small-ibp-l2-mnist5k", "ibp-small", 1 if quick else 10, 1e-3, 128,
                                defense="ibp", defense_params={"eps": 0.3, "norm": "l2"}, n_train=n),
        "ibp-small+noise": Recipe("ibp-small-noise025-mnist5k", "ibp-small", 1 if quick else 10, 1e-3, 128,
                                  defense="noise", defense_params={"sigma": 0.25}, n_train=n),
    }


def certifiers(quick: bool) -> dict[str, Any]:
    return {
        "lipschitz": CERTIFIERS.get("lipschitz")(norm="l2", eps=0.5),
        "lipschitz-pairwise": CERTIFIERS.get("lipschitz")(norm="l2", eps=0.5, pairwise=True),
        "ibp": CERTIFIERS.get("ibp")(norm="l2", eps=0.5, tol=1e-3, max_eps=4.0),
        "smoothing": CERTIFIERS.get("smoothing")(sigma=0.25, n0=100, n=1000 if quick else 10_000, alpha=0.001,
                                                 batch_size=1000),
    }


def one(model: torch.nn.Module, points: Any, certifier: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        res = certify_points(model, points, certifier, progress=False)
    except UnsupportedLayerError as e:
        return {"supported": False, "why": str(e).splitlines()[0]}
    wall = time.perf_counter() - t0
    recs = res["per_sample"]
    curve = certified_accuracy_curve([r["radius"] for r in recs], [r["correct"] for r in recs], RADII)
    grid = [k * 0.05 for k in range(41)]                                   # 0 .. 2, for the plot
    plot = certified_accuracy_curve([r["radius"] for r in recs], [r["correct"] for r in recs], grid)
    return {"supported": True, "clean_accuracy": res["clean_accuracy"], "abstain_rate": res["abstain_rate"],
            "certified_accuracy": dict(zip([f"{r:.4g}" for r in RADII], curve["certified_accuracy"])),
            "average_certified_radius": curve["average_certified_radius"],
            "seconds_per_image": wall / len(recs), "lipschitz_constant": res.get("lipschitz_constant"),
            "deterministic": res["deterministic"], "guarantee": res["guarantee"], "params": res["params"],
            "curve": {"radius": grid, "certified_accuracy": plot["certified_accuracy"]}}


def table(rows: list[dict[str, Any]]) -> str:
    head = " | ".join(f"r={r:.3g}" for r in RADII)
    lines = [f"| model | certifier | clean | {head} | ACR | s / image | L |", "|" + "---|" * (6 + len(RADII))]
    for r in rows:
        if not r["supported"]:
            lines.append(f"| {r['model']} | {r['certifier']} | unsupported |" + " |" * (len(RADII) + 3))
            continue
        acc = " | ".join(f"{v:.3f}" for v in r["certified_accuracy"].values())
        lc = f"{r['lipschitz_constant']:.3g}" if r["lipschitz_constant"] else "-"
        lines.append(f"| {r['model']} | {r['certifier']} | {r['clean_accuracy']:.3f} | {acc} | "
                     f"{r['average_certified_radius']:.3f} | {r['seconds_per_image']:.2e} | {lc} |")
    return "\n".join(lines)


def bench(a: argparse.Namespace, device: torch.device) -> int:
    t0 = time.perf_counter()
    n = a.n or (50 if a.quick else 500)
    points = load_points("mnist5k", n)
    rows, trained = [], {}
    for label, recipe in recipes(a.quick).items():
        model, info = cached_model(recipe, device)
        trained[label] = {k: info[k] for k in ("train_seconds", "cached", "objective") if k in info}
        for cname, cert in certifiers(a.quick).items():
            r = {"model": label, "certifier": cname, **one(model, points, cert)}
            rows.append(r)
            log("lipschitz", f"{label} / {cname}: " + (str(r.get("certified_accuracy")) if r["supported"]
                                                       else "unsupported"))
    md = table(rows)
    plot = Path(a.plot) if a.plot else Path(a.out).with_suffix(".png")
    line_plot(plot, {f"{r['model']} / {r['certifier']}": (r["curve"]["radius"], r["curve"]["certified_accuracy"])
                     for r in rows if r["supported"]}, "L2 radius", "certified accuracy",
              f"mnist5k, first {n} test images", step=True)
    body = {"n_images": n, "radii": list(RADII), "models": trained, "rows": rows, "markdown": md, "plot": str(plot),
            "total_seconds": time.perf_counter() - t0,
            "note": "smoothing certifies the smoothed classifier (probability >= 1 - alpha each); lipschitz and "
                    "ibp the base model (deterministic). Wall-clock on a possibly shared machine."}
    write_results(a.out, "lipschitz", body, device=device, args=a)
    log("lipschitz", f"wrote {a.out} and {plot}\n{md}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = parser("lipschitz", __doc__)
    ap.add_argument("--n", type=int, default=None, help="test images (default 500; --quick 50)")
    ap.add_argument("--plot", default=None, help="the PNG with every curve (default: --out with .png)")
    a = ap.parse_args(argv)
    return bench(a, setup(a))


if __name__ == "__main__":
    sys.exit(main())
