"""``robustkit eval --model RUN``: clean accuracy of a trained model on a dataset split."""

from __future__ import annotations

import argparse
from pathlib import Path

from robustkit.app.eval import run_eval
from robustkit.commands._common import add_common, add_data, setup


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="clean accuracy of a model")
    p.add_argument("--model", required=True, help="run directory or model directory")
    add_data(p)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--n", type=int, default=None, help="first N images (default: all)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--out", default=None, help="write results.json + report.md here")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    r = run_eval(args.model, args.dataset, args.split, n=args.n, batch_size=args.batch_size, out=args.out,
                 device=setup(args), data_root=args.data_root, download=args.download)
    print(f"clean accuracy {r['clean_accuracy']:.4f} on {r['n']} {args.dataset}/{args.split} images")
    if args.out:
        print(f"results: {Path(args.out) / 'results.json'}")
    return 0
