"""``robustkit train``: train a model with a defense objective (from scratch or from ``--model``).

    robustkit train --config configs/X.yaml --defense trades --out runs/NAME [--set key=value ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from robustkit.commands._common import add_common, setup
from robustkit.commands._train_args import add_train_args, check_pretrained, config_from_args, materialize_pretrained


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with a defense objective (standard, pgd-at, trades, mart, "
                                     "noise, ibp; optional AWP / RWP)")
    add_train_args(p)
    add_common(p)
    p.set_defaults(func=run, seed=None)


def run(args: argparse.Namespace) -> int:
    from robustkit.app.train import train

    if args.model and not Path(args.model).exists() and args.arch is None and _is_arch(args.model):
        args.arch, args.model = args.model, None  # `train --model ibp-small`: an architecture to train from scratch
    cfg = config_from_args(args)
    check_pretrained(cfg.model.pretrained)
    device = setup(args)
    materialize_pretrained(cfg, args.out)
    run_dir = train(cfg, args.out, device, resume=args.resume)
    final = run_dir.metrics()[-1] if run_dir.metrics() else {}
    accs = ", ".join(f"{k} {final[k]:.4f}" for k in ("clean_accuracy", "robust_accuracy") if k in final)
    print(f"trained {cfg.model.arch or cfg.model.pretrained} with {cfg.defense.name} for {cfg.epochs} epochs"
          f"{': ' + accs if accs else ''}. Run: {run_dir.path}")
    return 0


def _is_arch(name: str) -> bool:
    """A built-in, ``tv:`` or timm architecture name (not a file)."""
    import robustkit.nets  # noqa: F401
    from robustkit.registry import MODELS

    if name in MODELS or name.startswith("tv:"):
        return True
    import timm

    return timm.is_model(name)
