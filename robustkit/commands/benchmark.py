"""``robustkit benchmark``: a RobustBench-style leaderboard of several models.

    robustkit benchmark --models runs/standard runs/trades --eps 0.3 --certify ibp --out runs/bench
    robustkit benchmark --models runs/noise --norm l2 --eps 0.5 --attacks fast,pgd --certify smoothing --out DIR
    robustkit benchmark --models DIR --config configs/benchmark_cifar10_autoattack_linf.yaml --set n=500
    robustkit benchmark ... --param pgd.steps=20 --param autoattack.attacks=[apgd-ce,apgd-t]
    robustkit benchmark --models runs/trades model_info/cifar10/Linf/Carmon2019Unlabeled.json --dataset cifar10 ...
    robustkit benchmark --models runs/a runs/b --sparsity --transfer-sources runs/lgv-a --out DIR   # see robustkit lgv
    robustkit benchmark --models runs/noise runs/dual --norm l2 --eps 0.5 --certify ibp,smoothing,dual-smoothing
    robustkit benchmark --models runs/trades --reject --set reject.steps=10 --out DIR   # CPR, see robustkit reject

Per model: clean accuracy, each attack's robust accuracy (each attack on every clean-correct
point, every claimed success verified), the worst case per point, AutoAttack's per-point
breakdown, certified accuracy and the seconds for each (see ``robustkit.app.benchmark``). A rerun
reuses every ``models/<name>.json`` made with the same settings and weights. Exit status 3 (after
writing everything) if an attack broke a point that a deterministic certifier certified at eps.

--sparsity adds each model's adversarial sparsity (Olivier & Raj 2023: how constrained a direction
can be and still hold an adversarial example; higher = more robust); --transfer the transfer success
matrix between the models (rows: sources, columns: targets; LGV collections as extra rows with
--transfer-sources): results.json transfer_matrix, a table in report.md, plots/transfer_matrix.png.
--reject adds CPR's robust accuracy with rejection (Chen et al. 2023) at alpha 0 and its curve AUC
(settings as robustkit reject's: --set reject.eps_rej=0.1 --set reject.n_images=50 ...).

Certified accuracy vs radius: plots/certified_accuracy_<norm>.png (.json: the plotted data), one per
norm (L2: lipschitz / ibp on L2 benchmarks, smoothing, dual-smoothing; L-inf: ibp, crown-ibp, lipschitz),
one curve per (model, certifier); dual-smoothing only certifies dual-subimage models (others: n/a).

Every evaluated model is also written as a RobustBench model_info file, robustbench/<name>.json
(autoattack_acc only for standard AutoAttack on the whole test set; otherwise a footnote says what
ran). A .json item of --models is such a file (ours or RobustBench's): its numbers join the
leaderboard as "reported, not evaluated here"; another dataset or threat model is an error, another
eps a flagged row. With only .json items nothing is evaluated and no data or model is loaded.
"""

from __future__ import annotations

import argparse
import sys

from robustkit.commands._common import add_common, add_data
from robustkit.commands._config import add_config_args, make_config, param_overrides

