"""One table of every defense objective: same start, same budget, same AutoAttack, beside the papers.

Each method (PGD-AT, TRADES, MART, ARoW, SCORE, ADR, DAFA, doubly-robust reweighting, fast AT; with
and without AWP where its paper uses AWP) is fine-tuned **from the same standard checkpoint** with the
**same budget** (epochs, batch size, optimizer, slow-start-fast-decay LR, L-inf eps, 10 attack steps;
fast AT: its one FGSM-RS step) through ``robustkit.app.train.train`` -- the pipeline of ``robustkit
finetune`` -- and every ``checkpoints/last`` is evaluated by ``robustkit.app.benchmark.benchmark`` (the
pipeline of ``robustkit benchmark``) with **standard AutoAttack** at the same eps on the same test
images: clean accuracy, AutoAttack accuracy, worst-class robust accuracy, and training time relative
to standard training (the same epochs of plain cross-entropy from the same checkpoint).

Beside it, each paper's own CIFAR-10 claim (``benchmarks/defense_claims.json``, with its source), and
whether our ordering agrees with the papers': pairwise, over the methods both tables rank (a pair
"agrees" when both put the same method ahead in AutoAttack accuracy).

Profiles:
- ``fashion`` (default): the full Fashion-MNIST (Debian ``dataset-fashion-mnist``, or ``--data-root``;
  mnist5k when neither has it, recorded in the JSON), the IBP small CNN, eps 0.1, 2 epochs each.
- ``cifar10`` (for a GPU, ``--device cuda --data-root DIR``): CIFAR-10 with each method's recipe
  (``configs/train_<defense>_cifar10.yaml``: PreAct ResNet-18, the paper's epochs, optimizer, schedule and
  objective settings), trained **from scratch** as the papers did, so the published numbers can be checked;
  AutoAttack on the full test set.
- ``--quick``: mnist5k, a few hundred images, a 5-iteration APGD-CE (labelled NOT standard AutoAttack).

Resumable: ``--runs DIR`` keeps every run; a finished run (``results.json``) is reused, an interrupted
one resumed, and the benchmark reuses its per-model entries.

    python -m benchmarks.defense_table [--quick] [--profile fashion|cifar10] [--methods a,b] [--n N]
        [--epochs E] [--lr LR] [--runs DIR] [--data-root DIR] [--device auto] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

import defenses  # noqa: F401  (registers every objective)
from benchmarks._common import in_workdir, log, parser, setup, write_results
from robustkit.app.benchmark import benchmark
from robustkit.app.train import train
from robustkit.config import BenchmarkConfig, TrainConfig, from_dict, load_yaml
from robustkit.data import load_data
from robustkit.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
CLAIMS = Path(__file__).resolve().parent / "defense_claims.json"

# label -> (defense, weight perturbation). "+awp" rows where the method's paper reports AWP.
METHODS: dict[str, tuple[str, str | None]] = {
    "standard": ("standard", None),
    "pgd-at": ("pgd-at", None), "pgd-at+awp": ("pgd-at", "awp"),
    "trades": ("trades", None), "trades+awp": ("trades", "awp"),
    "mart": ("mart", None), "mart+awp": ("mart", "awp"),
    "arow": ("arow", None), "arow+awp": ("arow", "awp"),
    "score": ("score", None),
    "adr": ("adr", None), "adr+awp": ("adr", "awp"),
    "dafa": ("dafa", None),
    "doubly-robust": ("doubly-robust", None),
    "fast-at": ("fast-at", None),
}


def settings(profile: str, quick: bool, epochs: int | None, n: int | None, lr: float | None = None
             ) -> dict[str, Any]:
    if quick:
        s = {"dataset": "mnist5k", "arch": "ibp-small", "eps": 0.3, "pretrain_epochs": 2, "epochs": 1,
             "n_train": 512, "n": 100, "batch_size": 64, "steps": 3, "autoattack": "quick", "lr": 0.05}
    elif profile == "fashion":
        s = {"dataset": "fashion-mnist", "arch": "ibp-small", "eps": 0.1, "pretrain_epochs": 8, "epochs": 2,
             "n_train": None, "n": 1000, "batch_size": 128, "steps": 10, "autoattack": "standard",
             "lr": 0.05}
    else:
        s = {"dataset": "cifar10", "arch": "preact-resnet18", "eps": 8 / 255, "epochs": None, "n_train": None,
             "n": 10000, "autoattack": "standard"}
    if epochs is not None:
        s["epochs"] = epochs
    if lr is not None:
        s["lr"] = lr
    if n is not None:
        s["n"] = n
    s["profile"] = "quick" if quick else profile
    return s


def objective_params(defense: str, s: dict[str, Any]) -> dict[str, Any]:
    """The shared budget: L-inf eps, ``steps`` PGD steps of 2.5 eps / steps (fast AT: one FGSM-RS step
    of 1.25 eps, Wong et al. 2020); the MNIST presets' other settings (beta, ...)."""
    eps = s["eps"]
    if defense == "standard":
        return {}
    if defense == "fast-at":
        return {"preset": "mnist", "eps": eps, "step_size": round(1.25 * eps, 6)}
    p: dict[str, Any] = {"preset": "mnist", "eps": eps, "steps": s["steps"],
                         "step_size": round(2.5 * eps / s["steps"], 6)}
    if defense == "dafa":          # class weights from the first half's statistics, then DAFA
        p["warmup"] = max(1, method_epochs(defense, s) // 2)
    return p


def method_epochs(defense: str, s: dict[str, Any]) -> int:
    """The shared budget in epochs; DAFA needs one more when the budget is a single epoch (its class
    weights come from a warm-up epoch's statistics and are used from the next one: Lee et al. 2024)."""
    return max(2, s["epochs"]) if defense == "dafa" else s["epochs"]


def finetune_config(s: dict[str, Any], label: str, pretrained: str | None) -> TrainConfig:
    """Fine-tuning from the standard checkpoint (``pretrained``), or its pretraining (``None``)."""
    defense, wp = METHODS[label] if pretrained else ("standard", None)
    return from_dict(TrainConfig, {
        "epochs": method_epochs(defense, s) if pretrained else s["pretrain_epochs"], "seed": 0,
        "model": {"arch": s["arch"], "pretrained": pretrained},
        "data": {"name": s["dataset"], "batch_size": s["batch_size"], "n_train": s["n_train"],
                 "root": s.get("data_root")},
        "optim": {"name": "sgd", "lr": s["lr"], "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "slow-start-fast-decay" if pretrained else "cosine"},
        "defense": {"name": defense, "params": objective_params(defense, s), "weight_perturbation": wp,
                    "wp_params": {"warmup_epochs": 0} if wp else {}},
        "eval": {"n": 200, "attack": None, "best_by": "clean_accuracy"}})


def recipe_config(s: dict[str, Any], label: str) -> TrainConfig:
    """CIFAR-10 profile: the method's own recipe, trained from scratch (the papers' setting)."""
    defense, wp = METHODS[label]
    name = {"standard": "trades"}.get(defense, defense)       # standard: TRADES' optimizer, epochs, schedule
    path = ROOT / "configs" / (f"train_{name}_awp_cifar10.yaml" if wp else f"train_{name}_cifar10.yaml")
    if wp and not path.is_file():
        path = ROOT / "configs" / f"train_{name}_cifar10.yaml"
    raw = load_yaml(path)
    if defense == "standard":
        raw["defense"] = {"name": "standard"}
    elif wp and raw.get("defense", {}).get("weight_perturbation") is None:
        raw["defense"]["weight_perturbation"] = wp
    raw.setdefault("data", {})["root"] = s.get("data_root")
    if s.get("epochs"):
        raw["epochs"] = s["epochs"]
    return from_dict(TrainConfig, raw)


def train_once(cfg: TrainConfig, out: Path, device: torch.device) -> tuple[Path, float]:
    """Train ``cfg`` into ``out`` (reused when finished, resumed when interrupted): the final checkpoint
    and the summed training seconds (evaluation excluded)."""
    if not (out / "results.json").is_file():
        run = train(cfg, out, device, resume=(out / "checkpoints" / "last").is_dir(), progress=False)
        metrics = run.metrics()
    else:
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return out / "checkpoints" / "last", float(sum(r.get("train_seconds", 0.0) for r in metrics))


def autoattack_params(s: dict[str, Any]) -> dict[str, Any]:
    if s["autoattack"] == "standard":
        return {"version": "standard"}
    return {"attacks": ["apgd-ce"], "overrides": {"apgd.n_iter": 5}}     # --quick: NOT standard AutoAttack


def evaluate(models: dict[str, Path], s: dict[str, Any], out: Path, device: torch.device) -> dict[str, Any]:
    cfg = from_dict(BenchmarkConfig, {
        "dataset": s["dataset"], "data_root": s.get("data_root"), "norm": "linf", "eps": str(s["eps"]),
        "n": s["n"], "attacks": ["autoattack"], "attack_params": {"autoattack": autoattack_params(s)},
        "eps_grid": [], "batch_size": 500, "seed": 0, "out": str(out)})
    return benchmark(cfg, {k: str(v) for k, v in models.items()}, device=device, progress=False)


def load_claims(path: Path = CLAIMS) -> list[dict[str, Any]]:
    """The papers' own CIFAR-10 L-inf 8/255 numbers: ``[{method, variant, arch, extra_data, clean,
    autoattack (None where no AutoAttack number was found), worst_class_robust, source, verified}]``, each
    read from the source it names (RobustBench model_info, the official repositories' READMEs / logs)."""
    claims = json.loads(path.read_text())
    for c in claims:
        if not {"method", "clean", "autoattack", "arch", "extra_data", "source"} <= set(c):
            raise InputError(f"{path}: claim {c} lacks one of method, clean, autoattack, arch, extra_data, source")
    return claims


def claim_for(label: str, claims: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The paper row for a table label (``trades+awp`` -> method ``trades``, variant ``+AWP``): the first
    listed (the file lists the ResNet-18-class row first where a paper has several)."""
    method, _, awp = label.partition("+")
    rows = [c for c in claims if c["method"] == method and (c.get("variant") or "").lower() == ("+awp" if awp else "")]
    return rows[0] if rows else None


def ordering_agreement(ours: dict[str, float], theirs: dict[str, float]) -> dict[str, Any]:
    """Pairwise ordering agreement of two ``{method: accuracy}`` maps over the methods both hold (ties on
    either side are skipped): the fraction of pairs both put in the same order, and the disagreeing pairs."""
    common = sorted(set(ours) & set(theirs))
    agree, disagree = 0, []
    for a, b in combinations(common, 2):
        d1, d2 = ours[a] - ours[b], theirs[a] - theirs[b]
        if d1 == 0 or d2 == 0:
            continue
        if (d1 > 0) == (d2 > 0):
            agree += 1
        else:
            disagree.append([a, b] if d2 > 0 else [b, a])      # [paper's winner, paper's loser]
    pairs = agree + len(disagree)
    return {"methods": common, "pairs": pairs, "agree": agree, "fraction": agree / pairs if pairs else None,
            "disagree": disagree}


def table(rows: list[dict[str, Any]], s: dict[str, Any]) -> str:
    aa = "AutoAttack (standard)" if s["autoattack"] == "standard" else "APGD-CE x5 (NOT standard AutoAttack)"
    lines = [f"| method | epochs | clean | {aa}, eps {s['eps']:.4g} | worst-class robust | train time vs standard "
             "| paper (CIFAR-10): clean / AA, arch |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r.get("paper")
        aa_c = "-" if not c or c["autoattack"] is None else f"{c['autoattack']:.2f}"
        paper = f"{c['clean']:.2f} / {aa_c}, {c['arch']}{' (extra data)' if c['extra_data'] else ''}" if c else "-"
        lines.append(f"| {r['method']} | {r['epochs']} | {r['clean_acc']:.3f} | {r['autoattack_acc']:.3f} | "
                     f"{r['worst_class_robust_acc']:.3f} | {r['time_vs_standard']:.2f}x | {paper} |")
    return "\n".join(lines)


def bench(a: argparse.Namespace, device: torch.device, work: Path) -> int:
    s = settings(a.profile, a.quick, a.epochs, a.n, a.lr)
    s["data_root"] = a.data_root
    labels = list(METHODS) if not a.methods else ["standard", *[m for m in a.methods.split(",") if m != "standard"]]
    unknown = [m for m in labels if m not in METHODS]
    if unknown:
        raise InputError(f"unknown method {unknown[0]!r}; valid: {', '.join(METHODS)}")
    if s["profile"] == "fashion":
        try:
            load_data("fashion-mnist", "test", a.data_root)
        except InputError as e:
            log("defense_table", f"full Fashion-MNIST not found ({e}); using mnist5k")
            s.update(dataset="mnist5k", eps=0.3, n=min(s["n"], 1000))
    t0 = time.perf_counter()
    trained: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    if s["profile"] == "cifar10":
        for label in labels:
            trained[label], seconds[label] = train_once(recipe_config(s, label), work / label, device)
    else:
        pre, seconds["pretrain"] = train_once(finetune_config(s, "standard", None), work / "pretrain", device)
        for label in labels:
            trained[label], seconds[label] = train_once(finetune_config(s, label, str(pre)), work / label, device)
            log("defense_table", f"{label}: trained in {seconds[label]:.1f} s")
    res = evaluate(trained, s, work / "benchmark", device)
    entries = {e["name"]: e for e in res["models"]}
    claims = load_claims()
    rows = []
    for label in labels:
        e = entries[label]
        rows.append({"method": label, "defense": METHODS[label][0], "weight_perturbation": METHODS[label][1],
                     "epochs": recipe_config(s, label).epochs if s["profile"] == "cifar10"
                     else method_epochs(METHODS[label][0], s),
                     "clean_acc": e["clean_acc"], "autoattack_acc": e["autoattack_acc"],
                     "worst_class_robust_acc": e["worst_class_robust_acc"], "worst_class": e["worst_class"],
                     "train_seconds": seconds[label], "time_vs_standard": seconds[label] / seconds["standard"],
                     "autoattack": e["autoattack"], "eval_seconds": e["seconds"], "paper": claim_for(label, claims)})
    ranked = [r for r in rows if r["paper"] and r["paper"]["autoattack"] is not None]
    ours = {r["method"]: r["autoattack_acc"] for r in ranked}
    theirs = {r["method"]: r["paper"]["autoattack"] for r in ranked}
    no_extra = [r["method"] for r in ranked if not r["paper"]["extra_data"]]
    body = {"settings": s, "rows": rows, "ordering_vs_papers": ordering_agreement(ours, theirs),
            "ordering_vs_papers_no_extra_data": ordering_agreement({m: ours[m] for m in no_extra},
                                                                   {m: theirs[m] for m in no_extra}),
            "pretrain_seconds": seconds.get("pretrain"), "total_seconds": time.perf_counter() - t0,
            "markdown": table(rows, s),
            "note": "our numbers: one run per method on this data and model; the papers': CIFAR-10 with their "
                    "architectures and full schedules (different data, model and budget: compare orderings, "
                    "not values); train_seconds excludes evaluation, wall-clock on a possibly shared machine"}
    write_results(a.out, "defense_table", body, device=device, args=a)
    md = Path(a.out).with_suffix(".md")
    md.write_text(body["markdown"] + "\n")
    log("defense_table", f"wrote {a.out} and {md}\n{body['markdown']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = parser("defense_table", __doc__)
    ap.add_argument("--profile", choices=("fashion", "cifar10"), default="fashion")
    ap.add_argument("--methods", default=None, help=f"comma-separated subset of: {', '.join(METHODS)}")
    ap.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs per method (same for all)")
    ap.add_argument("--n", type=int, default=None, help="test images for AutoAttack")
    ap.add_argument("--lr", type=float, default=None, help="fine-tuning peak LR, the same for every method (0.05)")
    ap.add_argument("--data-root", default=None, help="dataset directory (CIFAR-10 for --profile cifar10)")
    ap.add_argument("--runs", default=None, help="keep (and resume) the runs here (default: a temp dir)")
    a = ap.parse_args(argv)
    device = setup(a)
    return in_workdir(a.runs, "rk-defense-table-", lambda work: bench(a, device, work))


if __name__ == "__main__":
    sys.exit(main())
