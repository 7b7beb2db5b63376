"""``robustkit eval --model RUN``: clean accuracy of a trained model on a dataset split."""

from __future__ import annotations

import argparse
from pathlib import Path

from robustkit.commands._common import add_common, add_data, load_model_arg, setup
from robustkit.data import make_loader
from robustkit.evaluate import clean_accuracy
from robustkit.report import md_table, write_markdown, write_results
from robustkit.zoo import check_compatible


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
    device = setup(args)
    model = load_model_arg(args.model, device)
    loader = make_loader(args.dataset, args.split, batch_size=args.batch_size, n=args.n, data_root=args.data_root,
                         download=args.download, device=device)
    check_compatible(model, loader.info)
    r = clean_accuracy(model, loader, progress=True)
    res = {"model": str(args.model), "arch": model.arch, "dataset": args.dataset, "split": args.split,
           "n": r["n"], "clean_accuracy": r["clean_accuracy"], "seconds": r["seconds"]}
    print(f"clean accuracy {r['clean_accuracy']:.4f} on {r['n']} {args.dataset}/{args.split} images")
    if args.out:
        write_results(args.out, res)
        write_markdown(args.out, f"# Evaluation\n\n{md_table([res])}")
        print(f"results: {Path(args.out) / 'results.json'}")
    return 0
