"""AutoAttack adapter: runs the real AutoAttack (Croce & Hein 2020, "Reliable evaluation of
adversarial robustness with an ensemble of diverse parameter-free attacks", ICML) -- never a
re-implementation.

Backends, in order of preference: the upstream module ``autoattack`` (github fra31/auto-attack:
``AutoAttack(model, norm=, eps=, version=, device=, log_path=)``,
``run_standard_evaluation(x, y, bs=, return_labels=)``), else PyPI ``pyautoattack``
(keyword-only, ``run_standard_evaluation(x, y, batch_size=)`` returning ``(x_adv, y_adv)``).
Signatures are inspected, not assumed from the name.

Versions: ``standard`` (APGD-CE, APGD-T, FAB-T, Square), ``plus``, ``rand`` (APGD-CE/DLR with
20 EoT samples, for randomized defenses) and ``custom`` (any list of ``ATTACK_NAMES``; passing
``attacks`` with ``version="standard"`` selects ``custom``). Norms: L-inf, L2, L1.

**Which attack broke each point.** Neither package reports it per sample (the logs give only
counts), so the adapter runs the version's attacks one at a time, in the package's order, each
on the points still robust -- exactly what ``run_standard_evaluation`` does internally (same
attack objects and parameters, same seeds, same batching), so the numbers are those of one
call, with attribution for free and no log parsing.

**Resume.** ``state_path`` checkpoints after each attack (JSON + a safetensors file with the
adversarial points found so far); a rerun with the same inputs skips finished attacks. The
packages' own ``state_path`` is not used: pyautoattack 0.2.0 cannot read back the state it
writes (it serializes the attack set as a string), and upstream's returns adversarial examples
only for points broken after the restore.

**Output.** The packages print and log; all of it goes to ``log_path`` (default
``out_dir/autoattack.log``; else kept in ``AutoAttackResult.log_text``), to stdout as well only
with ``verbose=True``. The global torch RNG, which the packages reseed, is restored afterwards.
Device: follows ``x.device``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import json
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

import torch
from torch import nn

from attacks.base import Attack, AttackResult, check_inputs, eval_mode, num_classes_of
from robustkit.io import atomic_write, atomic_write_json
from robustkit.registry import ATTACKS
from robustkit.threat import parse_eps

PACKAGES = ("autoattack", "pyautoattack")           # preference order
VERSIONS = ("standard", "plus", "rand", "custom")
ATTACK_NAMES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}
STATE_FORMAT = "robustkit-autoattack-state/1"


@dataclass
class AutoAttackResult:
    """Outcome of ``run_autoattack`` on ``N`` points.

    x_adv:         (N, C, H, W) adversarial points for broken samples, the clean ones otherwise.
    robust:        (N,) bool, correctly classified and not broken by any attack.
    clean_correct: (N,) bool.
    broken_by:     per sample: ``"clean"`` (misclassified without attack), the attack name
                   (``"apgd-ce"``, ...) that broke it first, or ``None`` (robust).
    robust_after:  robust accuracy after the clean pass and after each attack, in order.
    """

    x_adv: torch.Tensor
    robust: torch.Tensor
    clean_correct: torch.Tensor
    broken_by: list[str | None]
    robust_accuracy: float
    clean_accuracy: float
    robust_after: dict[str, float]
    attack_seconds: dict[str, float]
    attacks: list[str]
    version: str
    norm: str
    eps: float
    package: str
    package_version: str
    seconds: float
    log_path: str | None = None
    resumed: list[str] = field(default_factory=list)
    log_text: str = ""

    def summary(self) -> dict[str, Any]:
        """JSON-able record (no tensors) for ``results.json``."""
        counts = {a: self.broken_by.count(a) for a in ["clean", *self.attacks]}
        return {"robust_accuracy": self.robust_accuracy, "clean_accuracy": self.clean_accuracy,
                "n": len(self.broken_by), "robust_after": self.robust_after, "broken_by_counts": counts,
                "attack_seconds": self.attack_seconds, "attacks": self.attacks, "version": self.version,
                "norm": self.norm, "eps": self.eps, "package": self.package,
                "package_version": self.package_version, "seconds": self.seconds, "log_path": self.log_path,
                "resumed": self.resumed}


# -- backend --------------------------------------------------------------------------------
def find_package(package: str = "auto") -> tuple[ModuleType, str, str]:
    """Import the AutoAttack backend: ``(module, name, version)``. ``package``: ``auto`` (upstream
    ``autoattack`` if importable, else ``pyautoattack``) or one of ``PACKAGES``."""
    if package != "auto" and package not in PACKAGES:
        raise ValueError(f"unknown AutoAttack package {package!r}; allowed: auto, {', '.join(PACKAGES)}")
    for name in PACKAGES if package == "auto" else (package,):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "AutoAttack"):
            return mod, name, _version(mod, name)
    raise ImportError("AutoAttack is not installed: pip install pyautoattack, or "
                      "pip install git+https://github.com/fra31/auto-attack")


def _version(mod: ModuleType, name: str) -> str:
    v = getattr(mod, "__version__", None)
    if v:
        return str(v)
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "unknown"


def _build(mod: ModuleType, model: nn.Module, norm: str, eps: float, version: str, attacks: list[str] | None,
           seed: int | None, device: torch.device) -> Any:
    """Construct ``mod.AutoAttack`` through whichever signature it has."""
    params = inspect.signature(mod.AutoAttack).parameters
    kw: dict[str, Any] = {"norm": norm, "eps": eps, "version": version, "seed": seed, "device": device}
    if "verbose" in params:
        kw["verbose"] = True                     # its messages reach our sink, never our stdout
    if "log_path" in params:
        kw["log_path"] = None                    # upstream's Logger then prints: captured like the rest
    if version == "custom":
        kw["attacks_to_run" if "attacks_to_run" in params else "attacks"] = list(attacks or [])
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kw = {k: v for k, v in kw.items() if k in params}
    return mod.AutoAttack(model, **kw)


def _run_one(aa: Any, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One ``run_standard_evaluation`` call; ``(x_adv, labels or None)``."""
    params = inspect.signature(aa.run_standard_evaluation).parameters
    kw: dict[str, Any] = {"bs" if "bs" in params else "batch_size": batch_size}
    if "return_labels" in params:
        kw["return_labels"] = True
    out = aa.run_standard_evaluation(x, y, **kw)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


