"""``run_benchmark``: a RobustBench-style leaderboard of several models under one threat model.

Per model, on the first ``n`` test images: clean accuracy; every requested attack run
*independently* on all clean-correct points (so per-attack accuracies are comparable);
``robust_acc`` = worst case per point over every attack that ran; AutoAttack's per-point
sub-attack breakdown; deterministic certificates at ``eps`` (IBP, L-inf) and randomized-
smoothing certificates (L2, of the *smoothed* classifier, so never compared with attacks on
the base model); robust accuracy vs eps with our PGD; seconds for each part.

Every claimed attack success is re-checked (label flipped on ``x_adv``, ``x_adv`` inside the
ball and ``[0, 1]``). Consistency flags: points one of our attacks breaks but AutoAttack did
not, and -- raised as ``SoundnessError`` after everything is written -- points an attack broke
although a deterministic certifier certified them at ``eps``.

Output (``out``): ``results.json``, ``report.md``, ``plots/*.png`` and ``models/<name>.json``
(one per model; reused on a rerun with the same settings and weights, so runs are resumable).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from robustkit.app import _bench_report as rep
from robustkit.app._bench_certify import CERTIFY_METHODS, Certifier, certify_deterministic, certify_smoothing
from robustkit.data import load_data
from robustkit.evaluate import predict
from robustkit.io import atomic_write_json
from robustkit.threat import ThreatModel, parse_eps
from robustkit.zoo import RobustModel, load, resolve_model_dir

FORMAT = "robustkit-benchmark/1"
# attack defaults (over the attack's own); ``norm``, ``eps``, ``seed`` are passed where accepted
ATTACK_DEFAULTS: dict[str, dict[str, Any]] = {"pgd": {"steps": 100, "loss": "dlr", "restarts": 2}}
ModelsArg = Sequence[str | Path | RobustModel] | Mapping[str, str | Path | RobustModel]


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
                  device: torch.device | str | None = None, data_root: str | None = None, download: bool = False,
                  progress: bool = True) -> dict[str, Any]:
    """Benchmark ``models`` and write ``results.json``, ``report.md`` and plots to ``out``.

    Args:
        models: run directories / model directories / ``RobustModel`` objects, or ``{name: ...}``.
        attacks: registered attack names (``autoattack``, ``pgd``, ``deepfool``, ``fast``, ...).
        certify: ``ibp``, ``crown-ibp`` (deterministic, L-inf, at ``eps``), ``smoothing`` (L2).
        sigma: smoothing noise level; default: the run's config (``defense: noise``, ``sigma``).
        eps_grid: eps values for the PGD robustness curve (default: 5 points from 0 to ``eps``;
            ``[]`` skips the curve).
        attack_params: per-attack keyword overrides, e.g. ``{"pgd": {"steps": 20}}``,
            ``{"autoattack": {"attacks": ["apgd-ce"], "overrides": {"apgd.n_iter": 10}}}``.
        smoothing: ``n0`` (100), ``n`` (10000), ``alpha`` (0.001), ``n_images`` (min(n, 100)).
        certifiers: extra deterministic certifiers ``{name: fn(model, x, y, eps, norm) -> (B,) bool}``;
            they run on every model and take part in the soundness check (a name of
            ``CERTIFY_METHODS`` replaces the built-in one).
        device: where the models run (default: where they are; loaded models: CPU).

    Returns ``{"format", "settings", "models": [entry, ...], "flags"}`` (as in ``results.json``).
    Raises ``ValueError`` for bad input (before any work) and ``SoundnessError`` (after writing).
    """
    s = _settings(dataset, norm, eps, n, attacks, certify, sigma, eps_grid, batch_size, seed, attack_params,
                  smoothing, certifiers)
    data = load_data(dataset, "test", data_root, download)
    if s["n"] > len(data):
        raise ValueError(f"n={s['n']} is larger than the {len(data)} test images of dataset {dataset!r}")
    named = _load_models(models, device)
    for name, (model, _) in named.items():
        _check_model(name, model, data.info)
    for a in s["attacks"]:   # build once up front so bad attack parameters fail before any work
        build_attack(a, s, None)
    x, y = data.tensors(s["n"])                                                # (N, C, H, W), (N,)
    out = Path(out)
    entries = []
    for name, (model, source) in tqdm(named.items(), desc="benchmark", disable=not progress, unit="model"):
        entries.append(_model_entry(name, model, source, x, y, s, dict(certifiers or {}), out, progress))
    res = {"format": FORMAT, "settings": s, "models": rep.leaderboard_order(entries),
           "flags": {e["name"]: e["flags"] for e in entries if any(e["flags"].values())}}
    rep.write_all(out, res)
    bad = [(e["name"], v) for e in entries for v in e["flags"].get("soundness_violations", [])]
    if bad:
        raise SoundnessError(f"{len(bad)} point(s) broken by an attack although certified at eps={s['eps']}: "
                             + "; ".join(f"{m}: {v['attack']} broke point {v['index']} certified by "
                                         f"{v['certifier']}" for m, v in bad[:5])
                             + f" (see {out / 'results.json'}, flags.soundness_violations)")
    return res


# -- settings and inputs ------------------------------------------------------------------
def _names(v: Sequence[str] | str) -> list[str]:
    items = v.split(",") if isinstance(v, str) else list(v)
    out: list[str] = []
    for item in (str(i).strip().lower() for i in items):
        if item and item not in out:
            out.append(item)
    return out


def _settings(dataset: str, norm: str, eps: float | str, n: int, attacks: Sequence[str] | str,
              certify: Sequence[str] | str, sigma: float | None, eps_grid: Sequence[float | str] | None,
              batch_size: int, seed: int, attack_params: Mapping[str, Mapping[str, Any]] | None,
              smoothing: Mapping[str, Any] | None, certifiers: Mapping[str, Certifier] | None) -> dict[str, Any]:
    """Validated, JSON-able settings (also the resume key)."""
    norm = ThreatModel(norm, 0.0).norm
    eps_f = parse_eps(eps)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = _names(attacks)
    if not names:
        raise ValueError("need at least one attack, e.g. attacks=['pgd']")
    check_attack_names(names)
    cert = _names(certify)
    valid = [*CERTIFY_METHODS, *(certifiers or {})]
    unknown = [c for c in cert if c not in valid]
    if unknown:
        raise ValueError(f"unknown certifier {unknown[0]!r}; valid certifiers: {', '.join(valid)}")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    grid = [round(eps_f * k / 4, 8) for k in range(5)] if eps_grid is None else [parse_eps(e) for e in eps_grid]
    sm = {"n0": 100, "n": 10_000, "alpha": 0.001, "n_images": min(n, 100)}
    extra = sorted(set(smoothing or {}) - set(sm))
    if extra:
        raise ValueError(f"unknown smoothing setting {extra[0]!r}; allowed: {', '.join(sm)}")
    sm.update(smoothing or {})
    if "smoothing" in cert:
        from certify.smoothing import validate_params

        validate_params(sigma or 1.0, sm["n0"], sm["n"], sm["alpha"])
        if not isinstance(sm["n_images"], int) or sm["n_images"] < 1:
            raise ValueError(f"smoothing n_images must be an integer >= 1, got {sm['n_images']!r}")
    return {"dataset": dataset, "norm": norm, "eps": eps_f, "n": n, "attacks": names, "certify": cert,
            "sigma": sigma, "eps_grid": sorted(set(grid)), "batch_size": batch_size, "seed": seed,
            "attack_params": {k.lower(): dict(v) for k, v in (attack_params or {}).items()}, "smoothing": sm}


def _display_name(path: Path) -> str:
    d = resolve_model_dir(path)
    return d.parent.parent.name if d.parent.name == "checkpoints" else d.name


def _load_models(models: ModelsArg, device: torch.device | str | None) -> dict[str, tuple[RobustModel, str | None]]:
    """``{unique name: (model, source path or None)}``."""
    items = list(models.items()) if isinstance(models, Mapping) else [(None, m) for m in models]
    if not items:
        raise ValueError("need at least one model")
    out: dict[str, tuple[RobustModel, str | None]] = {}
    for i, (name, m) in enumerate(items):
        if isinstance(m, nn.Module):
            model, source = m, None
            name = name or f"{getattr(m, 'arch', 'model')}-{i}"
        else:
            model, source = (load(m) if device is None else load(m, map_location=device)), str(Path(m))
            name = name or _display_name(Path(m))
        name = re.sub(r"[^\w.+-]", "_", str(name))                            # also a file name
        if device is not None:
            model = model.to(device)
        base, k = name, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out[name] = (model.eval(), source)
    return out


def _check_model(name: str, model: nn.Module, info: Any) -> None:
    shape = tuple(getattr(model, "input_shape", ()))
    if shape and shape != tuple(info.input_shape):
        raise ValueError(f"model {name!r} expects inputs {shape}, but dataset {info.name!r} has "
                         f"{tuple(info.input_shape)} (was it trained on another dataset?)")
    k = getattr(model, "num_classes", None)
    if k is not None and k != info.num_classes:
        raise ValueError(f"model {name!r} has {k} classes, dataset {info.name!r} has {info.num_classes}")


def _fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def run_sigma(source: str | None) -> float | None:
    """Noise sigma of the run that produced ``source`` (``defense: {name: noise, params: {sigma}}``)."""
    if source is None:
        return None
    import yaml

    d = resolve_model_dir(source)
    for cand in (Path(source), d.parent.parent, d.parent):
        f = cand / "config.yaml"
        if f.is_file():
            cfg = yaml.safe_load(f.read_text()) or {}
            defense = cfg.get("defense") or {}
            if defense.get("name") == "noise":
                return float((defense.get("params") or {}).get("sigma", 0.25))
            return None
    return None


# -- one model ----------------------------------------------------------------------------------
def _model_entry(name: str, model: nn.Module, source: str | None, x: torch.Tensor, y: torch.Tensor,
                 s: dict[str, Any], certifiers: dict[str, Certifier], out: Path, progress: bool) -> dict[str, Any]:
    """Evaluate one model (or reuse ``out/models/<name>.json`` written with the same settings)."""
    key = {**s, "model": name, "source": source and str(Path(source).resolve()), "weights": _fingerprint(model),
           "injected": sorted(certifiers)}
    cache = out / "models" / f"{name}.json"
    if cache.is_file():
        try:
            old = json.loads(cache.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("key") == json.loads(json.dumps(key)):
            if progress:
                tqdm.write(f"benchmark: {name}: reusing {cache} (same settings and weights)")
            return old["entry"]
    torch.manual_seed(s["seed"])
    t0 = time.perf_counter()
    correct = predict(model, x, s["batch_size"]) == y                          # (N,)
    seconds: dict[str, float] = {"clean": time.perf_counter() - t0}
    certified, cert_flags = certify_deterministic(model, x, y, correct, s, certifiers, seconds)
    if "smoothing" in s["certify"]:
        sigma = s["sigma"] if s["sigma"] is not None else run_sigma(source)
        certified["smoothing"] = certify_smoothing(model, x, y, s, sigma, seconds, progress)
    broken: dict[str, torch.Tensor] = {}                                       # attack -> (N,) bool
    subs: dict[str, list[str | None]] = {}
    meta: dict[str, Any] = {}
    for a in s["attacks"]:
        atk = build_attack(a, s, out / "logs" / name)
        broken[a], subs[a], meta[a] = attack_points(model, atk, x, y, correct, s, progress, f"{name}: {a}")
        seconds[a] = meta[a].pop("seconds")
    curve = eps_curve(model, x, y, correct, s, broken.get("pgd"), progress, name, seconds)
    entry = rep.make_entry(name, model, source, s, correct, broken, subs, meta, certified, cert_flags, curve,
                           seconds)
    atomic_write_json(cache, {"key": key, "entry": entry})
    return entry


# -- attacks -----------------------------------------------------------------------------------
def check_attack_names(names: Sequence[str]) -> None:
    """``RegistryError`` (a ``ValueError``) listing the valid attacks for an unknown name."""
    import attacks  # noqa: F401  (registers every attack)
    from robustkit.registry import ATTACKS

    for a in names:
        ATTACKS.get(a)


def build_attack(name: str, s: dict[str, Any], log_dir: Path | None) -> Any:
    """The registered attack ``name`` on the benchmark's threat model, defaults, and overrides."""
    import inspect

    from robustkit.registry import ATTACKS

    cls = ATTACKS.get(name)
    params = inspect.signature(cls.__init__).parameters
    any_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    given = {"norm": s["norm"], "eps": s["eps"], "seed": s["seed"], "batch_size": s["batch_size"],
             "log_dir": None if log_dir is None else str(log_dir)}
    kw = {k: v for k, v in given.items() if v is not None and (k in params or any_kw)}
    kw.update(ATTACK_DEFAULTS.get(name, {}))
    kw.update(s["attack_params"].get(name, {}))
    try:
        return cls(**kw)
    except TypeError as e:
        raise ValueError(f"attack {name!r}: {e}") from None


