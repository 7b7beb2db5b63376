"""Speed and strength benchmarks against peer libraries and the bare forward/backward limit.

Run each one as a module from the repository root, e.g. ``python -m benchmarks.attacks --quick``
(``make bench`` runs all of them, ``make bench-quick`` all with ``--quick``). As modules, the
top-level packages ``attacks``, ``certify`` and ``defenses`` resolve to the project's packages,
never to the benchmark files of the same names. Results are JSON files under
``benchmarks/results/`` (git-ignored); trained models are cached in ``benchmarks/results/cache/``.
"""

MODULES = ("attacks", "bo_attack", "certify", "corruptions", "defense_table", "defenses", "fast_vs_autoattack", "ibp",
           "lipschitz", "sharding", "training")
