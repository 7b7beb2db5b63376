"""THE certification pipeline, used by ``robustkit certify``, the benchmark and the quickstart.

    certifier = build_certifier(cfg)               # a CERTIFIERS entry (certify.base.Certifier)
    results = certify_points(model, points, certifier, chunk=..., seed=0, resume=True, out=DIR)
    write_outputs(DIR, results)                    # results.json, report.md, plots/certified_accuracy.png

``certify_points`` calls the certifier on chunks of images with per-image seeds
``image_seeds(seed, dataset index)``, so an image's certificate depends only on the run seed,
its index and the certifier's settings -- not on the chunk size, the other images or the
number of processes. With ``out`` it rewrites ``out/per_image.json`` atomically after every
chunk; ``resume=True`` keeps the images already there (if the settings match). Every
certifier gets the same results schema (``summarize``): the certified-accuracy curve on the
one radius grid (``robustkit.report``), the average certified radius (ACR), clean accuracy,
abstain rate, the guarantee and the per-image records.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from certify.base import Certifier, image_seeds
from robustkit.app._certify_report import write_outputs
from robustkit.app.shard import UnitStore, check_enough, map_units, setup, union, world
from robustkit.config import CertifyConfig
from robustkit.errors import CheckpointError, InputError
from robustkit.io import atomic_write_json
from robustkit.modes import device_of
from robustkit.registry import CERTIFIERS
from robustkit.report import certified_accuracy_curve, radius_grid
from robustkit.validate import integer
from robustkit.zoo import fingerprint

FORMAT = "robustkit-certify/1"
PARTIAL = "per_image.json"
PARTS = "parts"                     # per-chunk progress files (robustkit.app.shard.UnitStore)
RECORD_KEYS = ("index", "label", "prediction", "radius", "abstained", "correct")


@dataclass(frozen=True)
class Points:
    """Images to certify: ``x (N, C, H, W)`` float in [0, 1], labels ``y (N,)``, and the dataset
    ``index (N,)`` int64 of each image (the per-image seeds derive from it)."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    dataset: str = ""

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if self.x.dim() != 4 or self.y.shape != (n,) or tuple(self.index.shape) != (n,):
            raise InputError(f"points need x (N, C, H, W), y (N,), index (N,); got {tuple(self.x.shape)}, "
                             f"{tuple(self.y.shape)}, {tuple(self.index.shape)}")
        if torch.unique(self.index).numel() != n:
            raise InputError("points: the dataset indices must be distinct")

    @classmethod
    def first(cls, x: torch.Tensor, y: torch.Tensor, dataset: str = "") -> Points:
        """The first ``N`` images of a split: indices ``0 .. N-1``."""
        return cls(x, y, torch.arange(x.shape[0]), dataset)


def load_points(dataset: str, n_images: int, skip: int = 1, data_root: str | None = None, download: bool = False,
                model: nn.Module | None = None) -> Points:
    """Every ``skip``-th test image of ``dataset``, the first ``n_images`` of them (checked against ``model``)."""
    from robustkit.data import load_data, to_float
    from robustkit.zoo import check_compatible

    integer("n_images", n_images, 1)
    integer("skip", skip, 1)
    data = load_data(dataset, "test", data_root, download)
    if model is not None:
        check_compatible(model, data.info)
    idx = torch.arange(0, len(data), skip)
    if n_images > idx.numel():
        raise InputError(f"n_images={n_images} is more than the {idx.numel()} test images of {dataset!r} at "
                         f"skip {skip}")
    idx = idx[:n_images]
    return Points(to_float(data.images[idx]), data.labels[idx], idx, dataset)


def build_certifier(cfg: CertifyConfig) -> Certifier:
    """The registered certifier ``cfg.method`` with its settings (validated here, before any work)."""
    import certify  # noqa: F401  (registers the certifiers)

    cls = CERTIFIERS.get(cfg.method)
    if cfg.method in ("smoothing", "dual-smoothing"):       # dual-smoothing: the same settings, per sub-image
        sm = cfg.smoothing
        return cls(sigma=sm.sigma, n0=sm.n0, n=sm.n, alpha=sm.alpha, batch_size=cfg.batch_size,
                   sequential=sm.sequential, tol=sm.tol, amp=cfg.amp)
    if cfg.method == "lipschitz":
        lp = cfg.lipschitz
        return cls(norm=lp.norm, eps=lp.eps, gram_iters=lp.gram_iters, pairwise=lp.pairwise,
                   batch_size=cfg.batch_size)
    b = cfg.bounds
    return cls(norm=b.norm, eps=b.eps, tol=b.tol, max_eps=b.max_eps, batch_size=cfg.batch_size)


