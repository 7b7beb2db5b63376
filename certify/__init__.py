"""robustkit certifiers. Importing this package registers them in ``CERTIFIERS``."""

from certify.base import Certificate
from certify.ibp import UnsupportedLayerError, certified_radius, interval_bounds, margin_bounds
from certify.smoothing import Smooth
from certify.stats import CheckpointCS, binom_test, clopper_pearson_lower, clopper_pearson_upper

__all__ = ["Certificate", "CheckpointCS", "Smooth", "UnsupportedLayerError", "binom_test", "certified_radius",
           "clopper_pearson_lower", "clopper_pearson_upper", "interval_bounds", "margin_bounds"]
