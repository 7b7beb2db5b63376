"""robustkit certifiers. Importing this package registers them in ``CERTIFIERS``
(``smoothing``, ``ibp``, ``crown-ibp``, ...), each following the ``Certifier`` protocol of ``certify.base``."""

from certify.base import Certificate, Certifier, image_seeds
from certify.dual_smoothing import DualSmoothingCertifier
from certify.ibp import (
    CrownIBPCertifier,
    IBPCertifier,
    UnsupportedLayerError,
    certified_radius,
    interval_bounds,
    margin_bounds,
)
from certify.lipschitz import LipschitzCertifier, lipschitz_constant
from certify.smoothing import Smooth, SmoothingCertifier
from certify.stats import CheckpointCS, binom_test, clopper_pearson_lower, clopper_pearson_upper

__all__ = ["Certificate", "Certifier", "CheckpointCS", "CrownIBPCertifier", "IBPCertifier", "Smooth",
           "SmoothingCertifier", "UnsupportedLayerError", "binom_test", "certified_radius", "clopper_pearson_lower",
           "clopper_pearson_upper", "image_seeds", "interval_bounds", "margin_bounds"]
__all__ += ["DualSmoothingCertifier"]
__all__ += ["LipschitzCertifier", "lipschitz_constant"]
