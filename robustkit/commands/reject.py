"""``robustkit reject``: selective classification with CPR rejection (Chen et al. 2023) and its stratified
robust accuracy with rejection.

    robustkit reject --model runs/trades --eps 0.3 --preset mnist --n 200 --out out/cpr
    robustkit reject --model runs/trades --eps 8/255 --preset cifar10 --attack pgd,autoattack --out out/cpr

A point is rejected when CPR's inner attack (radius ``--eps-rej``) flips its prediction. Outer attacks
(``--attack`` on the base model + a BPDA attack through CPR) look for accepted misclassified points in the
``eps``-ball, inner attacks for rejected points in each ``alpha * eps``-ball; the robust accuracy with rejection
per alpha is written to OUT/results.json, OUT/report.md and OUT/plots/robustness_curve.png.
"""

from __future__ import annotations

import argparse

from robustkit.commands._common import add_common, add_data, setup
from robustkit.commands._config import param_overrides


def _floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reject", help="CPR rejection (Chen et al. 2023): robust accuracy with rejection curve",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="run directory or model directory")
    add_data(p)
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--norm", default="linf", help="linf (the paper's) | l2")
    p.add_argument("--eps", required=True, help="attack budget, e.g. 0.3 or 8/255")
    p.add_argument("--preset", default="mnist", help="CPR's defaults: mnist (eps_rej 0.1, 20 steps of 0.01) | "
                   "cifar10 (0.0055, 10 steps of 0.001) | none")
    p.add_argument("--eps-rej", help="CPR's rejection radius (default: the preset's)")
    p.add_argument("--rej-steps", type=int, help="CPR's inner attack steps (default: the preset's)")
    p.add_argument("--rej-step-size", type=float, help="CPR's inner attack step (default: the preset's)")
    p.add_argument("--alphas", type=_floats, default=None, help="comma-separated alphas in [0, 1] (default: the "
                   "paper's 0,0.01,0.05,0.1,0.15,0.2,0.25,0.3,0.5,1)")
    p.add_argument("--attack", default="pgd", help="outer attacks on the base model, comma-separated (default pgd)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="keyword argument of the "
                   "outer attacks (repeatable)")
    p.add_argument("--steps", type=int, default=20, help="steps of the BPDA outer and inner attacks (default 20)")
    p.add_argument("--restarts", type=int, default=1, help="restarts of the BPDA attacks (default 1)")
    p.add_argument("--targets", type=int, default=None, help="target classes of the BPDA outer attack (default: "
                   "every wrong class, as the paper; 0: untargeted only)")
    p.add_argument("--n", type=int, default=100, help="first N images (default 100)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--out", default=None, help="write results.json, report.md, plots/ here")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from robustkit._config_io import apply_overrides
    from robustkit.app.reject import ALPHAS, run_reject, summary_lines

    preset = None if str(args.preset).lower() in ("none", "") else args.preset
    res = run_reject(args.model, args.dataset, eps=args.eps, norm=args.norm, preset=preset, eps_rej=args.eps_rej,
                     rej_steps=args.rej_steps, rej_step_size=args.rej_step_size, alphas=args.alphas or ALPHAS,
                     attack=[a.strip() for a in args.attack.split(",") if a.strip()],
                     attack_params=apply_overrides({}, param_overrides(args.param, "p")).get("p"), steps=args.steps,
                     restarts=args.restarts, targets=args.targets, split=args.split, n=args.n,
                     batch_size=args.batch_size, out=args.out,
                     device=setup(args), seed=args.seed, data_root=args.data_root, download=args.download)
    for line in summary_lines(res):
        print(line)
    if args.out:
        print(f"results: {args.out}/results.json")
    return 0