def _set_override(aa: Any, key: str, value: Any) -> None:
    """``"apgd.n_iter": 10`` sets ``aa.apgd.n_iter`` (and APGD's derived checkpoint lengths)."""
    head, _, attr = key.rpartition(".")
    obj = getattr(aa, head, None) if head else aa
    if obj is None or not hasattr(obj, attr):
        raise ValueError(f"unknown AutoAttack override {key!r} (e.g. 'apgd.n_iter', 'square.n_queries', "
                         "'apgd_targeted.n_target_classes', 'fab.n_iter')")
    setattr(obj, attr, value)
    if attr == "n_iter" and hasattr(obj, "n_iter_2"):       # APGD derives these in __init__
        obj.n_iter_orig = value
        obj.n_iter_2, obj.n_iter_min = max(int(0.22 * value), 1), max(int(0.06 * value), 1)
        obj.size_decr = max(int(0.03 * value), 1)


# -- output capture ---------------------------------------------------------------------------
class _Tee(io.TextIOBase):
    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)


@contextlib.contextmanager
def _captured(sink: TextIO, verbose: bool) -> Iterator[None]:
    """Route the package's prints, ``auto-attack`` logger and warnings to ``sink``; restore the RNG."""
    stream: TextIO = _Tee(sink, sys.stdout) if verbose else sink  # type: ignore[assignment]
    logger = logging.getLogger("auto-attack")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    saved = (logger.level, logger.propagate)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        with contextlib.redirect_stdout(stream), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for w in caught:
            stream.write(f"WARNING {w.category.__name__}: {w.message}\n")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