FLAGS = {"models": "models", "dataset": "dataset", "data_root": "data_root", "download": "download", "norm": "norm",
         "eps": "eps", "n": "n", "attacks": "attacks", "certify": "certify", "sigma": "sigma", "eps_grid": "eps_grid",
         "batch_size": "batch_size", "out": "out", "seed": "seed", "smooth_n": "smoothing.n",
         "smooth_n0": "smoothing.n0", "alpha": "smoothing.alpha", "smooth_images": "smoothing.n_images",
         "corruptions": "corruptions", "sparsity": "sparsity.enabled", "transfer": "transfer.enabled",
         "transfer_sources": "transfer.sources", "reject": "reject.enabled"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="leaderboard: clean / AutoAttack / our attacks / certified accuracy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", metavar="RUN", help="run or model directories, and RobustBench model_info "
                                                             ".json files (reported numbers, not evaluated)")
    add_data(p)
    p.add_argument("--norm", help="linf | l2 (default linf)")
    p.add_argument("--eps", help="threat-model radius, e.g. 0.3 or 8/255 (default 0.3)")
    p.add_argument("--n", type=int, help="first N test images (default 1000)")
    p.add_argument("--attacks", help="comma-separated registered attacks (default autoattack,pgd,deepfool)")
    p.add_argument("--param", action="append", default=[], metavar="ATTACK.KEY=VALUE",
                   help="attack keyword override (repeatable), e.g. pgd.steps=20, autoattack.version=plus")
    p.add_argument("--certify", help="comma-separated: ibp, crown-ibp, lipschitz (the threat norm), smoothing, "
                                     "dual-smoothing (L2, of the smoothed classifier)")
    p.add_argument("--sigma", type=float, help="smoothing noise level (default: the run's noise-defense sigma)")
    p.add_argument("--smooth-n", type=int, help="smoothing estimation samples (default 10000)")
    p.add_argument("--smooth-n0", type=int, help="smoothing selection samples (default 100)")
    p.add_argument("--alpha", type=float, help="smoothing failure probability (default 0.001)")
    p.add_argument("--smooth-images", type=int, help="images certified by smoothing (default min(N, 100))")
    p.add_argument("--eps-grid", help="eps values of the PGD curve, e.g. 0,0.1,0.2 (default: 5 points up to "
                                      "--eps; 'none' skips it)")
    p.add_argument("--corruptions", help="also the common-corruption accuracy (corruptions_acc, 5 severities): all "
                                         "or comma-separated names (robustkit corruptions; default: not run)")
    p.add_argument("--sparsity", action="store_const", const=True, help="also the adversarial sparsity of each "
                   "model (Olivier & Raj 2023; settings: --set sparsity.directions=16 ...)")
    p.add_argument("--transfer", action="store_const", const=True, help="also the transfer success matrix between "
                   "the models (I-FGSM on each source, checked on each target)")
    p.add_argument("--transfer-sources", nargs="+", metavar="DIR", help="extra transfer sources (rows): LGV "
                   "collections from robustkit lgv, or model directories (implies --transfer)")
    p.add_argument("--reject", action="store_const", const=True, help="also CPR's robust accuracy with rejection "
                   "(Chen et al. 2023; settings: --set reject.steps=10 ...)")
    p.add_argument("--batch-size", type=int, help="images per attack batch (default 256)")
    p.add_argument("--out", help="output directory (default runs/benchmark)")
    add_config_args(p, "benchmark")
    add_common(p)
    p.set_defaults(func=run, dataset=None, download=None, seed=None)


def run(args: argparse.Namespace) -> int:
    import robustkit.app.benchmark as bm
    from robustkit.config import BenchmarkConfig
    from robustkit.device import resolve_device

    cfg = make_config(BenchmarkConfig, args, {key: getattr(args, flag) for flag, key in FLAGS.items()},
                      param_overrides(args.param, "attack_params", scoped=True))
    try:
        res = bm.benchmark(cfg, device=resolve_device(args.device), progress=True)
    except bm.SoundnessError as e:
        print(f"robustkit: SOUNDNESS ERROR: {e}", file=sys.stderr)
        return 3
    for e in res["models"]:
        aa = f"  AutoAttack {e['autoattack_acc']:.4f}" if "autoattack_acc" in e else ""
        print(f"{e['name']}: clean {e['clean_acc']:.4f}{aa}  worst case {e['robust_acc']:.4f}  "
              + "  ".join(f"{a} {v:.4f}" for a, v in e["attacks"].items() if a != "autoattack"))
    for e in res.get("reported", []):
        flags = "".join(f"  [{k}]" for k in e["flags"])
        print(f"{e['name']}: {e['status']}: clean {e['clean_acc']:.4f}  AutoAttack {e['autoattack_acc']:.4f}{flags}")
    for e in res["models"]:
        if e.get("adversarial_sparsity"):
            sp = e["adversarial_sparsity"]
            mean = "n/a" if sp["mean"] is None else f"{sp['mean']:.4f}"
            print(f"{e['name']}: adversarial sparsity {mean} (mean over {sp['n_vulnerable']} vulnerable points)")
    for e in res["models"]:
        if "rejection_robust_acc" in e:
            print(f"{e['name']}: robust accuracy with rejection (CPR, alpha 0) {e['rejection_robust_acc']:.4f}, "
                  f"curve AUC {e['rejection_curve_auc']:.4f}")
    if res.get("transfer_matrix"):
        tm = res["transfer_matrix"]
        print("transfer success (rows: source, columns: target " + ", ".join(tm["targets"]) + "):")
        for s, row in zip(tm["sources"], tm["success"]):
            print(f"  {s}: " + "  ".join("n/a" if v is None else f"{v:.4f}" for v in row))
    for name, f in res["flags"].items():
        if f.get("weaker_autoattack"):
            print(f"robustkit: warning: {name}: our attacks broke points AutoAttack did not: "
                  + ", ".join(f"{a} {len(v)}" for a, v in f["weaker_autoattack"].items()), file=sys.stderr)
    print(f"results: {cfg.out}/results.json, report: {cfg.out}/report.md")
    return 0
