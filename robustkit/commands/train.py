"""``robustkit train``: train a model with a defense objective (from scratch or from ``--model``).

    robustkit train --config configs/X.yaml --defense trades --out runs/NAME [--set key=value ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from robustkit.commands._common import add_common, setup
from robustkit.commands._train_args import add_train_args, config_from_args, summary


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with a defense objective (standard, pgd-at, trades, mart, "
                                     "noise, ibp; optional AWP / RWP)")
    add_train_args(p)
    add_common(p)
    p.set_defaults(func=run, seed=None)


def run(args: argparse.Namespace) -> int:
    from robustkit.app.shard import world
    from robustkit.app.train import train
    from robustkit.zoo import is_arch

    if args.model and not Path(args.model).exists() and args.arch is None and is_arch(args.model):
        args.arch, args.model = args.model, None  # `train --model ibp-small`: an architecture to train from scratch
    cfg = config_from_args(args)
    run_dir = train(cfg, args.out, setup(args), resume=args.resume)
    if world().is_main:                           # under torchrun: rank 0 reports
        print(summary("trained", cfg, run_dir))
    return 0
