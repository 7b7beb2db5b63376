"""robustkit defenses. Importing this package registers every objective in ``DEFENSES``."""

import importlib

from defenses.base import Defense, StepContext

_MODULES = ["standard", "pgd_at", "trades", "mart", "noise", "ibp", "weight_perturbation"]

for _m in _MODULES:
    try:
        importlib.import_module(f"defenses.{_m}")
    except ModuleNotFoundError as _e:  # a module not written yet; anything else is a real error
        if _e.name != f"defenses.{_m}":
            raise

__all__ = ["Defense", "StepContext"]
