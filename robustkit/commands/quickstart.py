"""``robustkit quickstart``: the whole mission on the embedded mnist5k data (see robustkit.app.quickstart)."""

from __future__ import annotations

import argparse
import sys
import time

from robustkit.commands._common import add_common, setup


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="train, fine-tune, certify and benchmark on the embedded data")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default runs/quickstart)")
    p.add_argument("--full", action="store_true", help="bigger settings (more epochs, images, samples)")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from robustkit.app.quickstart import run_quickstart

    device = setup(args)
    t0 = time.perf_counter()
    report = run_quickstart(args.out, device, full=args.full, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"quickstart finished in {time.perf_counter() - t0:.0f} s. Report: {report}")
    return 0
