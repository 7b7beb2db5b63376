"""robustkit attacks. Importing this package registers every attack in ``ATTACKS``."""

from attacks.base import Attack, AttackResult, check_inputs, eval_mode

__all__ = ["Attack", "AttackResult", "check_inputs", "eval_mode"]
