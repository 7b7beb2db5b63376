"""The AutoAttack packages behind ``attacks.autoattack``: finding the backend (upstream
``autoattack`` or PyPI ``pyautoattack``), building it through whichever signature it has,
one ``run_standard_evaluation`` call, attribute overrides, and routing its output to a log."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import logging
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType
from typing import Any, TextIO

import torch
from torch import nn

from robustkit.errors import InputError, RobustkitError
from robustkit.validate import one_of

PACKAGES = ("autoattack", "pyautoattack")           # preference order


class AutoAttackMissing(RobustkitError, ImportError):
    """No AutoAttack package is installed; the message says how to get one."""


def find_package(package: str = "auto") -> tuple[ModuleType, str, str]:
    """Import the AutoAttack backend: ``(module, name, version)``. ``package``: ``auto`` (upstream
    ``autoattack`` if importable, else ``pyautoattack``) or one of ``PACKAGES``."""
    package = one_of("AutoAttack package", package, ("auto", *PACKAGES))
    for name in PACKAGES if package == "auto" else (package,):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "AutoAttack"):
            return mod, name, _version(mod, name)
    raise AutoAttackMissing("AutoAttack is not installed: pip install pyautoattack, or "
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


def build(mod: ModuleType, model: nn.Module, norm: str, eps: float, version: str, attacks: list[str] | None,
          seed: int | None, device: torch.device) -> Any:
    """Construct ``mod.AutoAttack`` through whichever signature it has (``norm``: ``Linf``/``L2``/``L1``)."""
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


def run_one(aa: Any, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One ``run_standard_evaluation`` call; ``(x_adv, labels or None)``."""
    params = inspect.signature(aa.run_standard_evaluation).parameters
    kw: dict[str, Any] = {"bs" if "bs" in params else "batch_size": batch_size}
    if "return_labels" in params:
        kw["return_labels"] = True
    out = aa.run_standard_evaluation(x, y, **kw)
    if isinstance(out, tuple):
        return out[0], out[1]
    return out, None


def set_override(aa: Any, key: str, value: Any) -> None:
    """``"apgd.n_iter": 10`` sets ``aa.apgd.n_iter`` (and APGD's derived checkpoint lengths)."""
    head, _, attr = key.rpartition(".")
    obj = getattr(aa, head, None) if head else aa
    if obj is None or not hasattr(obj, attr):
        raise InputError(f"unknown AutoAttack override {key!r} (e.g. 'apgd.n_iter', 'square.n_queries', "
                         "'apgd_targeted.n_target_classes', 'fab.n_iter')")
    setattr(obj, attr, value)
    if attr == "n_iter" and hasattr(obj, "n_iter_2"):       # APGD derives these in __init__
        obj.n_iter_orig = value
        obj.n_iter_2, obj.n_iter_min = max(int(0.22 * value), 1), max(int(0.06 * value), 1)
        obj.size_decr = max(int(0.03 * value), 1)


class _Tee(io.TextIOBase):
    def __init__(self, *streams: TextIO) -> None:
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)


@contextlib.contextmanager
def captured(sink: TextIO, verbose: bool) -> Iterator[None]:
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