def default_chunk(certifier: Certifier) -> int:
    """Images per certifier call: enough to fill a forward batch of ``n`` noise samples (at least 8),
    or one bound pass."""
    bs = int(getattr(certifier, "batch_size", 100))
    n = getattr(certifier, "n", None)
    return max(8, bs // n) if isinstance(n, int) else bs


def _scalar(v: torch.Tensor) -> bool | int | float:
    return bool(v) if v.dtype == torch.bool else int(v) if not v.is_floating_point() else float(v)


def _records(points: Points, part: list[int], cert: Any, seconds: float) -> list[dict[str, Any]]:
    """One JSON record per image of ``part`` (positions in ``points``)."""
    info = {k: v.detach().cpu() for k, v in (cert.info or {}).items()
            if isinstance(v, torch.Tensor) and v.shape == (len(part),)}
    pred, radius, abst = cert.prediction.cpu(), cert.radius.cpu(), cert.abstained.cpu()
    out = []
    for k, j in enumerate(part):
        label = int(points.y[j])
        rec = {"index": int(points.index[j]), "label": label, "prediction": int(pred[k]),
               "radius": float(radius[k]), "abstained": bool(abst[k]),
               "correct": int(pred[k]) == label and not bool(abst[k])}
        rec.update({name: _scalar(v[k]) for name, v in info.items() if name not in rec})
        rec["seconds"] = seconds
        out.append(rec)
    return out


def _resume_key(model: nn.Module, points: Points, certifier: Certifier, seed: int) -> dict[str, Any]:
    params = {k: v for k, v in certifier.params().items() if k != "batch_size"}   # results do not depend on it
    return json.loads(json.dumps({"certifier": certifier.name, "params": params, "seed": seed,
                                  "dataset": points.dataset, "weights": fingerprint(model)}))


def _load_partial(f: Path, key: dict[str, Any]) -> dict[int, dict[str, Any]]:
    if not f.is_file():
        return {}
    try:
        old = json.loads(f.read_text())
        old_key, records = old["key"], old["records"]
        done = {int(r["index"]): r for r in records}
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f}: not a certify progress file ({e}); remove it or do not resume") from None
    diff = [f"{k}: {old_key.get(k)!r} -> {key[k]!r}" for k in key if old_key.get(k) != key[k]]
    if diff:
        raise InputError(f"resume: {f} was made with different settings ({'; '.join(diff)}); use another output "
                         "directory or the same settings")
    return done


