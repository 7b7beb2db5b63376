"""The application layer: one pipeline per job (train, attack, certify, benchmark, quickstart).

The only part of ``robustkit`` that imports ``attacks``, ``certify`` and ``defenses``; the CLI
(``robustkit.commands``) maps flags to a typed config and calls one function here.
"""