def _verified(model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, s: dict[str, Any]
              ) -> torch.Tensor:
    """``(B,)`` bool: ``x_adv`` is misclassified, inside the eps-ball and inside ``[0, 1]`` (CPU)."""
    x, y, x_adv = x.cpu(), y.cpu(), x_adv.detach().cpu().to(x.dtype)
    flipped = predict(model, x_adv, s["batch_size"]) != y
    d = (x_adv - x).flatten(1)                                                  # (B, D)
    size = d.abs().amax(1) if s["norm"] == "linf" else d.norm(dim=1)
    inside = size <= s["eps"] * (1 + 1e-5) + 1e-6
    in_box = (x_adv.flatten(1) >= -1e-6).all(1) & (x_adv.flatten(1) <= 1 + 1e-6).all(1)
    return flipped & inside & in_box


def attack_points(model: nn.Module, atk: Any, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor,
                  s: dict[str, Any], progress: bool, desc: str
                  ) -> tuple[torch.Tensor, list[str | None], dict[str, Any]]:
    """Run ``atk`` on every clean-correct point. Returns ``broken (N,)`` (claimed *and* verified),
    per point the sub-attack that broke it (``info["broken_by"]``, for ensembles), and metadata."""
    dev = next(model.parameters()).device
    idx = correct.nonzero().squeeze(1)                                         # (M,)
    broken = torch.zeros_like(correct)
    subs: list[str | None] = [None] * correct.numel()
    meta: dict[str, Any] = {"params": atk.params() if hasattr(atk, "params") else {}, "unverified": 0}
    step = max(int(idx.numel()), 1) if hasattr(atk, "batch_size") else s["batch_size"]  # batches itself: one call
    t0 = time.perf_counter()
    for i in tqdm(range(0, idx.numel(), step), desc=desc, disable=not progress, leave=False):
        j = idx[i:i + step]
        xb, yb = x[j].to(dev), y[j].to(dev)
        res = atk(model, xb, yb)
        claimed = res.success.cpu()
        ok = claimed & _verified(model, xb, yb, res.x_adv, s)
        meta["unverified"] += int((claimed & ~ok).sum())
        broken[j] = ok
        sub = res.info.get("broken_by")
        for k in ok.nonzero().squeeze(1).tolist():
            subs[int(j[k])] = sub[k] if isinstance(sub, list) else None
        meta.update({k: res.info[k] for k in ("package", "package_version", "version", "attacks") if k in res.info})
    meta["seconds"] = time.perf_counter() - t0
    if getattr(atk, "name", "") == "autoattack" and "package" not in meta:   # no clean-correct point to attack
        from attacks.autoattack import find_package

        _, meta["package"], meta["package_version"] = find_package(getattr(atk, "package", "auto"))
        meta.update(version=getattr(atk, "version", None), attacks=getattr(atk, "attacks", None))
    return broken, subs, meta


def eps_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, correct: torch.Tensor, s: dict[str, Any],
              pgd_at_eps: torch.Tensor | None, progress: bool, name: str, seconds: dict[str, float]
              ) -> dict[str, list[float]] | None:
    """Robust accuracy under our PGD at each ``eps_grid`` value (eps 0: clean accuracy)."""
    if not s["eps_grid"]:
        return None
    t0 = time.perf_counter()
    accs = []
    for e in s["eps_grid"]:
        if e == 0:
            broken = torch.zeros_like(correct)
        elif e == s["eps"] and pgd_at_eps is not None:
            broken = pgd_at_eps
        else:
            atk = build_attack("pgd", {**s, "eps": e}, None)
            broken = attack_points(model, atk, x, y, correct, {**s, "eps": e}, progress, f"{name}: pgd eps={e:g}")[0]
        accs.append(rep.acc(correct & ~broken))
    seconds["pgd_eps_curve"] = time.perf_counter() - t0
    return {"eps": list(s["eps_grid"]), "robust_acc": accs}

