"""Arguments and helpers shared by the subcommands."""

from __future__ import annotations

import argparse

from robustkit.device import resolve_device, seed_everything


def add_common(p: argparse.ArgumentParser) -> None:
    """``--device`` and ``--seed``: every command has them."""
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def add_data(p: argparse.ArgumentParser, default: str = "mnist5k") -> None:
    p.add_argument("--dataset", default=default, help=f"dataset name (robustkit datasets); default {default}")
    p.add_argument("--data-root", default=None, help="where torchvision datasets live (default ./data)")
    p.add_argument("--download", action="store_true", help="download torchvision datasets (needs internet)")


def setup(args: argparse.Namespace):  # -> torch.device
    seed_everything(args.seed)
    return resolve_device(args.device)


def print_registry(registry, footer: str = "") -> None:  # registry: robustkit.registry.Registry
    """One line per registered name with its help text, then ``footer``."""
    width = max(len(n) for n in registry.names())
    for name in registry.names():
        print(f"{name:<{width}}  {registry.help(name)}")
    if footer:
        print(footer)
