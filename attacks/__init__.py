"""robustkit attacks. Importing this package registers every attack in ``ATTACKS``."""

import attacks.autoattack  # noqa: F401  (registers the real AutoAttack as attack "autoattack")
from attacks.apgd import APGD
from attacks.base import Attack, AttackResult, check_inputs, eval_mode
from attacks.bo_hard_label import BOHardLabel
from attacks.deepfool import DeepFool
from attacks.fast import FastEnsemble
from attacks.lgv import LGV
from attacks.pgd import PGD

__all__ = ["APGD", "Attack", "AttackResult", "BOHardLabel", "DeepFool", "FastEnsemble", "LGV", "PGD", "check_inputs",
           "eval_mode"]
