"""``benchmark``: a RobustBench-style leaderboard of several models under one threat model.

Per model, on the first ``n`` test images: clean accuracy; every requested attack run
*independently* on all clean-correct points (so per-attack accuracies are comparable) on the
evaluation engine (``robustkit.evaluate``), which verifies every claimed success (label flipped
on ``x_adv``, ``x_adv`` inside the ball and ``[0, 1]``, ``ThreatModel.contains``) and counts the
claims that fail; ``robust_acc`` = worst case per point over every attack; AutoAttack's per-point
sub-attack breakdown; deterministic certificates in the threat norm (IBP / CROWN-IBP /
Lipschitz, per-image radii) and randomized-smoothing certificates (L2, of the *smoothed*
classifier -- Cohen et al., and dual smoothing on dual-subimage models -- so never compared with
attacks on the base model), plotted per norm (``plots/certified_accuracy_<norm>.png``); robust
accuracy vs eps with our PGD; seconds for each part. Optionally the adversarial sparsity of
each model (``sparsity``) and the transfer success matrix between the models, LGV collections
as extra sources (``transfer``; ``transfer_matrix`` in results.json), and CPR's robust
accuracy with rejection (``reject``; Chen et al. 2023).

Consistency flags: points one of our attacks breaks but AutoAttack did not, and -- raised as
``SoundnessError`` after everything is written -- points an attack broke although a
deterministic certifier certified them at ``eps``.

Output (``cfg.out``): ``results.json``, ``report.md``, ``plots/*.png`` and ``models/<name>.json``
(one per model; reused on a rerun with the same settings and weights, so runs are resumable).
Under ``torchrun`` the attacks and the eps curve run in fixed batches shared out over the
processes (same per-image results as one process), each batch saved under ``parts/<model>/``
when done and reused by a rerun; rank 0 alone writes the files above.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robustkit.app import _bench_report as rep
from robustkit.app._bench_attacks import bench_attack, eps_curve, run_attacks
from robustkit.app._bench_certify import CERTIFY_METHODS, SMOOTHED, Certifier, certify_deterministic, certify_smoothing
from robustkit.app._bench_models import ModelsArg, load_models, run_sigma
from robustkit.app._bench_reject import reject_settings
from robustkit.app._bench_sparsity import check_sparsity, sparsity_entry, sparsity_settings
from robustkit.app._robustbench import reported_entries
from robustkit.app.shard import broadcast, check_enough, setup, world
from robustkit.app.sharded_eval import check_output_dir
from robustkit.config import BenchmarkConfig, from_dict
from robustkit.data import load_data
from robustkit.errors import ConfigError, InputError
from robustkit.io import atomic_write_json
from robustkit.zoo import check_compatible, fingerprint

FORMAT = "robustkit-benchmark/1"
PARTS = "parts"               # per-batch progress files of the attacks: parts/<model>/attacks, pgd-eps-<i>


class SoundnessError(RuntimeError):
    """An attack broke a point that a deterministic certifier certified at the same eps: the
    certifier (or the attack's success check) is wrong. Raised after the results are written."""


def run_benchmark(models: ModelsArg, out: str | Path, *, dataset: str = "mnist5k", norm: str = "linf",
                  eps: float | str = 0.3, n: int = 1000,
                  attacks: Sequence[str] | str = ("autoattack", "pgd", "deepfool"),
                  certify: Sequence[str] | str = (), sigma: float | None = None,
                  eps_grid: Sequence[float | str] | None = None, batch_size: int = 256, seed: int = 0,
                  attack_params: Mapping[str, Mapping[str, Any]] | None = None,
                  smoothing: Mapping[str, Any] | None = None, certifiers: Mapping[str, Certifier] | None = None,
                  sparsity: bool | Mapping[str, Any] = False, transfer: bool | Mapping[str, Any] = False,
                  reject: bool | Mapping[str, Any] = False, device: torch.device | str | None = None,
                  data_root: str | None = None, download: bool = False, progress: bool = True) -> dict[str, Any]:
    """The keyword front of ``benchmark``: builds the ``BenchmarkConfig`` (same keys) and runs it.

    Args:
        models: run directories / model directories / ``RobustModel`` objects, or ``{name: ...}``.
        attacks: registered attack names (``autoattack``, ``pgd``, ``deepfool``, ``fast``, ...).
        certify: ``ibp``, ``crown-ibp``, ``lipschitz`` (deterministic, in the threat norm, at ``eps`` and as
            radii), ``smoothing``, ``dual-smoothing`` (L2, of the smoothed classifier; dual: ``dual-subimage``
            models only, others get an ``n/a`` record with the reason).
        sigma: smoothing noise level; default: the run's config (``defense: noise``, ``sigma``).
        eps_grid: eps values for the PGD robustness curve (default: 5 points from 0 to ``eps``;
            ``[]`` skips the curve).
        attack_params: per-attack keyword overrides, e.g. ``{"pgd": {"steps": 20}}``,
            ``{"autoattack": {"attacks": ["apgd-ce"], "overrides": {"apgd.n_iter": 10}}}``.
        smoothing: ``n0`` (100), ``n`` (10000), ``alpha`` (0.001), ``n_images`` (min(n, 100)).
        sparsity: adversarial sparsity per model (``True`` or settings such as ``{"directions": 16}``;
            ``robustkit.app._bench_sparsity``): entry key ``adversarial_sparsity``.
        transfer: the transfer success matrix between the models (``True`` or ``{"steps", "step_size",
            "sources": [LGV collection dirs]}``; ``robustkit.app._bench_transfer``): ``transfer_matrix``.
        reject: CPR selective classification per model (``True`` or ``robustkit reject``'s settings, e.g.
            ``{"steps": 10, "n_images": 50}``; ``robustkit.app._bench_reject``): entry keys ``rejection``,
            ``rejection_robust_acc`` (alpha 0) and ``rejection_curve_auc``.
        certifiers: extra deterministic certifiers ``{name: fn(model, x, y, eps, norm) -> (B,) bool}``;
            they run on every model and take part in the soundness check.
        device: where the models run (default: where they are; loaded models: CPU).
    """
    cfg = from_dict(BenchmarkConfig, {
        "dataset": dataset, "norm": norm, "eps": eps, "n": n, "attacks": _seq(attacks), "certify": _seq(certify),
        "sigma": sigma, "eps_grid": None if eps_grid is None else _seq(eps_grid), "batch_size": batch_size,
        "seed": seed, "attack_params": {k: dict(v) for k, v in (attack_params or {}).items()},
        "smoothing": dict(smoothing or {}),
        "sparsity": sparsity if isinstance(sparsity, bool) else dict(sparsity),
        "transfer": transfer if isinstance(transfer, bool) else dict(transfer),
        "reject": reject if isinstance(reject, bool) else dict(reject), "out": str(out),
        "data_root": data_root, "download": download})
    return benchmark(cfg, models, certifiers=certifiers, device=device, progress=progress)


def _seq(v: Sequence[Any] | str) -> list[Any] | str:
    return v if isinstance(v, str) else list(v)


def benchmark(cfg: BenchmarkConfig, models: ModelsArg | None = None, *,
              certifiers: Mapping[str, Certifier] | None = None, device: torch.device | str | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Benchmark ``models`` (default ``cfg.models``) and write the results to ``cfg.out``.

    Returns ``{"format", "settings", "models": [entry, ...], "flags"}`` (as in ``results.json``).
    Raises ``InputError``s for bad input (before any work) and ``SoundnessError`` (after writing).
    """
    certifiers = dict(certifiers or {})
    s = settings(cfg, certifiers)
    out = Path(cfg.out)
    check_output_dir(out)
    items = cfg.models if models is None else models
    reported = reported_entries(items, s)                     # RobustBench model_info .json items, as reported
    if reported and len(reported) == len(items):             # nothing to evaluate: no data, no model
        return rep.reported_only(out, {"format": FORMAT, "settings": s, "models": [], "reported": reported,
                                       "flags": {}})
    data = load_data(cfg.dataset, "test", cfg.data_root, cfg.download)
    if cfg.n > len(data):
        raise InputError(f"n={cfg.n} is larger than the {len(data)} test images of dataset {cfg.dataset!r}")
    check_enough(cfg.n, "images")
    w, rank_device = setup("cpu" if device is None else device)     # under torchrun: the process group
    named = load_models(items, None if device is None else rank_device)
    for name, (model, _) in named.items():
        check_compatible(model, data.info, name=f"model {name!r}")
    for a in cfg.attacks:      # build once up front so bad attack parameters fail before any work
        bench_attack(a, cfg, cfg.eps_value, None)
    check_sparsity(cfg)
    extra = _transfer_sources(cfg, data.info, None if device is None else rank_device)
    x, y = data.tensors(cfg.n)                                                 # (N, C, H, W), (N,)
    if cfg.corruptions:
        from robustkit._corruptions import check_images

        check_images(x[:1])                    # the corruptions' image sizes, before any work
    entries = [_model_entry(name, model, source, x, y, cfg, s, certifiers, out, progress)
               for name, (model, source) in tqdm(named.items(), desc="benchmark", unit="model",
                                                 disable=not (progress and w.is_main))]
    res = {"format": FORMAT, "settings": s, "models": rep.leaderboard_order(entries), "reported": reported,
           "flags": {e["name"]: e["flags"] for e in entries if any(e["flags"].values())}}
    if cfg.transfer.enabled and w.is_main:
        res["transfer_matrix"] = _transfer(cfg, s, named, extra, x, y, out)
    if w.is_main:
        rep.write_all(out, res)
    bad = [(e["name"], v) for e in entries for v in e["flags"].get("soundness_violations", [])]
    if bad:
        raise SoundnessError(f"{len(bad)} point(s) broken by an attack although certified at eps={cfg.eps_value}: "
                             + "; ".join(f"{m}: {v['attack']} broke point {v['index']} certified by "
                                         f"{v['certifier']}" for m, v in bad[:5])
                             + f" (see {out / 'results.json'}, flags.soundness_violations)")
    return res


def settings(cfg: BenchmarkConfig, certifiers: Mapping[str, Certifier]) -> dict[str, Any]:
    """The resolved, JSON-able settings (``results.json``'s ``settings``, the resume key, and what
    the certificate functions read); checks the certifier names and smoothing parameters."""
    valid = [*CERTIFY_METHODS, *certifiers]
    unknown = [c for c in cfg.certify if c not in valid]
    if unknown:
        raise ConfigError(f"unknown certifier {unknown[0]!r}; valid certifiers: {', '.join(valid)}")
    sm = cfg.smoothing
    smoothing = {"n0": sm.n0, "n": sm.n, "alpha": sm.alpha, "n_images": sm.n_images or min(cfg.n, 100)}
    if any(c in SMOOTHED for c in cfg.certify):
        from certify.smoothing import validate_params

        validate_params(cfg.sigma or 1.0, sm.n0, sm.n, sm.alpha)
    return {"dataset": cfg.dataset, "norm": cfg.norm, "eps": cfg.eps_value, "n": cfg.n, "attacks": list(cfg.attacks),
            "certify": list(cfg.certify), "sigma": cfg.sigma, "eps_grid": cfg.eps_grid_values,
            "batch_size": cfg.batch_size, "seed": cfg.seed, "attack_params": cfg.attack_params, "smoothing": smoothing,
            **({"sparsity": sparsity_settings(cfg)} if cfg.sparsity.enabled else {}),
            **({"transfer": {"steps": cfg.transfer.steps, "step_size": cfg.transfer.step_size,
                             "sources": list(cfg.transfer.sources)}} if cfg.transfer.enabled else {}),
            **({"corruptions": list(cfg.corruptions)} if cfg.corruptions else {}),
            **({"reject": reject_settings(cfg)} if cfg.reject.enabled else {})}


def _model_entry(name: str, model: nn.Module, source: str | None, x: torch.Tensor, y: torch.Tensor,
                 cfg: BenchmarkConfig, s: dict[str, Any], certifiers: dict[str, Certifier], out: Path,
                 progress: bool) -> dict[str, Any]:
    """Evaluate one model (or reuse ``out/models/<name>.json`` written with the same settings)."""
    key = {**s, "model": name, "source": source and str(Path(source).resolve()), "weights": fingerprint(model),
           "injected": sorted(certifiers)}
    cache = out / "models" / f"{name}.json"
    main = world().is_main
    reused = broadcast(_cached(cache, key) if main else None)      # rank 0 decides, so every rank agrees
    if reused is not None:
        if progress and main:
            tqdm.write(f"benchmark: {name}: reusing {cache} (same settings and weights)")
        return reused
    torch.manual_seed(cfg.seed)
    parts = out / PARTS / name
    ev, meta = run_attacks(model, x, y, cfg, list(cfg.attacks), cfg.eps_value, out / "logs" / name, progress, name,
                           parts / "attacks")
    correct = ev.clean_correct                                                 # (N,)
    seconds: dict[str, float] = {"clean": ev.clean_seconds}
    certified, cert_flags = certify_deterministic(model, x, y, correct, s, certifiers, seconds)
    for method in (c for c in cfg.certify if c in SMOOTHED):     # smoothing, dual-smoothing (same sigma)
        sigma = cfg.sigma if cfg.sigma is not None else run_sigma(source)
        certified[method] = certify_smoothing(model, x, y, s, sigma, seconds, progress, method)
    broken = {a: ev.broken[i] for i, a in enumerate(cfg.attacks)}           # attack -> (N,) bool, verified
    subs = {a: ev.sub_attacks[i] for i, a in enumerate(cfg.attacks)}
    seconds.update({a: st.seconds for a, st in zip(cfg.attacks, ev.stats)})
    curve = eps_curve(model, x, y, correct, cfg, broken.get("pgd"), progress, name, seconds, parts)
    if cfg.sparsity.enabled:                 # vulnerable: broken at eps by any attack (verified)
        sparsity = sparsity_entry(model, x, y, torch.stack(list(broken.values())).any(0) & correct, cfg, seconds)
    entry = rep.make_entry(name, model, source, cfg, correct, broken, subs, meta, certified, cert_flags, curve,
                           seconds, labels=ev.y)
    if cfg.sparsity.enabled:
        entry["adversarial_sparsity"] = sparsity
    if cfg.reject.enabled:                  # CPR (Chen et al. 2023): robust accuracy with rejection
        from robustkit.app._bench_reject import reject_entry

        entry.update(reject_entry(model, x, y, cfg, s, entry["seconds"]))
    if cfg.corruptions:                     # common corruptions (robustkit.app.corruptions): corruptions_acc[_<c>]
        from robustkit.app.corruptions import benchmark_entry

        t0 = time.perf_counter()
        entry.update(benchmark_entry(model, x, y, cfg.corruptions, seed=cfg.seed, batch_size=cfg.batch_size,
                                     progress=progress and main))
        entry["seconds"]["corruptions"] = round(time.perf_counter() - t0, 3)
    if main:
        atomic_write_json(cache, {"key": key, "entry": entry})
    return entry


def _transfer_sources(cfg: BenchmarkConfig, info: Any, device: torch.device | None) -> dict[str, nn.Module]:
    """The transfer matrix's extra source rows (``transfer.sources``), loaded and checked up front."""
    if not cfg.transfer.enabled or not cfg.transfer.sources:
        return {}
    from robustkit.app._bench_transfer import load_sources

    extra = load_sources(list(cfg.transfer.sources), device)
    for name, m in extra.items():
        check_compatible(m, info, name=f"transfer source {name!r}")
    return extra


def _transfer(cfg: BenchmarkConfig, s: dict[str, Any], named: dict[str, Any], extra: dict[str, nn.Module],
              x: torch.Tensor, y: torch.Tensor, out: Path) -> dict[str, Any]:
    """The transfer success matrix (rows: every model, then ``extra``; columns: every model),
    reused from ``out/transfer.json`` when made with the same settings and weights."""
    from robustkit.app import _bench_transfer as tr

    targets = {k: m for k, (m, _) in named.items()}
    sources = {**targets, **{k if k not in targets else f"{k}-source": m for k, m in extra.items()}}
    key = tr.cache_key({k: s[k] for k in ("dataset", "norm", "eps", "n", "transfer")}, sources, targets)
    return tr.cached_matrix(out, key, lambda: tr.transfer_matrix(
        sources, targets, x, y, norm=cfg.norm, eps=cfg.eps_value, steps=cfg.transfer.steps,
        step_size=cfg.transfer.step_size, batch_size=cfg.batch_size))


def _cached(cache: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The entry of ``cache`` if it was written with ``key``, else ``None``."""
    if not cache.is_file():
        return None
    try:
        old = json.loads(cache.read_text())
    except json.JSONDecodeError:
        return None
    return old["entry"] if isinstance(old, dict) and old.get("key") == json.loads(json.dumps(key)) else None
