"""``robustkit finetune``: adversarial fine-tuning of a pretrained model.

    robustkit finetune --model runs/standard --dataset mnist5k --defense trades \\
        [--weight-perturbation awp|rwp|sam|amp] --schedule slow-start-fast-decay --epochs 5 --lr 0.05 --out runs/ft

Fine-tuning is training that starts from the pretrained weights (``model.pretrained``)
with the slow-start-fast-decay schedule (Jeddi et al. 2020) by default; the weight
perturbation warm-up defaults to 0 epochs here (it exists to skip a random init).
"""

from __future__ import annotations

import argparse

from robustkit.commands._common import add_common, setup
from robustkit.commands._train_args import add_train_args, config_from_args, summary
from robustkit.errors import ConfigError

DEFAULTS = {"schedule": {"name": "slow-start-fast-decay"}, "defense": {"name": "trades"}}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="adversarially fine-tune a pretrained model (TRADES / PGD-AT / MART, "
                                        "optional AWP / RWP, slow-start-fast-decay LR)")
    add_train_args(p)
    add_common(p)
    p.set_defaults(func=run, seed=None)


def run(args: argparse.Namespace) -> int:
    from robustkit.app.shard import world
    from robustkit.app.train import train

    cfg = config_from_args(args, base=DEFAULTS)
    if not cfg.model.pretrained:
        raise ConfigError("finetune needs a pretrained model: --model RUN_DIR | MODEL_DIR | STATE_DICT.pt | NAME "
                          "(or model.pretrained in --config)")
    if cfg.defense.weight_perturbation:
        cfg.defense.wp_params.setdefault("warmup_epochs", 0)
    run_dir = train(cfg, args.out, setup(args), resume=args.resume)
    if world().is_main:                           # under torchrun: rank 0 reports
        print(summary("fine-tuned", cfg, run_dir))
    return 0
