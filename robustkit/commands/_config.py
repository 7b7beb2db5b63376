"""``--config FILE`` + flags + ``--set key=value`` -> one typed config (``robustkit.config``).

Precedence, lowest first: the config's defaults, the YAML file, the flags given on the command
line (flags left out change nothing), ``--param`` items, ``--set`` items. ``--param`` and ``--set``
values go through the one override parser, ``robustkit.config.apply_overrides`` (YAML scalars).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from robustkit.config import apply_overrides, from_dict, load_yaml, set_path
from robustkit.errors import ConfigError


def add_config_args(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--config", default=None, metavar="YAML",
                   help=f"recipe, e.g. configs/{command}_*.yaml; flags and --set override its keys")
    p.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="override any config key (repeatable; YAML values), e.g. --set batch_size=128")


def param_overrides(items: list[str], prefix: str, scoped: bool = False) -> list[str]:
    """``--param`` items as overrides under ``prefix``: ``steps=5`` -> ``params.steps=5``; with
    ``scoped``, ``pgd.steps=20`` -> ``attack_params.pgd.steps=20``. Dashes in keys become ``_``."""
    out = []
    for item in items:
        key, sep, val = item.partition("=")
        head, dot, kw = key.strip().partition(".") if scoped else ("", ".", key.strip())
        if not sep or not dot or not kw or (scoped and not head):
            shape = "ATTACK.KEY=VALUE (e.g. pgd.steps=20)" if scoped else "KEY=VALUE (e.g. steps=20)"
            raise ConfigError(f"--param expects {shape}, got {item!r}")
        out.append(f"{prefix}.{head.lower() + '.' if scoped else ''}{kw.replace('-', '_')}={val}")
    return out


def make_config(cls: type, args: argparse.Namespace, flags: Mapping[str, Any], params: list[str] = ()) -> Any:
    """The validated ``cls`` from ``--config``, the given ``flags`` (``{"dotted.key": value}``;
    ``None`` = not given), ``params`` overrides and ``--set``."""
    data = load_yaml(args.config) if args.config else {}
    for dotted, value in flags.items():
        if value is None:
            continue
        set_path(data, dotted, value, what=f"{dotted} (in {args.config})")
    apply_overrides(data, [*params, *args.overrides])
    return from_dict(cls, data)
