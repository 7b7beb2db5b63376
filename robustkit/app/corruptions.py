"""``robustkit corruptions``: common-corruption robustness (Hendrycks & Dietterich, "Benchmarking
Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019).

    res = run_corruptions(CorruptionsConfig(model="runs/x", dataset="fashion-mnist", n=500), "cpu")

The first ``n`` test images are corrupted on the fly (``robustkit._corruptions``: the 15
corruptions with CIFAR-10-C's definitions, batched, in pixel space), each image of each
(corruption, severity) from its own seed ``image_seeds(mix(run seed, corruption, severity),
dataset index)`` -- so the corrupted images do not depend on the batch size or on which other
corruptions run, and a baseline scored in the same pass (or an earlier run with the same dataset,
``n`` and seed) sees exactly the same images.

Metrics (the paper's Section 4 and RobustBench's corruption track):

- corruption accuracy per (corruption, severity); ``corruptions_acc`` = their mean (RobustBench's
  leaderboard number) and ``corruptions_acc_<corruption>`` = the mean over severities;
- with a baseline ``b``: ``CE_c = sum_s E_{s,c} / sum_s E^b_{s,c}`` (errors ``E = 1 - accuracy``),
  ``mCE`` = the mean of ``CE_c`` over corruptions, in percent (the baseline itself scores 100; the
  paper's baseline is AlexNet), and the relative versions
  ``sum_s (E_{s,c} - E_clean) / sum_s (E^b_{s,c} - E^b_clean)``. RobustBench's ``corruptions_mce``
  (mean over corruptions of mean error / AlexNet's mean error) is the same ``mCE``.

Writes ``results.json``, ``report.md``, ``plots/corruption_accuracy.png`` (heat map, corruption x
severity), ``model_info.json`` (RobustBench's corruptions ``model_info`` fields) and
``unaggregated_results.csv`` (RobustBench's per corruption and severity table, one row).

Scale-out: the images go in fixed batches of ``batch_size``, shared out over the processes under
``torchrun`` (per image the same results as one process); each batch's record is saved under
``out/parts/`` when done, and ``resume`` computes only the batches missing there.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit._corruptions import NAMES, check_images, corrupt
from robustkit._corruptions_config import CorruptionsConfig
from robustkit.errors import InputError

FORMAT = "robustkit-corruptions/1"
PARTS = "parts"                  # per-batch progress files (robustkit.app.shard.UnitStore)
DEFINITIONS = "CIFAR-10-C (Hendrycks & Dietterich 2019, hendrycks/robustness make_cifar_c.py), on the fly"


def corruption_seeds(seed: int, name: str, severity: int, index: torch.Tensor) -> torch.Tensor:
    """``(B,)`` generator seeds for the images ``index`` under (``name``, ``severity``): the
    per-image seeds of ``certify.base.image_seeds`` on a run seed that mixes in the corruption's
    position in ``NAMES`` and the severity (distinct for every (seed, corruption, severity))."""
    from certify.base import image_seeds

    return image_seeds((int(seed) * len(NAMES) + NAMES.index(name)) * 8 + int(severity), index)


def evaluate_corruptions(models: Mapping[str, nn.Module], x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                         names: Sequence[str], severities: Sequence[int], *, seed: int = 0, batch_size: int = 250,
                         amp: bool = False, progress: bool = False, store_dir: str | Path | None = None,
                         resume: bool = False) -> dict[str, Any]:
    """Score every model of ``models`` on the same corrupted images.

    ``x (N, C, H, W)`` in [0, 1], ``y (N,)``, ``index (N,)`` the dataset indices (the seeds derive
    from them). Images are corrupted on the first model's device, in fixed batches of
    ``batch_size`` that are shared out over the torchrun ranks (``robustkit.app.shard.map_units``;
    every rank gets the whole result, the same as one process's). ``store_dir``: each batch's record
    is saved there when done; ``resume`` keeps the batches already there (made with the same
    settings and weights, else ``InputError``). Returns ``{"clean": {model: (N,) bool}, "correct":
    {model: (len(names), len(severities), N) bool}, "seconds": {corruption: s}}`` (seconds summed
    over the batches, whichever rank ran them).
    """
    check_images(x)
    if not models:
        raise InputError("evaluate_corruptions needs at least one model")
    from robustkit.app.shard import UnitStore, map_units
    from robustkit.evaluate import predict
    from robustkit.modes import device_of
    from robustkit.zoo import fingerprint

    dev = device_of(next(iter(models.values())))
    n = x.shape[0]
    starts = list(range(0, n, batch_size))
    key = {"format": FORMAT, "corruptions": list(names), "severities": list(severities), "seed": seed, "n": n,
           "batch_size": batch_size, "index": [int(index[0]), int(index[-1])] if n else [],
           "models": {k: fingerprint(m) for k, m in models.items()}}
    store = UnitStore(store_dir, key) if store_dir is not None else None

    def compute(u: int) -> dict[str, Any]:
        sl = slice(starts[u], min(starts[u] + batch_size, n))
        xb, yb, ib = x[sl].to(dev), y[sl], index[sl]                                # (B, C, H, W), (B,), (B,)
        rec: dict[str, Any] = {f"clean.{k}": predict(m, xb, batch_size=batch_size, amp=amp) == yb
                               for k, m in models.items()}
        correct = {k: torch.zeros(len(names), len(severities), len(yb), dtype=torch.bool) for k in models}
        seconds = {}
        for ci, name in enumerate(names):
            t0 = time.perf_counter()
            for si, s in enumerate(severities):
                xc = corrupt(xb, name, s, corruption_seeds(seed, name, s, ib))        # (B, C, H, W)
                for k, m in models.items():
                    correct[k][ci, si] = predict(m, xc, batch_size=batch_size, amp=amp) == yb
            seconds[name] = time.perf_counter() - t0
        rec.update({f"correct.{k}": v for k, v in correct.items()})
        rec["seconds"] = seconds
        return rec

    records = map_units(len(starts), compute, store=store, resume=resume, progress=progress, desc="corruptions",
                        weight=lambda u: min(batch_size, n - starts[u]))
    return {"clean": {k: torch.cat([r[f"clean.{k}"].bool() for r in records]) for k in models},
            "correct": {k: torch.cat([r[f"correct.{k}"].bool() for r in records], dim=2) for k in models},
            "seconds": {c: float(sum(r["seconds"][c] for r in records)) for c in names}}


def accuracy_table(clean: torch.Tensor, correct: torch.Tensor, names: Sequence[str], severities: Sequence[int]
                   ) -> dict[str, Any]:
    """Accuracies from ``clean (N,)`` and ``correct (len(names), len(severities), N)`` bool:
    ``clean_accuracy``, ``corruption_accuracy {c: {"s": acc}}``, ``severity_accuracy {"s": mean
    over corruptions}``, ``corruptions_acc`` (mean over all) and ``corruptions_acc_<c>``."""
    acc = correct.float().mean(dim=2)                                            # (n_c, n_s)
    table = {c: {str(s): float(acc[i, j]) for j, s in enumerate(severities)} for i, c in enumerate(names)}
    out: dict[str, Any] = {"clean_accuracy": float(clean.float().mean()), "corruption_accuracy": table,
                           "severity_accuracy": {str(s): float(acc[:, j].mean()) for j, s in enumerate(severities)},
                           "corruptions_acc": float(acc.mean())}
    out.update({f"corruptions_acc_{c}": float(acc[i].mean()) for i, c in enumerate(names)})
    return out


def corruption_errors(model: Mapping[str, Any], baseline: Mapping[str, Any], names: Sequence[str],
                      severities: Sequence[int]) -> dict[str, Any]:
    """CE, mCE, relative CE and relative mCE (percent; the baseline = 100) of ``model`` against
    ``baseline`` (both ``accuracy_table`` dicts). A corruption on which the baseline makes no
    error (or, for the relative CE, no more than on clean images) has no CE (``None``) and is
    left out of the mean, which then says over how many corruptions it is."""
    ce: dict[str, float | None] = {}
    rel: dict[str, float | None] = {}
    for c in names:
        e = [1 - model["corruption_accuracy"][c][str(s)] for s in severities]
        b = [1 - baseline["corruption_accuracy"][c][str(s)] for s in severities]
        e0, b0 = 1 - model["clean_accuracy"], 1 - baseline["clean_accuracy"]
        ce[c] = 100 * sum(e) / sum(b) if sum(b) > 1e-9 else None
        den = sum(v - b0 for v in b)
        rel[c] = 100 * sum(v - e0 for v in e) / den if den > 1e-9 else None

    def mean(d: dict[str, float | None]) -> float | None:
        vals = [v for v in d.values() if v is not None]
        return sum(vals) / len(vals) if vals else None

    return {"ce": ce, "mce": mean(ce), "mce_over": sum(v is not None for v in ce.values()), "relative_ce": rel,
            "relative_mce": mean(rel), "relative_mce_over": sum(v is not None for v in rel.values())}


def load_baseline_results(path: Path, cfg: CorruptionsConfig) -> dict[str, Any]:
    """The accuracy table of an earlier ``robustkit corruptions`` run (its ``results.json``), checked
    to have been made on the same images (dataset, n, seed) and to cover the selected corruptions
    and severities."""
    try:
        old = json.loads(path.read_text())
        fmt = old.get("format")
    except (OSError, ValueError, AttributeError) as e:
        raise InputError(f"baseline {path}: not a robustkit corruptions results.json ({e})") from None
    if fmt != FORMAT:
        raise InputError(f"baseline {path}: not a robustkit corruptions results.json (format {fmt!r}, "
                         f"expected {FORMAT!r})")
    diff = [f"{k} {old.get(k)!r} != {v!r}" for k, v in (("dataset", cfg.dataset), ("n", cfg.n), ("seed", cfg.seed))
            if old.get(k) != v]
    if diff:
        raise InputError(f"baseline {path} was scored on other images ({'; '.join(diff)}); use the same dataset, "
                         "n and seed, or give the baseline model")
    table = old.get("corruption_accuracy", {})
    missing = [f"{c}/{s}" for c in cfg.corruptions for s in cfg.severities if str(s) not in table.get(c, {})]
    if missing:
        raise InputError(f"baseline {path} lacks {len(missing)} of the selected (corruption, severity) pairs, e.g. "
                         f"{missing[0]}")
    return {"model": old.get("model"), "clean_accuracy": old["clean_accuracy"], "corruption_accuracy": table,
            "source": str(path)}


def _load_model(path: str, device: torch.device) -> nn.Module:
    from robustkit.zoo import load

    return load(Path(path), map_location=device).eval()


def run_corruptions(cfg: CorruptionsConfig, device: torch.device | str, *, progress: bool | None = None,
                    log: Callable[[str], None] = lambda m: None, resume: bool = False) -> dict[str, Any]:
    """``robustkit corruptions``: score ``cfg.model`` (and ``cfg.baseline``) on the corrupted first
    ``cfg.n`` test images of ``cfg.dataset``; write ``cfg.out``; return ``results.json``'s dict.

    Under torchrun the batches are shared out over the processes and rank 0 writes (every rank
    returns the results). Each batch is saved under ``cfg.out/parts`` when done; ``resume`` computes
    only the batches missing there (same settings and weights).

    Every input error (no model, unreadable model or baseline, incompatible dataset or image size,
    ``n`` larger than the test split, an output path that cannot be a directory) is raised before
    any work or any file is written. ``progress``: a bar (default: when stderr is a terminal)."""
    from robustkit.app._corruptions_report import write_outputs
    from robustkit.app.sharded_eval import check_output_dir
    from robustkit.config import to_dict
    from robustkit.data import load_data
    from robustkit.device import resolve_device
    from robustkit.zoo import check_compatible

    if not cfg.model:
        raise InputError("corruptions needs a model: --model RUN_OR_MODEL_DIR (or model: in the config)")
    from robustkit.app.shard import check_enough, setup

    out = Path(cfg.out)
    check_output_dir(out)
    w, device = setup(resolve_device(device) if isinstance(device, str) else device)   # torchrun: this rank's
    model = _load_model(cfg.model, device)
    data = load_data(cfg.dataset, "test", cfg.data_root, cfg.download)
    check_compatible(model, data.info)
    if cfg.n > len(data):
        raise InputError(f"n={cfg.n} is more than the {len(data)} test images of {cfg.dataset!r}")
    models: dict[str, nn.Module] = {"model": model}
    baseline_res: dict[str, Any] | None = None
    if cfg.baseline:
        bpath = Path(cfg.baseline)
        if bpath.suffix.lower() == ".json":                                     # an earlier run's results
            baseline_res = load_baseline_results(bpath, cfg)
        else:
            models["baseline"] = _load_model(cfg.baseline, device)
            check_compatible(models["baseline"], data.info, name="baseline")
    x, y = data.tensors(cfg.n)                                                   # (N, C, H, W), (N,)
    check_images(x)
    check_enough(-(-cfg.n // cfg.batch_size), f"batches of {cfg.batch_size} images")
    index = torch.arange(cfg.n)
    show = sys.stderr.isatty() if progress is None else progress
    t0 = time.perf_counter()
    ev = evaluate_corruptions(models, x, y, index, cfg.corruptions, cfg.severities, seed=cfg.seed,
                              batch_size=cfg.batch_size, amp=cfg.amp, progress=show, store_dir=out / PARTS,
                              resume=resume)
    wall = time.perf_counter() - t0
    tables = {k: accuracy_table(ev["clean"][k], ev["correct"][k], cfg.corruptions, cfg.severities) for k in models}
    res: dict[str, Any] = {
        "format": FORMAT, "command": "corruptions", "model": str(cfg.model), "arch": getattr(model, "arch", None),
        "dataset": cfg.dataset, "split": "test", "n": cfg.n, "seed": cfg.seed, "definitions": DEFINITIONS,
        "corruptions": list(cfg.corruptions), "severities": list(cfg.severities), **tables["model"],
        "baseline": None, "seconds": wall, "seconds_per_corruption": ev["seconds"], "processes": w.size,
        "config": to_dict(cfg)}
    if "baseline" in tables:
        baseline_res = {"model": str(cfg.baseline), **tables["baseline"]}
    if baseline_res is not None:
        res["baseline"] = baseline_res
        res.update(corruption_errors(tables["model"], baseline_res, cfg.corruptions, cfg.severities))
    if not w.is_main:
        res["out"] = str(out)
        return res
    write_outputs(out, res)
    log(f"corruptions: clean {res['clean_accuracy']:.4f}  mean corruption accuracy {res['corruptions_acc']:.4f}"
        + (f"  mCE {res['mce']:.1f}" if res.get("mce") is not None else "") + f"  ({wall:.1f}s, {cfg.n} images)")
    res["out"] = str(out)
    return res


def benchmark_entry(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: Sequence[str], *, seed: int = 0,
                    batch_size: int = 250, progress: bool = False) -> dict[str, Any]:
    """The benchmark's corruption keys for one model on the images ``x`` (dataset indices
    ``0 .. N-1``), all five severities: ``corruptions_acc`` and ``corruptions_acc_<c>``."""
    sev = [1, 2, 3, 4, 5]
    ev = evaluate_corruptions({"m": model}, x, y, torch.arange(x.shape[0]), names, sev, seed=seed,
                              batch_size=batch_size, progress=progress)
    t = accuracy_table(ev["clean"]["m"], ev["correct"]["m"], names, sev)
    return {k: v for k, v in t.items() if k.startswith("corruptions_acc")}
