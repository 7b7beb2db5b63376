"""``robustkit certify``: certified radii of a trained model on test images.

    robustkit certify --model RUN --method smoothing --sigma 0.25 [--n0 100 --n 100000 --alpha 0.001]
                      [--sequential --tol 0.0625] --n-images 100 --out DIR [--resume]
    robustkit certify --model RUN --method ibp|crown-ibp --eps 0.1 [--tol 1e-3 --max-eps 1.0] --out DIR
    robustkit certify --model RUN --method lipschitz [--eps 0.5 --set lipschitz.norm=linf] --out DIR
    robustkit certify --config configs/certify_smoothing_mnist5k.yaml --set smoothing.n=10000

Flags and ``--set key=value`` override the ``--config`` recipe (``robustkit.config.CertifyConfig``);
``robustkit.app.certify.run_certify`` writes ``DIR/results.json``, ``DIR/report.md``,
``DIR/plots/certified_accuracy.png`` and, after every chunk, ``DIR/per_image.json`` (``--resume``).
"""

from __future__ import annotations

import argparse
from typing import Any

# flag (argparse dest) -> CertifyConfig key; a flag left out keeps the recipe's value
FLAGS = {"model": "model", "method": "method", "dataset": "dataset", "data_root": "data_root",
         "download": "download", "n_images": "n_images", "skip": "skip", "batch_size": "batch_size",
         "chunk": "chunk", "amp": "amp", "seed": "seed", "out": "out", "sigma": "smoothing.sigma",
         "n0": "smoothing.n0", "n": "smoothing.n", "alpha": "smoothing.alpha", "sequential": "smoothing.sequential",
         "eps": "bounds.eps", "max_eps": "bounds.max_eps"}


def register(sub: argparse._SubParsersAction) -> None:
    from robustkit.commands._common import add_common, add_data
    from robustkit.commands._config import add_config_args

    p = sub.add_parser("certify", help="certified radii: randomized smoothing (L2), IBP / CROWN-IBP (L-inf) or "
                       "Lipschitz margins (L2)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="run directory or model directory")
    add_config_args(p, "certify")
    add_data(p)
    p.add_argument("--method", type=str.lower, help="smoothing (default) | ibp | crown-ibp | lipschitz")
    p.add_argument("--sigma", type=float, help="smoothing noise level, pixel space (default 0.25)")
    p.add_argument("--n0", type=int, help="selection samples per image (default 100)")
    p.add_argument("--n", type=int, help="estimation samples per image, max (default 100000)")
    p.add_argument("--alpha", type=float, help="failure probability (default 0.001)")
    p.add_argument("--sequential", action="store_true", default=None, help="stop sampling early (anytime-valid)")
    p.add_argument("--tol", type=float, help="sequential: stop when the radius can grow by <= TOL (default "
                   "sigma/4); ibp: radius bisection tolerance (default 1e-3)")
    p.add_argument("--amp", action="store_true", default=None, help="autocast on CUDA")
    p.add_argument("--eps", help="ibp: the threat L-inf radius, e.g. 0.1 or 8/255 (default 0.1); lipschitz: the "
                   "threat radius the report marks (L2 by default)")
    p.add_argument("--max-eps", type=float, help="ibp: upper end of the radius bisection (default 1.0)")
    p.add_argument("--radius", action="store_true", help="(kept for old scripts: radii are always computed)")
    p.add_argument("--n-images", type=int, help="number of test images (default 100)")
    p.add_argument("--skip", type=int, help="certify every SKIP-th test image (default 1)")
    p.add_argument("--batch-size", type=int, help="noisy rows per forward / images per bound pass (default 1000)")
    p.add_argument("--chunk", type=int, help="images per certifier call and per progress save (default: auto)")
    p.add_argument("--out", help="output directory (default runs/certify)")
    p.add_argument("--resume", action="store_true", help="compute only the images not yet in OUT/parts")
    add_common(p)
    p.set_defaults(func=run, seed=None, dataset=None, data_root=None, download=None)


def config_from_args(args: argparse.Namespace) -> Any:  # -> CertifyConfig
    from robustkit.commands._config import make_config
    from robustkit.config import CertifyConfig, load_yaml

    method = args.method or (load_yaml(args.config).get("method") if args.config else None)
    tol = "bounds.tol" if method in ("ibp", "crown-ibp") else "smoothing.tol"
    flags = {**FLAGS, "tol": tol, **({"eps": "lipschitz.eps"} if method == "lipschitz" else {})}
    return make_config(CertifyConfig, args, {key: getattr(args, dest) for dest, key in flags.items()})


def run(args: argparse.Namespace) -> int:
    from robustkit.app.certify import certified_at, run_certify
    from robustkit.app.shard import world
    from robustkit.device import resolve_device

    cfg = config_from_args(args)
    res = run_certify(cfg, resolve_device(args.device), resume=args.resume)
    scale, curve, eps = res["radius_scale"], res["curve"], res["params"].get("eps")
    at = ", ".join(f"{r:g}: {a:.3f}" for r, a in zip(curve["radius"], curve["certified_accuracy"]) if r <= 2 * scale)
    head = (f"{res['certifier']} certified accuracy {float(certified_at(res, eps).float().mean()):.4f} at eps "
            f"{eps:g}" if eps is not None else f"{res['certifier']}: certified accuracy at radius {at}")
    if world().is_main:
        print(f"{head} ({res['n']} images, ACR {res['average_certified_radius']:.4f}); results: {cfg.out}/results.json")
    return 0
