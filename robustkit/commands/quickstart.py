"""``robustkit quickstart``: the whole mission -- on the embedded mnist5k data by default, on the full
Fashion-MNIST with ``--full`` (see robustkit.app.quickstart). Under ``torchrun`` only rank 0 prints."""

from __future__ import annotations

import argparse
import sys
import time

from robustkit.commands._common import add_common, setup


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="train, fine-tune, certify and benchmark (embedded data; --full: "
                                          "the full Fashion-MNIST)")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default runs/quickstart)")
    p.add_argument("--full", action="store_true",
                   help="the full-size run on Fashion-MNIST (60,000 / 10,000 images; about 30-40 min on 2 CPU "
                        "cores with torchrun --nproc_per_node=2)")
    p.add_argument("--data-root", default=None,
                   help="with --full: a directory with Fashion-MNIST's IDX files (default: ./data, then the "
                        "Debian package dataset-fashion-mnist)")
    p.add_argument("--plan", action="store_true", help="print the stages and settings, run nothing")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from robustkit.app import shard
    from robustkit.app.quickstart import Settings, plan, run_quickstart
    from robustkit.errors import InputError

    if args.data_root is not None and not args.full:
        raise InputError("--data-root is for --full (the default quickstart runs on the embedded mnist5k data)")
    settings = Settings.full(args.data_root) if args.full else Settings()
    if args.plan:
        print("\n".join(plan(settings, args.out)))
        return 0
    device = setup(args)
    main = shard.world().is_main
    t0 = time.perf_counter()
    report = run_quickstart(args.out, device, log=lambda m: print(m, file=sys.stderr, flush=True),
                            settings=settings)
    if main:
        print(f"quickstart finished in {time.perf_counter() - t0:.0f} s. Report: {report}")
    return 0
