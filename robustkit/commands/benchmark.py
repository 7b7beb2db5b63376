"""``robustkit benchmark``: a RobustBench-style leaderboard of several models.

    robustkit benchmark --models runs/standard runs/trades --dataset mnist5k --norm linf --eps 0.3 --n 1000 \\
                        --attacks autoattack,pgd,deepfool --certify ibp --out runs/bench
    robustkit benchmark --models runs/noise --norm l2 --eps 0.5 --attacks fast,pgd --certify smoothing --out DIR
    robustkit benchmark ... --param pgd.steps=20 --param autoattack.attacks=[apgd-ce,apgd-t]

Per model: clean accuracy, each attack's robust accuracy (each attack on every clean-correct
point), the worst case over all attacks per point, AutoAttack's per-point breakdown, certified
accuracy (IBP at eps for L-inf; randomized smoothing of the smoothed classifier, L2) and the
seconds for each. Writes ``results.json``, ``report.md``, ``plots/*.png`` and ``models/<name>.json``
to ``--out``; a rerun reuses every ``models/<name>.json`` made with the same settings and weights.
Exit status 3 (after writing everything) if an attack broke a point that a deterministic
certifier (IBP) certified at eps.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from robustkit.commands._common import add_common, add_data, setup


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="leaderboard: clean / AutoAttack / our attacks / certified accuracy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, metavar="RUN", help="run or model directories")
    add_data(p)
    p.add_argument("--norm", default="linf", help="linf | l2 (default linf)")
    p.add_argument("--eps", default="0.3", help="threat-model radius, e.g. 0.3 or 8/255 (default 0.3)")
    p.add_argument("--n", type=int, default=1000, help="first N test images (default 1000)")
    p.add_argument("--attacks", default="autoattack,pgd,deepfool",
                   help="comma-separated registered attacks (default autoattack,pgd,deepfool; 'fast' is our "
                        "fast AutoAttack-like ensemble)")
    p.add_argument("--param", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="attack keyword override (repeatable), e.g. pgd.steps=20, autoattack.version=plus")
    p.add_argument("--certify", default="", help="comma-separated: ibp, crown-ibp (L-inf, at eps), smoothing (L2)")
    p.add_argument("--sigma", type=float, default=None,
                   help="smoothing noise level (default: the run's noise-defense sigma)")
    p.add_argument("--smooth-n", type=int, default=10_000, help="smoothing estimation samples (default 10000)")
    p.add_argument("--smooth-n0", type=int, default=100, help="smoothing selection samples (default 100)")
    p.add_argument("--alpha", type=float, default=0.001, help="smoothing failure probability (default 0.001)")
    p.add_argument("--smooth-images", type=int, default=None, help="images certified by smoothing (default "
                                                                     "min(N, 100))")
    p.add_argument("--eps-grid", default=None,
                   help="eps values of the PGD robustness curve, e.g. 0,0.1,0.2,0.3 (default: 5 points up to "
                        "--eps; 'none' skips it)")
    p.add_argument("--batch-size", type=int, default=256, help="images per attack batch (default 256)")
    p.add_argument("--out", default="runs/benchmark", help="output directory (default runs/benchmark)")
    add_common(p)
    p.set_defaults(func=run)


def parse_attack_params(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["pgd.steps=20", ...]`` -> ``{"pgd": {"steps": 20}}`` (values parsed as YAML scalars / lists)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, val = item.partition("=")
        attack, dot, kw = key.strip().partition(".")
        if not sep or not dot or not attack or not kw:
            raise ValueError(f"--param expects ATTACK.KEY=VALUE (e.g. pgd.steps=20), got {item!r}")
        try:
            value = yaml.safe_load(val) if val.strip() else None
        except yaml.YAMLError:
            value = val
        out.setdefault(attack.lower(), {})[kw.replace("-", "_")] = value
    return out


def _grid(text: str | None) -> list[str] | None:
    if text is None:
        return None
    if text.strip().lower() in ("none", ""):
        return []
    return [t.strip() for t in text.split(",") if t.strip()]


def run(args: argparse.Namespace) -> int:
    from robustkit.app.benchmark import SoundnessError, run_benchmark

    device = setup(args)
    smoothing = {"n0": args.smooth_n0, "n": args.smooth_n, "alpha": args.alpha}
    if args.smooth_images is not None:
        smoothing["n_images"] = args.smooth_images
    try:
        res = run_benchmark(args.models, args.out, dataset=args.dataset, norm=args.norm, eps=args.eps, n=args.n,
                            attacks=args.attacks, certify=args.certify, sigma=args.sigma,
                            eps_grid=_grid(args.eps_grid), batch_size=args.batch_size, seed=args.seed,
                            attack_params=parse_attack_params(args.param), smoothing=smoothing, device=device,
                            data_root=args.data_root, download=args.download, progress=True)
    except SoundnessError as e:
        print(f"robustkit: SOUNDNESS ERROR: {e}", file=sys.stderr)
        return 3
    for e in res["models"]:
        aa = f"  AutoAttack {e['autoattack_acc']:.4f}" if "autoattack_acc" in e else ""
        print(f"{e['name']}: clean {e['clean_acc']:.4f}{aa}  worst case {e['robust_acc']:.4f}  "
              + "  ".join(f"{a} {v:.4f}" for a, v in e["attacks"].items() if a != "autoattack"))
    for name, f in res["flags"].items():
        if f.get("weaker_autoattack"):
            print(f"robustkit: warning: {name}: our attacks broke points AutoAttack did not: "
                  + ", ".join(f"{a} {len(v)}" for a, v in f["weaker_autoattack"].items()), file=sys.stderr)
    print(f"results: {args.out}/results.json, report: {args.out}/report.md")
    return 0