def certify_points(model: nn.Module, data: Points, certifier: Certifier, *, chunk: int | None = None, seed: int = 0,
                   resume: bool = False, out: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Certify every image of ``data`` with ``certifier``; returns ``summarize(...)`` (with per-image records).

    chunk: images per certifier call and per progress file (default ``default_chunk``); per-image
    results do not depend on it. out: where each chunk's records are saved the moment they are done
    (``out/parts/``, atomically) and, at the end, every record (``out/per_image.json``); resume: keep
    the images already done there (``InputError`` if made with other settings, weights or seed).
    Under torchrun the chunks are shared out over the ranks (``robustkit.app.shard``) and every
    rank returns the whole result; only rank 0 writes ``per_image.json``. The model runs on its own
    device; ``data`` may live anywhere.
    """
    chunk = default_chunk(certifier) if chunk is None else integer("chunk", chunk, 1)
    integer("seed", seed)
    check_enough(len(data.index), "images")
    if callable(getattr(certifier, "prepare", None)):       # optional: reject the model before anything is written
        certifier.prepare(model, tuple(data.x.shape[1:]))
    key = _resume_key(model, data, certifier, seed)
    store = UnitStore(Path(out) / PARTS, key) if out is not None else None
    local: dict[int, dict[str, Any]] = {}
    if resume and out is not None:
        local = {int(r["index"]): r for unit in store.done().values() for r in unit["records"]}
        local.update(_load_partial(Path(out) / PARTIAL, key))                  # the merged file wins
    elif store is not None and world().is_main:
        store.clear()
    index = data.index.tolist()
    wanted = set(index)
    done = {i: r for i, r in union(local).items() if i in wanted}
    todo = [j for j, i in enumerate(index) if i not in done]
    # a chunk is named after its first image: unique, also against the files of an earlier run
    parts = {int(index[p[0]]): p for p in (todo[s:s + chunk] for s in range(0, len(todo), chunk))}
    dev = device_of(model)

    def compute(unit: int) -> dict[str, Any]:
        part = parts[unit]
        sel = torch.tensor(part)
        t0 = time.perf_counter()
        cert = certifier(model, data.x[sel].to(dev), seeds=image_seeds(seed, data.index[sel]))
        return {"records": _records(data, part, cert, (time.perf_counter() - t0) / len(part))}

    for unit in map_units(list(parts), compute, store=store, done={}, progress=progress,
                          desc=f"certify ({certifier.name})", weight=lambda u: len(parts[u])):
        done.update({int(r["index"]): r for r in unit["records"]})
    records = [done[i] for i in index]
    if out is not None and world().is_main:
        atomic_write_json(Path(out) / PARTIAL, {"key": key, "records": records})
    return summarize(records, certifier, seed, data.dataset)


def summarize(records: list[dict[str, Any]], certifier: Certifier, seed: int = 0, dataset: str = "") -> dict[str, Any]:
    """The one results schema (the same keys for every certifier)."""
    n = len(records)
    grid = radius_grid(certifier.radius_scale)
    curve = certified_accuracy_curve([r["radius"] for r in records], [r["correct"] for r in records], grid)
    samples = [r["samples"] for r in records if "samples" in r]
    lipschitz = sorted({r["lipschitz_constant"] for r in records if "lipschitz_constant" in r})
    return {
        "format": FORMAT, "certifier": certifier.name, "norm": certifier.norm,
        "deterministic": certifier.deterministic, "params": certifier.params(), "seed": seed, "dataset": dataset,
        "n": n, "guarantee": certifier.guarantee,
        "clean_accuracy": sum(r["prediction"] == r["label"] for r in records) / max(n, 1),
        "abstain_rate": sum(r["abstained"] for r in records) / max(n, 1),
        "average_certified_radius": curve.pop("average_certified_radius"),
        "curve": curve,
        "radius_scale": certifier.radius_scale,
        "max_radius": getattr(certifier, "max_radius", None),
        "samples": {"mean": sum(samples) / len(samples), "max": max(samples), "total": sum(samples)}
        if samples else None,
        "seconds": float(sum(r["seconds"] for r in records)),
        **({"lipschitz_constant": lipschitz[-1]} if lipschitz else {}),     # the model's L (certify.lipschitz)
        "per_sample": records,
    }


def certified_at(results: dict[str, Any], radius: float) -> torch.Tensor:
    """``(N,)`` bool per image of ``results``: correct, not abstained, certified radius >= ``radius``."""
    return torch.tensor([r["correct"] and r["radius"] >= radius for r in results["per_sample"]], dtype=torch.bool)


def run_certify(cfg: CertifyConfig, device: torch.device | str, *, resume: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """``robustkit certify``: load the model and images of ``cfg``, certify them, write ``cfg.out``
    (results.json, report.md, plots/certified_accuracy.png, per_image.json). Input is validated
    before anything is written. Under torchrun the images are shared out over the processes and
    rank 0 writes (``wall_seconds``: this invocation's wall-clock; ``seconds``: compute summed
    over the images, whichever rank certified them)."""
    from robustkit.zoo import load

    if not cfg.model:
        raise InputError("certify needs a model: --model RUN_OR_MODEL_DIR (or model: in the config)")
    certifier = build_certifier(cfg)
    w, device = setup(device)                      # under torchrun: this rank's GPU, the process group
    model = load(Path(cfg.model), map_location=device)
    if callable(getattr(certifier, "check_model", None)):   # a certifier that needs a kind of model says so now
        certifier.check_model(model)
    points = load_points(cfg.dataset, cfg.n_images, cfg.skip, cfg.data_root, cfg.download, model)
    t0 = time.perf_counter()
    res = certify_points(model, points, certifier, chunk=cfg.chunk, seed=cfg.seed, resume=resume, out=cfg.out,
                         progress=progress)
    res["model"] = str(Path(cfg.model).resolve())
    res["processes"], res["wall_seconds"] = w.size, time.perf_counter() - t0
    if w.is_main:
        write_outputs(cfg.out, res)
    return res
