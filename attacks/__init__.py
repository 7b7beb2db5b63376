"""robustkit attacks. Importing this package registers every attack in ``ATTACKS``."""

import importlib

from attacks.base import Attack, AttackResult, check_inputs, eval_mode

_MODULES = ["pgd", "deepfool", "bo_hard_label", "apgd", "fast"]

for _m in _MODULES:
    try:
        importlib.import_module(f"attacks.{_m}")
    except ModuleNotFoundError as _e:  # a module not written yet; anything else is a real error
        if _e.name != f"attacks.{_m}":
            raise

import robustkit.autoattack  # noqa: E402,F401  (registers the real AutoAttack as attack "autoattack")

__all__ = ["Attack", "AttackResult", "check_inputs", "eval_mode"]


def __getattr__(name: str):  # attacks.PGD, attacks.DeepFool, ... resolved lazily from the registry modules
    for _m in _MODULES:
        mod = importlib.import_module("sys").modules.get(f"attacks.{_m}")
        if mod is not None and hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"module 'attacks' has no attribute {name!r}")
