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

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from attacks._autoattack_pkg import PACKAGES, build, captured, find_package, run_one, set_override
from attacks._autoattack_state import fingerprint, load_state, save_state
from attacks.base import Attack, AttackResult, check_inputs, eval_mode, num_classes_of
from robustkit.errors import InputError
from robustkit.registry import ATTACKS
from robustkit.threat import parse_eps, parse_norm
from robustkit.validate import integer, one_of

__all__ = ["ATTACK_NAMES", "PACKAGES", "VERSIONS", "AutoAttackAttack", "AutoAttackResult", "find_package",
           "run_autoattack"]

VERSIONS = ("standard", "plus", "rand", "custom")
ATTACK_NAMES = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
NORMS = {"linf": "Linf", "l2": "L2", "l1": "L1"}


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


# -- the adapter ----------------------------------------------------------------------------
def _check_config(norm: str, eps: float | str, version: str, attacks: Sequence[str] | None
                  ) -> tuple[str, float, str, list[str] | None]:
    key = parse_norm(norm, tuple(NORMS))
    version = one_of("AutoAttack version", version, VERSIONS)
    if attacks is not None:
        attacks = [str(a).lower() for a in attacks]
        bad = [a for a in attacks if a not in ATTACK_NAMES]
        if bad or not attacks:
            raise InputError(f"unknown AutoAttack attacks {bad or attacks!r}; allowed: {', '.join(ATTACK_NAMES)}")
        if version in ("plus", "rand"):
            raise InputError(f"version {version!r} fixes its attacks; use version='custom' with attacks=[...]")
        version = "custom"
    elif version == "custom":
        raise InputError(f"version='custom' needs attacks=[...] from {', '.join(ATTACK_NAMES)}")
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
    Raises ``InputError`` (a ``ValueError``) for unknown norm / version / attack names and bad inputs.
    """
    pkg_norm, eps_f, version, attacks = _check_config(norm, eps, version, attacks)
    check_inputs(x, y, num_classes_of(model))
    integer("batch_size", batch_size, 1)
    mod, pkg_name, pkg_version = find_package(package)
    y = y.to(device=x.device, dtype=torch.long)
    if log_path is None and out_dir is not None:
        log_path = Path(out_dir) / "autoattack.log"
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    sink: TextIO = open(log_path, "a", buffering=1) if log_path is not None else io.StringIO()  # noqa: SIM115
    t0 = time.perf_counter()
    try:
        with eval_mode(model), captured(sink, verbose):
            aa = build(mod, model, pkg_norm, eps_f, version, attacks, seed, x.device)
            for key, value in (overrides or {}).items():
                set_override(aa, key, value)
            order = list(aa.attacks_to_run)
            cfg = {"norm": pkg_norm, "eps": eps_f, "version": version, "attacks": order, "seed": seed,
                   "package": pkg_name, "package_version": pkg_version, "overrides": overrides or {}}
            sink.write(f"robustkit: AutoAttack via {pkg_name} {pkg_version}: {cfg}\n")
            fp = fingerprint(x, y, cfg)
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
    state = load_state(state_path, fp) if state_path is not None else None
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
        save_state(state_path, fp, done, broken_by, robust_after, seconds, x_adv, robust)
    for name in order:
        if name in done:
            continue
        t = time.perf_counter()
        idx = robust.nonzero().squeeze(1)                              # (M,) still robust
        if idx.numel():
            aa.attacks_to_run = [name]
            adv, labels = run_one(aa, x[idx], y[idx], batch_size)     # (M, C, H, W), (M,) | None
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
            save_state(state_path, fp, done, broken_by, robust_after, seconds, x_adv, robust)
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
        package = one_of("AutoAttack package", package, ("auto", *PACKAGES))
        integer("batch_size", batch_size, 1)
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
