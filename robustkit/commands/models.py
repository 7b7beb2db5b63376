"""``robustkit models``: list the built-in models (and how to name timm / torchvision ones)."""

from __future__ import annotations

import argparse

from robustkit.commands._common import print_registry


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("models", help="list built-in models").set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import robustkit.nets  # noqa: F401
    from robustkit.registry import MODELS

    print_registry(MODELS, "\nAlso: any timm model name (e.g. resnet18, vit_tiny_patch16_224) and tv:NAME for "
                           "torchvision (e.g. tv:resnet18); your own nn.Module class as package.module:ClassName "
                           "(--arch mynets:Net --arch-kwargs JSON, importable from PYTHONPATH).")
    return 0
