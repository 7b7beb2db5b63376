"""``robustkit datasets``: list the registered datasets."""

from __future__ import annotations

import argparse

from robustkit.registry import DATASETS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datasets", help="list datasets")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import robustkit.data  # noqa: F401

    width = max(len(n) for n in DATASETS.names())
    for name in DATASETS.names():
        print(f"{name:<{width}}  {DATASETS.help(name)}")
    print(f"{'imagefolder:PATH':<{width}}  PATH/train/<class>/*, PATH/test/<class>/* (one image size)")
    return 0
