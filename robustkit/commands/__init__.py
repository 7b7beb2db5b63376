"""CLI subcommands. Each module defines ``register(subparsers)`` which adds its parser
and sets ``func=run``; ``robustkit.cli`` imports the modules listed in ``COMMANDS``."""

COMMANDS = ["models", "datasets", "train", "eval", "attack", "finetune", "certify", "benchmark", "quickstart",
            "corruptions", "mix", "reject", "lgv"]
