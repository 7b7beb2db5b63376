"""``robustkit certify``: certified radii of a trained model on the first N test images.

    robustkit certify --model RUN --method smoothing --sigma 0.25 [--n0 100 --n 100000 --alpha 0.001]
                      [--sequential --tol 0.0625] --n-images 100 --out DIR [--resume]
    robustkit certify --model RUN --method ibp|crown-ibp --eps 0.1 [--radius] --out DIR

Smoothing (Cohen et al. 2019, L2) writes ``DIR/results.json`` (per-image prediction, radius,
abstained, correct, samples; certified accuracy on a radius grid), ``DIR/report.md`` and
``DIR/plots/certified_accuracy.png``. It is resumable per image: ``DIR/per_image.json`` is
rewritten atomically after every chunk of images, and ``--resume`` skips the images in it.
IBP / CROWN-IBP (L-inf, deterministic) is delegated to ``robustkit.commands._certify_ibp``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from robustkit.commands._common import add_common, add_data, load_model_arg, setup
from robustkit.errors import RobustkitError
from robustkit.io import atomic_write_json
from robustkit.report import line_plot, md_table, write_markdown, write_results

METHODS = ("smoothing", "ibp", "crown-ibp")
PARTIAL = "per_image.json"
# these must match for --resume to continue a run
RESUME_KEYS = ("method", "model", "dataset", "sigma", "n0", "n", "alpha", "sequential", "tol", "seed", "skip")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certify", help="certified radii: randomized smoothing (L2) or IBP / CROWN-IBP (L-inf)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run directory or model directory")
    add_data(p)
    p.add_argument("--method", default="smoothing", type=str.lower, choices=METHODS, help="default: smoothing")
    g = p.add_argument_group("randomized smoothing (Cohen et al. 2019; paper defaults)")
    g.add_argument("--sigma", type=float, default=0.25, help="noise level, pixel space (default 0.25)")
    g.add_argument("--n0", type=int, default=100, help="selection samples per image (default 100)")
    g.add_argument("--n", type=int, default=100_000, help="estimation samples per image, max (default 100000)")
    g.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    g.add_argument("--sequential", action="store_true", help="stop sampling early per image (anytime-valid bound)")
    g.add_argument("--tol", type=float, default=None,
                   help="sequential: stop when the radius can grow by at most TOL (default sigma/4); "
                        "ibp: radius bisection tolerance")
    g.add_argument("--amp", action="store_true", help="autocast on CUDA")
    g.add_argument("--chunk", type=int, default=None,
                   help="images per certify call / per progress save (default: fill one batch, >= 8 if sequential)")
    i = p.add_argument_group("IBP / CROWN-IBP (L-inf)")
    i.add_argument("--eps", default="0.1", help="L-inf radius, e.g. 0.1 or 8/255 (default 0.1)")
    i.add_argument("--radius", action="store_true", help="also compute per-image certified radii (bisection)")
    i.add_argument("--max-eps", type=float, default=None, help="upper end of the radius bisection (default 1.0)")
    p.add_argument("--n-images", type=int, default=100, help="number of test images (default 100)")
    p.add_argument("--skip", type=int, default=1, help="certify every SKIP-th test image (default 1)")
    p.add_argument("--batch-size", type=int, default=1000, help="forward batch size (default 1000)")
    p.add_argument("--out", default="runs/certify", help="output directory (default runs/certify)")
    p.add_argument("--resume", action="store_true", help=f"continue from OUT/{PARTIAL}")
    add_common(p)
    p.set_defaults(func=run)


def _load_images(args: argparse.Namespace, model: Any) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    from robustkit.data import load_data, to_float

    if args.n_images < 1 or args.skip < 1:
        raise ValueError(f"--n-images and --skip must be >= 1, got {args.n_images} and {args.skip}")
    data = load_data(args.dataset, "test", args.data_root, args.download)
    idx = list(range(0, len(data), args.skip))
    if args.n_images > len(idx):
        raise ValueError(f"--n-images {args.n_images} is more than the {len(idx)} test images of {args.dataset!r} "
                         f"at --skip {args.skip}")
    idx = idx[:args.n_images]
    if tuple(data.info.input_shape) != tuple(model.input_shape):
        raise ValueError(f"model expects inputs {model.input_shape}, dataset {args.dataset!r} has "
                         f"{data.info.input_shape}")
    if data.info.num_classes > model.num_classes:
        raise ValueError(f"dataset {args.dataset!r} has {data.info.num_classes} classes, the model only "
                         f"{model.num_classes}")
    t = torch.tensor(idx)
    return to_float(data.images[t]), data.labels[t], idx


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.method == "smoothing":
        from certify.smoothing import validate_params

        validate_params(args.sigma, args.n0, args.n, args.alpha, args.batch_size, args.tol)
    device = setup(args)
    model = load_model_arg(args.model, device)
    x, y, idx = _load_images(args, model)
    out = Path(args.out)
    if args.method != "smoothing":
        return _run_ibp(args, model, x, y, device, out)
    return _run_smoothing(args, model, x, y, idx, device, out)


# -- IBP ------------------------------------------------------------------------------
def _run_ibp(args: argparse.Namespace, model: Any, x: torch.Tensor, y: torch.Tensor, device: torch.device,
             out: Path) -> int:
    try:
        from robustkit.commands._certify_ibp import run_ibp
    except ModuleNotFoundError as e:
        if e.name in ("robustkit.commands._certify_ibp", "certify.ibp"):
            raise RobustkitError(f"--method {args.method} is not available in this install ({e.name} is missing); "
                                 "use --method smoothing") from None
        raise
    res = dict(run_ibp(args, model, x, y, device))
    res.setdefault("method", args.method)
    res.setdefault("model", str(args.model))
    res.setdefault("dataset", args.dataset)
    write_results(out, res)
    rows = [{k: v for k, v in res.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}]
    write_markdown(out, f"# Certification: {args.method}\n\n{md_table(rows)}")
    print(f"{args.method}: certified accuracy {res.get('certified_accuracy', float('nan')):.4f} at eps "
          f"{res.get('eps', args.eps)} ({res.get('n', x.shape[0])} images); results: {out / 'results.json'}")
    return 0


# -- smoothing ------------------------------------------------------------------------
def _params(args: argparse.Namespace) -> dict[str, Any]:
    tol = (args.sigma / 4 if args.tol is None else args.tol) if args.sequential else None
    return {"method": "smoothing", "model": str(Path(args.model).resolve()), "dataset": args.dataset,
            "sigma": args.sigma, "n0": args.n0, "n": args.n, "alpha": args.alpha, "sequential": args.sequential,
            "tol": tol, "seed": args.seed, "skip": args.skip, "batch_size": args.batch_size,
            "n_images": args.n_images, "norm": "l2"}


def _load_partial(out: Path, params: dict[str, Any]) -> dict[int, dict[str, Any]]:
    import json

    f = out / PARTIAL
    if not f.is_file():
        print(f"robustkit: no {f} to resume from; starting fresh")
        return {}
    try:
        old = json.loads(f.read_text())
        old_params, records = old["params"], old["records"]
    except (ValueError, KeyError, TypeError) as e:
        raise RobustkitError(f"{f}: not a certify progress file ({e}); remove it or drop --resume") from None
    diff = [f"{k}: {old_params.get(k)!r} -> {params[k]!r}" for k in RESUME_KEYS if old_params.get(k) != params[k]]
    if diff:
        raise RobustkitError(f"--resume: {f} was made with different settings ({'; '.join(diff)}); "
                             "use another --out or the same settings")
    return {int(r["index"]): r for r in records}


def _auto_chunk(args: argparse.Namespace) -> int:
    if args.chunk is not None:
        if args.chunk < 1:
            raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
        return args.chunk
    fill = max(1, args.batch_size // args.n)
    return max(fill, 8) if args.sequential else fill


def _run_smoothing(args: argparse.Namespace, model: Any, x: torch.Tensor, y: torch.Tensor, idx: list[int],
                   device: torch.device, out: Path) -> int:
    from certify.smoothing import Smooth, max_radius

    params = _params(args)
    done = _load_partial(out, params) if args.resume else {}
    smooth = Smooth(model, model.num_classes, args.sigma, amp=args.amp)
    todo = [j for j, i in enumerate(idx) if i not in done]
    chunk = _auto_chunk(args)
    bar = tqdm(total=len(idx), initial=len(idx) - len(todo), desc="certify", unit="img")
    for s in range(0, len(todo), chunk):
        part = todo[s:s + chunk]
        torch.manual_seed(args.seed * 1_000_003 + idx[part[0]])   # reproducible per chunk, resume-safe
        t0 = time.perf_counter()
        cert = smooth.certify(x[part].to(device), args.n0, args.n, args.alpha, args.batch_size,
                              sequential=args.sequential, tol=params["tol"])
        dt = (time.perf_counter() - t0) / len(part)
        for k, j in enumerate(part):
            pred = int(cert.prediction[k])
            done[idx[j]] = {"index": idx[j], "label": int(y[j]), "prediction": pred,
                            "radius": float(cert.radius[k]), "abstained": bool(cert.abstained[k]),
                            "correct": pred == int(y[j]), "samples": int(cert.info["samples"][k]) + args.n0,
                            "pA_lower": float(cert.info["pA_lower"][k]), "seconds": dt}
        atomic_write_json(out / PARTIAL, {"params": params, "records": [done[i] for i in idx if i in done]})
        bar.update(len(part))
    bar.close()
    records = [done[i] for i in idx]
    res = summarize(records, params, max_radius(args.sigma, args.n, args.alpha))
    write_results(out, res)
    write_markdown(out, _report(res))
    _plot(out / "plots" / "certified_accuracy.png", records, res, args.sigma)
    ca = res["certified_accuracy"]
    print(f"smoothing sigma={args.sigma}: certified accuracy " +
          ", ".join(f"{r:g}: {a:.3f}" for r, a in zip(ca["radius"], ca["accuracy"]) if r <= 2 * args.sigma) +
          f" ({len(records)} images, {res['samples']['mean']:.0f} samples/image); results: {out / 'results.json'}")
    return 0


def radius_grid(sigma: float) -> list[float]:
    """Standard radii scaled to sigma: ``sigma * (0, 0.5, 1, ..., 4)`` (0, .125, .25, ... 1.0 at sigma = 0.25)."""
    return [round(sigma * k / 2, 6) for k in range(9)]


def certified_accuracy(records: list[dict[str, Any]], radius: float) -> float:
    ok = [r["correct"] and not r["abstained"] and r["radius"] >= radius for r in records]
    return float(np.mean(ok)) if ok else 0.0


def summarize(records: list[dict[str, Any]], params: dict[str, Any], rmax: float) -> dict[str, Any]:
    grid = radius_grid(params["sigma"])
    samples = np.array([r["samples"] for r in records], dtype=np.float64)
    return {
        "method": "smoothing", "params": params, "n": len(records),
        "guarantee": f"each certificate holds with probability >= 1 - alpha = {1 - params['alpha']:g} "
                     "over the Monte-Carlo noise (Cohen et al. 2019, Thm 1 + Clopper-Pearson"
                     + (", anytime-valid checkpoint confidence sequence)" if params["sequential"] else ")"),
        "max_certifiable_radius": rmax,
        "clean_accuracy": float(np.mean([r["prediction"] == r["label"] for r in records])),
        "abstain_rate": float(np.mean([r["abstained"] for r in records])),
        "certified_accuracy": {"radius": grid, "accuracy": [certified_accuracy(records, g) for g in grid]},
        "samples": {"mean": float(samples.mean()), "total": int(samples.sum()), "max": int(samples.max()),
                    "note": "per image, n0 selection + estimation samples"},
        "seconds": float(sum(r["seconds"] for r in records)),
        "per_sample": records,
    }


def _report(res: dict[str, Any]) -> str:
    p = res["params"]
    ca = res["certified_accuracy"]
    rows = [{"radius (L2)": r, "certified accuracy": a} for r, a in zip(ca["radius"], ca["accuracy"])]
    mode = f"sequential (tol {p['tol']:g})" if p["sequential"] else "fixed n"
    return (f"# Certification: randomized smoothing\n\n"
            f"Cohen et al. 2019, L2. Model `{p['model']}`, dataset {p['dataset']} (test, {res['n']} images, "
            f"skip {p['skip']}), sigma = {p['sigma']}, n0 = {p['n0']}, n = {p['n']}, alpha = {p['alpha']}, "
            f"{mode}.\n\n"
            f"{md_table(rows)}\n"
            f"- clean accuracy of the smoothed classifier (non-abstained, correct): "
            f"{certified_accuracy(res['per_sample'], 0.0):.4f}; abstain rate {res['abstain_rate']:.4f}\n"
            f"- largest radius fixed-n CERTIFY can return here: {res['max_certifiable_radius']:.4f}\n"
            f"- samples per image: mean {res['samples']['mean']:.0f}, max {res['samples']['max']} "
            f"(incl. n0); {res['seconds']:.1f} s\n"
            f"- guarantee: {res['guarantee']}\n")


def _plot(path: Path, records: list[dict[str, Any]], res: dict[str, Any], sigma: float) -> None:
    top = max([res["max_certifiable_radius"], 4 * sigma] + [r["radius"] for r in records])
    xs = [top * k / 400 for k in range(401)]
    ys = [certified_accuracy(records, r) for r in xs]
    mode = "sequential" if res["params"]["sequential"] else "fixed n"
    line_plot(path, {f"sigma={sigma:g}, {mode}": (xs, ys)}, xlabel="radius (L2, pixel space)",
              ylabel="certified accuracy", title="randomized smoothing", step=True)

