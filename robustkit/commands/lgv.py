"""``robustkit lgv --model RUN --out DIR``: collect LGV surrogates (Gubri et al., ECCV 2022).

    robustkit lgv --model runs/standard --out runs/lgv-standard
    robustkit lgv --model runs/standard --out runs/lgv --epochs 2 --per-epoch 2 --lr 0.05

From a trained model, trains more epochs of cross-entropy SGD at a constant, high learning rate
(the project's Trainer) and saves per_epoch weight snapshots per epoch as model directories
DIR/lgv-00, ... plus DIR/collection.json. Attack the collection with the "lgv" attack (one
snapshot per iteration); the benchmark's transfer matrix takes DIR as an extra source
(--set transfer.sources=[DIR]). Defaults are the paper's: 10 epochs, lr 0.05, 4 per epoch.
"""

from __future__ import annotations

import argparse

from robustkit.commands._common import add_common, add_data, setup


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lgv", help="collect LGV surrogates: weight snapshots along a constant high-LR SGD run",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run or model directory of the trained source model")
    p.add_argument("--out", required=True, help="output directory of the collection")
    add_data(p)
    p.add_argument("--epochs", type=int, default=10, help="epochs of collection (default 10)")
    p.add_argument("--lr", type=float, default=0.05, help="constant SGD learning rate (default 0.05)")
    p.add_argument("--per-epoch", type=int, default=4, help="snapshots per epoch (default 4)")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay (default 1e-4)")
    p.add_argument("--batch-size", type=int, default=256, help="training batch size (default 256)")
    p.add_argument("--n-train", type=int, default=None, help="first N training images (default: all)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from robustkit.app.lgv import collect_lgv

    rec = collect_lgv(args.model, args.out, dataset=args.dataset, epochs=args.epochs, lr=args.lr,
                      per_epoch=args.per_epoch, momentum=args.momentum, weight_decay=args.weight_decay,
                      batch_size=args.batch_size, n_train=args.n_train, seed=args.seed, data_root=args.data_root,
                      download=args.download, device=setup(args))
    print(f"collected {len(rec['members'])} LGV snapshots at constant lr {rec['settings']['lr']:g} into {args.out} "
          f"({args.out}/collection.json)")
    return 0
