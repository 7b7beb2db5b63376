"""``robustkit attack``: robust accuracy of a model under a registered attack (or a chain).

    robustkit attack --model runs/quick --attack pgd --eps 0.3 --steps 40 --out out/pgd
    robustkit attack --model runs/quick --attack pgd,deepfool --norm l2 --eps 2.0 --out out/chain
    robustkit attack --model runs/quick --attack pgd --eps 0,0.05,0.1,0.2,0.3 --out out/curve
    robustkit attack --model runs/quick --config configs/attack_mnist5k_pgd_linf.yaml --set params.steps=100
    torchrun --nproc_per_node=4 -m robustkit attack --model runs/quick --attack pgd --eps 0.3 --out out/pgd

Flags, ``--param key=value`` and ``--set key=value`` fill an ``AttackConfig``; the dedicated
flags and ``--param`` go to every attack of the chain that accepts them, one no attack accepts
is an error. The chain runs on the evaluation engine (every claimed success verified); see
``robustkit.app.attack`` for what is written to ``--out``. Under torchrun the batches are shared
out over the processes (same per-image results as one process); ``--resume`` computes only the
batches not yet saved under ``OUT/parts``.
"""

from __future__ import annotations

import argparse
import sys

from robustkit.commands._common import add_common, add_data
from robustkit.commands._config import add_config_args, make_config, param_overrides

PARAM_FLAGS = ("steps", "restarts", "loss", "step_size", "targeted", "max_queries")   # -> params.<flag>
FLAGS = ("model", "dataset", "data_root", "download", "split", "attack", "mode", "norm", "eps", "n", "batch_size",
         "amp", "out", "save_adversarials", "seed")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attack", help="robust accuracy under an attack (or a chain), robustness curves",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="run directory or model directory (robustkit.zoo.save)")
    add_data(p)
    p.add_argument("--split", choices=["train", "test"], help="default test")
    p.add_argument("--attack", help="registered attack, or a comma-separated chain (default pgd)")
    p.add_argument("--mode", choices=["chained", "independent"], help="chained (default; AutoAttack-style: "
                   "later attacks only see points still robust) or independent (every attack on every point)")
    p.add_argument("--norm", help="linf | l2 (l1: autoattack)")
    p.add_argument("--eps", help="budget, e.g. 0.3 or 8/255; comma-separated values give a robustness curve")
    p.add_argument("--steps", type=int)
    p.add_argument("--restarts", type=int)
    p.add_argument("--loss", help="ce | dlr | margin (attacks that take a loss)")
    p.add_argument("--step-size", type=float)
    p.add_argument("--targeted", action="store_true", default=None,
                   help="targeted attack; each point gets a seeded wrong class as target")
    p.add_argument("--max-queries", type=int, help="query budget (query-based attacks)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other keyword argument of the attacks (repeatable), e.g. --param overshoot=0.05")
    p.add_argument("--n", type=int, help="first N images (default: all)")
    p.add_argument("--batch-size", type=int, help="default 256")
    p.add_argument("--amp", action="store_true", default=None, help="autocast on CUDA (clean pass, check, attacks)")
    p.add_argument("--out", help="output directory (default: runs/attack-<attack>)")
    p.add_argument("--save-adversarials", action="store_true", default=None,
                   help="write adversarials.safetensors and plots/adversarials.png")
    p.add_argument("--resume", action="store_true",
                   help="compute only the batches not yet saved in OUT/parts (same settings; e.g. after a crash)")
    add_config_args(p, "attack")
    add_common(p)
    p.set_defaults(func=run, dataset=None, download=None, seed=None)


def run(args: argparse.Namespace) -> int:
    from robustkit.app.attack import run_attack
    from robustkit.app.shard import world
    from robustkit.config import AttackConfig
    from robustkit.device import resolve_device

    flags = {**{k: getattr(args, k) for k in FLAGS}, **{f"params.{k}": getattr(args, k) for k in PARAM_FLAGS}}
    cfg = make_config(AttackConfig, args, flags, param_overrides(args.param, "params"))
    res = run_attack(cfg, resolve_device(args.device), log=print,
                     warn=lambda m: print(f"robustkit: warning: {m}", file=sys.stderr), resume=args.resume)
    if world().is_main:
        print(f"results: {res['out']}/results.json")
    return 0
