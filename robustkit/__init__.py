"""robustkit: adversarial robustness on PyTorch.

Pixel space everywhere: images are ``(B, C, H, W)`` floats in ``[0, 1]``; the
model's first layer normalizes.
"""

import robustkit.composite  # noqa: F401  (registers the composite nets: dual-subimage, denoised)
from robustkit.registry import ATTACKS, CERTIFIERS, DATASETS, DEFENSES, MODELS
from robustkit.threat import ThreatModel, parse_eps
from robustkit.zoo import RobustModel, create, load, save, wrap

__all__ = ["ATTACKS", "CERTIFIERS", "DATASETS", "DEFENSES", "MODELS", "RobustModel", "ThreatModel",
           "create", "load", "parse_eps", "save", "wrap"]
__version__ = "0.1.0"
