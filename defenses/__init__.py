"""robustkit defenses. Importing this package registers every objective in ``DEFENSES``."""

from defenses.adr import ADR
from defenses.amp import AMP
from defenses.arow import ARoW
from defenses.base import Defense, StepContext
from defenses.dafa import DAFA
from defenses.denoiser import DenoiserMSE, DenoiserStab
from defenses.dr_reweight import DoublyRobust
from defenses.emma import EMMA
from defenses.fast_at import FastAT
from defenses.ibp import IBPTraining
from defenses.mart import MART
from defenses.mixing import AdaptiveSmoothing
from defenses.noise import GaussianNoise
from defenses.pgd_at import PGDAT
from defenses.sam import SAM
from defenses.score import SCORE
from defenses.standard import Standard
from defenses.trades import TRADES
from defenses.weight_perturbation import AWP, RWP

__all__ = ["ADR", "AdaptiveSmoothing", "AMP", "ARoW", "DAFA", "DoublyRobust", "EMMA", "FastAT", "SCORE",
           "AWP", "MART", "PGDAT", "RWP", "SAM", "TRADES", "Defense", "GaussianNoise", "IBPTraining",
           "Standard", "StepContext"]
__all__ += ["DenoiserMSE", "DenoiserStab"]