# -- resume state ---------------------------------------------------------------------------
def _fingerprint(x: torch.Tensor, y: torch.Tensor, cfg: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
    h.update(x.detach().cpu().float().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _save_state(path: Path, fp: str, done: list[str], broken_by: list[str | None], robust_after: dict[str, float],
                attack_seconds: dict[str, float], x_adv: torch.Tensor, robust: torch.Tensor) -> None:
    from safetensors.torch import save_file

    idx = (~robust).nonzero().squeeze(1).cpu()
    tensors = {"index": idx.contiguous(), "x_adv": x_adv[idx.to(x_adv.device)].detach().cpu().contiguous()}
    atomic_write(path.with_suffix(".safetensors"), lambda tmp: save_file(tensors, tmp))
    atomic_write_json(path, {"format": STATE_FORMAT, "fingerprint": fp, "done": done, "broken_by": broken_by,
                             "robust_after": robust_after, "attack_seconds": attack_seconds})


def _load_state(path: Path, fp: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        state = json.loads(path.read_text())
        tensors = load_file(str(path.with_suffix(".safetensors")))
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: unreadable AutoAttack state ({e}); delete it to start over") from None
    if state.get("format") != STATE_FORMAT or state.get("fingerprint") != fp:
        raise ValueError(f"{path}: state was written for other inputs or settings "
                         "(different x, y, norm, eps, version, attacks, seed or package); delete it or pick another")
    state["tensors"] = tensors
    return state


# -- the adapter ----------------------------------------------------------------------------
def _check_config(norm: str, eps: float | str, version: str, attacks: Sequence[str] | None
                  ) -> tuple[str, float, str, list[str] | None]:
    key = str(norm).lower().replace("-", "").replace("_", "")
    key = {"inf": "linf", "l∞": "linf"}.get(key, key)
    if key not in NORMS:
        raise ValueError(f"unknown norm {norm!r} for AutoAttack; allowed: {', '.join(NORMS)}")
    if version not in VERSIONS:
        raise ValueError(f"unknown AutoAttack version {version!r}; allowed: {', '.join(VERSIONS)}")
    if attacks is not None:
        attacks = [str(a).lower() for a in attacks]
        bad = [a for a in attacks if a not in ATTACK_NAMES]
        if bad or not attacks:
            raise ValueError(f"unknown AutoAttack attacks {bad or attacks!r}; allowed: {', '.join(ATTACK_NAMES)}")
        if version in ("plus", "rand"):
            raise ValueError(f"version {version!r} fixes its attacks; use version='custom' with attacks=[...]")
        version = "custom"
    elif version == "custom":
        raise ValueError(f"version='custom' needs attacks=[...] from {', '.join(ATTACK_NAMES)}")
    return NORMS[key], parse_eps(eps), version, attacks


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = [model(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long, device=x.device)


def run_autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | str, norm: str = "linf",
                   version: str = "standard", attacks: Sequence[str] | None = None, batch_size: int = 250,
                   seed: int | None = 0, out_dir: str | Path | None = None, log_path: str | Path | None = None,
                   state_path: str | Path | None = None, verbose: bool = False, package: str = "auto",
                   overrides: dict[str, Any] | None = None) -> AutoAttackResult:
    """Run AutoAttack on ``x (N, C, H, W)`` in ``[0, 1]``, ``y (N,)``, per attack in sequence.

    ``overrides`` sets attributes of the package's attack objects after the version is applied,
    e.g. ``{"apgd.n_iter": 10, "square.n_queries": 100}`` (for quick runs; defaults are the paper's).
    Raises ``ValueError`` for unknown norm / version / attack names and bad inputs.
    """
    pkg_norm, eps_f, version, attacks = _check_config(norm, eps, version, attacks)
    check_inputs(x, y, num_classes_of(model))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mod, pkg_name, pkg_version = find_package(package)
    y = y.to(device=x.device, dtype=torch.long)
    if log_path is None and out_dir is not None:
        log_path = Path(out_dir) / "autoattack.log"
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sink: TextIO = open(log_path, "a", buffering=1) if log_path is not None else io.StringIO()  # noqa: SIM115
    t0 = time.perf_counter()
    try:
        with eval_mode(model), _captured(sink, verbose):
            aa = _build(mod, model, pkg_norm, eps_f, version, attacks, seed, x.device)
            for key, value in (overrides or {}).items():
                _set_override(aa, key, value)
            order = list(aa.attacks_to_run)
            cfg = {"norm": pkg_norm, "eps": eps_f, "version": version, "attacks": order, "seed": seed,
                   "package": pkg_name, "package_version": pkg_version, "overrides": overrides or {}}
            sink.write(f"robustkit: AutoAttack via {pkg_name} {pkg_version}: {cfg}\n")
            fp = _fingerprint(x, y, cfg)
            x_adv, robust, broken_by, robust_after, seconds, resumed = _sequence(
                aa, model, x, y, order, batch_size, Path(state_path) if state_path else None, fp, sink)
    finally:
        log_text = sink.getvalue() if isinstance(sink, io.StringIO) else ""
        sink.close()
    n = max(x.shape[0], 1)
    clean_correct = torch.tensor([b != "clean" for b in broken_by], dtype=torch.bool, device=x.device)
    return AutoAttackResult(
        x_adv=x_adv, robust=robust, clean_correct=clean_correct, broken_by=broken_by,
        robust_accuracy=float(robust.sum()) / n, clean_accuracy=float(clean_correct.sum()) / n,
        robust_after=robust_after, attack_seconds=seconds, attacks=order, version=version, norm=pkg_norm,
        eps=eps_f, package=pkg_name, package_version=pkg_version, seconds=time.perf_counter() - t0,
        log_path=str(log_path) if log_path is not None else None, resumed=resumed, log_text=log_text)


def _sequence(aa: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, order: list[str], batch_size: int,
              state_path: Path | None, fp: str, sink: TextIO
              ) -> tuple[torch.Tensor, torch.Tensor, list[str | None], dict[str, float], dict[str, float], list[str]]:
    """The attacks one at a time, each on the still-robust points; checkpoint after each."""
    n = max(x.shape[0], 1)
    x_adv = x.detach().clone()
    state = _load_state(state_path, fp) if state_path is not None else None
    if state is not None:
        broken_by: list[str | None] = list(state["broken_by"])
        robust_after, seconds, done = dict(state["robust_after"]), dict(state["attack_seconds"]), list(state["done"])
        idx = state["tensors"]["index"].to(x.device)
        x_adv[idx] = state["tensors"]["x_adv"].to(x.device, x.dtype)
        sink.write(f"robustkit: resumed from {state_path}; done: {', '.join(done) or '(clean pass)'}\n")
    else:
        correct = _predict(model, x, batch_size) == y                  # (N,)
        broken_by = [None if c else "clean" for c in correct.tolist()]
        robust_after, seconds, done = {"clean": float(correct.sum()) / n}, {}, []
    resumed = list(done)
    robust = torch.tensor([b is None for b in broken_by], dtype=torch.bool, device=x.device)
    if state_path is not None and state is None:
        _save_state(state_path, fp, done, broken_by, robust_after, seconds, x_adv, robust)
    for name in order:
        if name in done:
            continue
        t = time.perf_counter()
        idx = robust.nonzero().squeeze(1)                              # (M,) still robust
        if idx.numel():
            aa.attacks_to_run = [name]
            adv, labels = _run_one(aa, x[idx], y[idx], batch_size)     # (M, C, H, W), (M,) | None
            adv = adv.to(x.device, x.dtype)
            labels = _predict(model, adv, batch_size) if labels is None else labels.to(x.device)
            hit = labels != y[idx]                                     # (M,)
            x_adv[idx[hit]] = adv[hit]
            robust[idx[hit]] = False
            for i in idx[hit].tolist():
                broken_by[i] = name
        seconds[name] = time.perf_counter() - t
        robust_after[name] = float(robust.sum()) / n
        done.append(name)
        sink.write(f"robustkit: after {name}: robust accuracy {robust_after[name]:.2%} ({seconds[name]:.1f} s)\n")
        if state_path is not None:
            _save_state(state_path, fp, done, broken_by, robust_after, seconds, x_adv, robust)
    aa.attacks_to_run = order
    return x_adv, robust, broken_by, robust_after, seconds, resumed


@ATTACKS.register("autoattack", help="AutoAttack (Croce & Hein 2020) via the autoattack / pyautoattack package")
class AutoAttackAttack(Attack):
    """The real AutoAttack as an ``Attack`` (untargeted), for the attack CLI and evaluation.

    Args (keyword-only): ``norm`` (``linf``/``l2``/``l1``), ``eps``, ``version``
    (``standard``, ``plus``, ``rand``, ``custom``), ``attacks`` (a custom list), ``batch_size``,
    ``seed`` (0), ``log_dir`` (the package's output goes to ``log_dir/autoattack.log``; else
    discarded), ``verbose``, ``package`` (``auto``), ``overrides`` (see ``run_autoattack``).

    Returns ``AttackResult``: ``success = ~robust``; ``queries`` are not counted by AutoAttack
    (zeros; ``info["queries_counted"] = False``); ``info`` holds ``broken_by`` and the summary.
    """

    name = "autoattack"

    def __init__(self, *, norm: str = "linf", eps: float | str = 8 / 255, version: str = "standard",
                 attacks: Sequence[str] | None = None, batch_size: int = 250, seed: int | None = 0,
                 log_dir: str | None = None, verbose: bool = False, package: str = "auto",
                 overrides: dict[str, Any] | None = None) -> None:
        pkg_norm, eps_f, version, attack_list = _check_config(norm, eps, version, attacks)
        if package != "auto" and package not in PACKAGES:
            raise ValueError(f"unknown AutoAttack package {package!r}; allowed: auto, {', '.join(PACKAGES)}")
        self.norm, self.eps, self.version = pkg_norm.lower(), eps_f, version
        self.attacks = attack_list
        self.batch_size, self.seed, self.log_dir, self.verbose = batch_size, seed, log_dir, verbose
        self.package, self.overrides = package, dict(overrides or {})

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> AttackResult:
        r = run_autoattack(model, x, y, eps=self.eps, norm=self.norm, version=self.version, attacks=self.attacks,
                           batch_size=self.batch_size, seed=self.seed, out_dir=self.log_dir, verbose=self.verbose,
                           package=self.package, overrides=self.overrides)
        return AttackResult(r.x_adv, ~r.robust, torch.zeros(x.shape[0], dtype=torch.long, device=x.device),
                            {"broken_by": r.broken_by, "queries_counted": False, **r.summary()})
