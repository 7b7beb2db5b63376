"""``robustkit datasets``: list the registered datasets."""

from __future__ import annotations

import argparse

from robustkit.commands._common import print_registry


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("datasets", help="list datasets").set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import robustkit.data  # noqa: F401
    from robustkit.registry import DATASETS

    print_registry(DATASETS, "imagefolder:PATH  PATH/train/<class>/*, PATH/test/<class>/* (one image size)")
    return 0
