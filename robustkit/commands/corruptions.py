"""``robustkit corruptions``: accuracy under the 15 common corruptions x 5 severities.

    robustkit corruptions --model runs/quick --dataset fashion-mnist --n 500 --out runs/corr
    robustkit corruptions --model runs/trades --baseline runs/standard --out runs/corr-trades   # + CE / mCE
    robustkit corruptions --model runs/trades --baseline runs/corr-standard/results.json ...     # reuse a run
    robustkit corruptions --model runs/quick --corruptions fog,snow --severities 1,3,5 --out DIR
    robustkit corruptions --config configs/corruptions_fashion_full.yaml --set n=1000
    torchrun --nproc_per_node=2 -m robustkit corruptions --model runs/quick --n 10000 --out DIR [--resume]

The corruptions of Hendrycks & Dietterich (ICLR 2019) with CIFAR-10-C's definitions, applied on
the fly to the first N test images, each image with its own seed (run seed, corruption,
severity, dataset index). Writes OUT/results.json (accuracy per corruption and severity,
corruptions_acc, corruptions_acc_<corruption>, CE / mCE with --baseline), OUT/report.md,
OUT/plots/corruption_accuracy.png (heat map), OUT/model_info.json and
OUT/unaggregated_results.csv (RobustBench's corruption-track formats). Under torchrun the batches
are shared out over the processes; each is saved under OUT/parts when done, and --resume computes
only the missing ones.
"""

from __future__ import annotations

import argparse

FLAGS = ("model", "baseline", "dataset", "data_root", "download", "n", "corruptions", "severities", "batch_size",
         "amp", "seed", "out")


def register(sub: argparse._SubParsersAction) -> None:
    from robustkit.commands._common import add_common, add_data
    from robustkit.commands._config import add_config_args

    p = sub.add_parser("corruptions", help="accuracy under the 15 common corruptions x 5 severities, CE / mCE",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="run directory or model directory")
    p.add_argument("--baseline", help="mCE reference: a run / model directory, or the results.json of an earlier "
                                      "corruptions run on the same dataset, n and seed")
    add_data(p)
    p.add_argument("--n", type=int, help="first N test images (default 1000)")
    p.add_argument("--corruptions", help="all (default) or comma-separated names, e.g. gaussian_noise,fog")
    p.add_argument("--severities", help="comma-separated severities 1..5 (default 1,2,3,4,5)")
    p.add_argument("--batch-size", type=int, help="images corrupted and classified at once (default 250)")
    p.add_argument("--amp", action="store_true", default=None, help="autocast on CUDA")
    p.add_argument("--out", help="output directory (default runs/corruptions)")
    p.add_argument("--resume", action="store_true",
                   help="compute only the batches not yet saved in OUT/parts (same settings and weights)")
    add_config_args(p, "corruptions")
    add_common(p)
    p.set_defaults(func=run, dataset=None, download=None, seed=None)


def run(args: argparse.Namespace) -> int:
    from robustkit._corruptions_config import CorruptionsConfig
    from robustkit.app.corruptions import run_corruptions
    from robustkit.app.shard import world
    from robustkit.commands._config import make_config
    from robustkit.device import resolve_device

    cfg = make_config(CorruptionsConfig, args, {k: getattr(args, k) for k in FLAGS})
    res = run_corruptions(cfg, resolve_device(args.device), log=print, resume=args.resume)
    if world().is_main:
        print(f"results: {res['out']}/results.json, heat map: {res['out']}/plots/corruption_accuracy.png")
    return 0
