"""``robustkit models``: list the built-in models (and how to name timm / torchvision ones)."""

from __future__ import annotations

import argparse

from robustkit.registry import MODELS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list built-in models")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import robustkit.nets  # noqa: F401

    width = max(len(n) for n in MODELS.names())
    for name in MODELS.names():
        print(f"{name:<{width}}  {MODELS.help(name)}")
    print("\nAlso: any timm model name (e.g. resnet18, vit_tiny_patch16_224) and tv:NAME for torchvision "
          "(e.g. tv:resnet18).")
    return 0
