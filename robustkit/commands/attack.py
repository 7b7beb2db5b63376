"""``robustkit attack``: robust accuracy of a model under a registered attack (or a chain).

    robustkit attack --model runs/quick --attack pgd --eps 0.3 --steps 40 --out out/pgd
    robustkit attack --model runs/quick --attack pgd,deepfool --norm l2 --eps 2.0 --out out/chain
    robustkit attack --model runs/quick --attack pgd --eps 0,0.05,0.1,0.2,0.3 --out out/curve
    robustkit attack --model runs/quick --attack bo-hard-label --eps 0.3 --max-queries 1000 --out out/bo

The attack is built from its registered class by introspecting its keyword arguments: the
dedicated flags (``--norm --eps --steps ...``) and ``--param key=value`` are passed to every
attack of the chain that accepts them; a flag that no attack of the chain accepts is an
error. Several ``--eps`` values give a robustness curve. Writes ``results.json`` and
``report.md`` (and ``plots/*.png``, ``adversarials.safetensors`` where asked) to ``--out``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from robustkit.commands._common import add_common, add_data, load_model_arg, setup
from robustkit.data import dataset_info, make_loader
from robustkit.report import image_grid, line_plot, md_table, write_markdown, write_results
from robustkit.threat import parse_eps

# CLI flag (dest) -> attack keyword argument. ``None`` default = not given on the command line.
FLAGS = {"norm": "norm", "steps": "steps", "restarts": "restarts", "loss": "loss", "step_size": "step_size",
         "targeted": "targeted", "max_queries": "max_queries"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attack", help="robust accuracy under an attack (or a chain), robustness curves")
    p.add_argument("--model", required=True, help="run directory or model directory (robustkit.zoo.save)")
    add_data(p)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--attack", default="pgd", help="registered attack name, or a comma-separated chain "
                   "(AutoAttack-style: later attacks only see points still robust); default pgd")
    p.add_argument("--norm", default=None, help="linf | l2")
    p.add_argument("--eps", default=None, help="budget, e.g. 0.3 or 8/255; several comma-separated values "
                   "give a robustness curve")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--restarts", type=int, default=None)
    p.add_argument("--loss", default=None, help="ce | dlr | margin (attacks that take a loss)")
    p.add_argument("--step-size", type=float, default=None)
    p.add_argument("--targeted", action="store_true", default=None,
                   help="targeted attack; each point gets a random wrong class (seeded) as target")
    p.add_argument("--max-queries", type=int, default=None, help="query budget (query-based attacks)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other keyword argument of the attack (repeatable), e.g. --param overshoot=0.05")
    p.add_argument("--n", type=int, default=None, help="first N images (default: all)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--amp", action="store_true", help="autocast on CUDA (clean pass and attacks that take amp)")
    p.add_argument("--out", default=None, help="output directory (default: runs/attack-<attack>)")
    p.add_argument("--save-adversarials", action="store_true",
                   help="write adversarials.safetensors and plots/adversarials.png")
    add_common(p)
    p.set_defaults(func=run)


# -- building attacks by introspection -----------------------------------------------------
def attack_kwargs(cls: type) -> tuple[set[str], set[str], bool]:
    """``(accepted, required, takes_any)`` keyword arguments of ``cls.__init__`` (private ``_x`` excluded)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    accepted = {q.name for q in params if q.kind in kinds and not q.name.startswith("_")}
    required = {q.name for q in params if q.kind in kinds and q.default is inspect.Parameter.empty}
    return accepted, required, any(q.kind == inspect.Parameter.VAR_KEYWORD for q in params)


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: v}`` with YAML scalars (ints, floats, true/false, null, strings)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(val) if val.strip() else None
        except yaml.YAMLError:
            out[key.strip().replace("-", "_")] = val
    return out


def build_attacks(names: list[str], given: dict[str, Any], seed: int | None = None, amp: bool = False) -> list[Any]:
    """Instantiate each registered attack with the given keyword arguments it accepts.

    A key no attack of the chain accepts is an error naming what each one accepts; a required
    keyword argument that was not given is an error naming its flag.
    """
    import attacks  # noqa: F401  (registers every attack)
    from robustkit.registry import ATTACKS

    classes = [ATTACKS.get(n) for n in names]
    sigs = [attack_kwargs(c) for c in classes]
    for key in given:
        if not any(key in acc or any_kw for acc, _, any_kw in sigs):
            accepted = "; ".join(f"{n}: {', '.join(sorted(acc))}" for n, (acc, _, _) in zip(names, sigs))
            raise ValueError(f"{_flag(key)} is not accepted by attack {', '.join(names)} (accepted: {accepted})")
    out = []
    for name, cls, (acc, req, any_kw) in zip(names, classes, sigs):
        kw = {k: v for k, v in given.items() if k in acc or any_kw}
        if "seed" in acc and "seed" not in kw and seed is not None:
            kw["seed"] = seed
        if "amp" in acc and "amp" not in kw and amp:
            kw["amp"] = True
        missing = sorted(req - set(kw))
        if missing:
            raise ValueError(f"attack {name!r} needs {', '.join(_flag(m) for m in missing)}")
        out.append(cls(**kw))
    return out


def _flag(key: str) -> str:
    return f"--{key.replace('_', '-')}" if key in FLAGS or key == "eps" else f"--param {key}=..."


def parse_eps_list(text: str | None) -> list[tuple[str, float]] | None:
    if text is None:
        return None
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError("--eps needs at least one value, e.g. 0.3 or 8/255 or 0,0.1,0.2")
    return [(t, parse_eps(t)) for t in items]


# -- the command -------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from attacks.sanity import sanity_checks
    from robustkit.evaluate import adversarial_examples, robust_accuracy

    names = [n.strip() for n in str(args.attack).split(",") if n.strip()]
    if not names:
        raise ValueError("--attack needs at least one attack name")
    given = {kw: getattr(args, flag) for flag, kw in FLAGS.items() if getattr(args, flag) is not None}
    given.update(parse_params(args.param))
    eps_list = parse_eps_list(args.eps)
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    # build once up front so that every user error surfaces before any work
    chains = [build_attacks(names, {**given, **({"eps": e} if e is not None else {})}, args.seed, args.amp)
              for e in ([None] if eps_list is None else [v for _, v in eps_list])]

    device = setup(args)
    model = load_model_arg(args.model, device)
    info = dataset_info(args.dataset)
    if tuple(info.input_shape) != tuple(model.input_shape):
        raise ValueError(f"model expects inputs {tuple(model.input_shape)}, dataset {args.dataset!r} has "
                         f"{tuple(info.input_shape)}")
    if info.num_classes != model.num_classes:
        raise ValueError(f"model has {model.num_classes} classes, dataset {args.dataset!r} has {info.num_classes}")
    loader = make_loader(args.dataset, args.split, batch_size=args.batch_size, n=args.n, data_root=args.data_root,
                         download=args.download, device=device)
    out = Path(args.out or f"runs/attack-{'+'.join(names)}")

    with warnings.catch_warnings(record=True):
        x0, y0 = next(iter(loader))
        checks = sanity_checks(model, x0, y0, warn=False)
    for w in checks:
        print(f"robustkit: warning: {w}", file=sys.stderr)

    results = []
    for i, chain in enumerate(chains):
        last = i == len(chains) - 1
        fn = adversarial_examples if (args.save_adversarials and last) else robust_accuracy
        results.append(fn(model, loader, chain, progress=sys.stderr.isatty(), amp=args.amp))
        r, e = results[-1], (None if eps_list is None else eps_list[i][0])
        print(f"{'+'.join(names)}" + (f" eps={e}" if e is not None else "") +
              f": clean {r['clean_accuracy']:.4f}  robust {r['robust_accuracy']:.4f}  ({r['seconds']:.1f}s)")

    res = _summary(args, names, chains, eps_list, results, checks)
    md = [f"# Attack: {'+'.join(names)}\n", f"model `{args.model}` ({model.arch}), {args.dataset}/{args.split}, "
          f"n={res['n']}\n", md_table([{k: res[k] for k in ("attack", "norm", "eps", "n", "clean_accuracy",
                                                              "robust_accuracy", "seconds")
                                        if not isinstance(res[k], list)}])]
    md += ["\n## Attacks in the chain\n", md_table(results[-1]["per_attack"])]
    if eps_list is not None and len(eps_list) > 1:
        md += _curve(out, res, names)
    if any(getattr(a, "max_queries", None) is not None for a in chains[-1]):
        md += _queries(out, res, results[-1], chains[-1])
    if args.save_adversarials:
        md += _save_adversarials(out, results[-1], res)
    if checks:
        md += ["\n## Sanity warnings\n"] + [f"- {w}\n" for w in checks]
    write_results(out, res)
    write_markdown(out, "\n".join(md))
    print(f"results: {out / 'results.json'}")
    return 0


def _summary(args: argparse.Namespace, names: list[str], chains: list[list[Any]],
             eps_list: list[tuple[str, float]] | None, results: list[dict[str, Any]],
             checks: list[str]) -> dict[str, Any]:
    curve = eps_list is not None and len(eps_list) > 1
    last = results[-1]
    norm = getattr(chains[-1][0], "norm", None)
    keys = ("attack_success_rate", "mean_l2", "median_l2", "mean_linf", "forward_passes", "backward_passes")
    res: dict[str, Any] = {
        "command": "attack", "model": str(args.model), "dataset": args.dataset, "split": args.split,
        "attack": ",".join(names), "norm": norm,
        "eps": ([v for _, v in eps_list] if curve else eps_list[0][1]) if eps_list else None,
        "n": last["n"], "clean_accuracy": last["clean_accuracy"],
        "robust_accuracy": [r["robust_accuracy"] for r in results] if curve else last["robust_accuracy"],
        "seconds": sum(r["seconds"] for r in results),
        "params": [a.params() for a in chains[-1]],
        **{k: last[k] for k in keys}, "per_attack": last["per_attack"],
        "warnings": checks, "seed": args.seed,
    }
    if curve:
        res["curve"] = [{"eps": v, "eps_str": s, "robust_accuracy": r["robust_accuracy"],
                         "attack_success_rate": r["attack_success_rate"], "mean_l2": r["mean_l2"],
                         "mean_linf": r["mean_linf"], "seconds": r["seconds"]}
                        for (s, v), r in zip(eps_list, results)]
    return res


def _curve(out: Path, res: dict[str, Any], names: list[str]) -> list[str]:
    rows = res["curve"]
    line_plot(out / "plots" / "robustness_curve.png",
              {"+".join(names): ([r["eps"] for r in rows], [r["robust_accuracy"] for r in rows])},
              xlabel=f"eps ({res['norm']})", ylabel="robust accuracy", title="robustness curve")
    cols = ["eps_str", "robust_accuracy", "attack_success_rate", "mean_l2", "mean_linf", "seconds"]
    return ["\n## Robustness curve\n", md_table([{c: ("" if r[c] is None else r[c]) for c in cols} for r in rows],
                                                cols), "\n![robustness curve](plots/robustness_curve.png)\n"]


def success_vs_budget(queries: torch.Tensor, success: torch.Tensor, attacked: int, max_queries: int,
                      points: int = 12) -> list[dict[str, Any]]:
    """Success rate (over the ``attacked`` points) within each query budget of a geometric grid."""
    grid = sorted({max(1, round(max_queries ** (i / (points - 1)))) for i in range(points)} | {max_queries})
    q = queries[success]
    return [{"budget": b, "success_rate": (int((q <= b).sum()) / attacked) if attacked else 0.0} for b in grid]


def _queries(out: Path, res: dict[str, Any], r: dict[str, Any], chain: list[Any]) -> list[str]:
    max_q = max(int(getattr(a, "max_queries", 0) or 0) for a in chain)
    succ, q = r["success"], r["queries"]              # chain queries until broken (later attacks skip it)
    qs = q[succ].double()
    attacked = int(r["clean_correct"].sum())
    table = success_vs_budget(q, succ, attacked, max(max_q, 1))
    res["queries"] = {"max_queries": max_q, "median_queries": float(qs.median()) if qs.numel() else None,
                      "mean_queries": float(qs.mean()) if qs.numel() else None,
                      "success_vs_queries": table}
    line_plot(out / "plots" / "success_vs_queries.png",
              {res["attack"]: ([t["budget"] for t in table], [t["success_rate"] for t in table])},
              xlabel="query budget", ylabel="attack success rate", title="success rate vs queries", step=True)
    med, mean = res["queries"]["median_queries"], res["queries"]["mean_queries"]
    stats = "none succeeded" if med is None else f"median {med:.0f}, mean {mean:.1f}"
    return ["\n## Queries\n", f"queries of successful attacks: {stats} (budget {max_q})\n\n",
            md_table(table), "\n![success vs queries](plots/success_vs_queries.png)\n"]


def _save_adversarials(out: Path, r: dict[str, Any], res: dict[str, Any], show: int = 8) -> list[str]:
    from safetensors.torch import save_file

    from robustkit.io import atomic_write

    tensors = {"x": r["x"], "x_adv": r["x_adv"], "y": r["y"], "pred_clean": r["pred_clean"],
               "pred_adv": r["pred_adv"], "success": r["success"].to(torch.uint8)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {"attack": res["attack"], "eps": str(res["eps"][-1] if isinstance(res["eps"], list) else res["eps"])}
    atomic_write(out / "adversarials.safetensors", lambda tmp: save_file(tensors, tmp, metadata=meta))
    attacked = r["clean_correct"].nonzero().squeeze(1)
    order = torch.tensor(_one_per_class(torch.cat([attacked[r["success"][attacked]],
                                                   attacked[~r["success"][attacked]]]), r["y"]),
                         dtype=torch.long)[:show]
    if order.numel() == 0:
        order = torch.arange(min(show, r["x"].shape[0]))
    if order.numel():
        x, xa = r["x"][order], r["x_adv"][order]
        d = xa - x
        scale = d.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        rows = [list(x), list(xa), list(0.5 + 0.5 * d / scale)]
        titles = [[f"y={int(r['y'][i])} pred={int(r['pred_clean'][i])}" for i in order],
                  [f"adv pred={int(r['pred_adv'][i])}" for i in order],
                  [f"|d|inf={float(d[j].abs().max()):.3g}" for j in range(len(order))]]
        image_grid(out / "plots" / "adversarials.png", rows, titles, ["clean", "adversarial", "perturbation"])
    return ["\n## Adversarial examples\n", f"`adversarials.safetensors` ({r['x'].shape[0]} images, eps "
            f"{meta['eps']}); perturbations shown rescaled.\n", "\n![adversarials](plots/adversarials.png)\n"]


def _one_per_class(idx: torch.Tensor, y: torch.Tensor) -> list[int]:
    """``idx`` reordered so that the first sample of each class comes first (a varied grid)."""
    seen: set[int] = set()
    first, rest = [], []
    for i in idx.tolist():
        (rest if int(y[i]) in seen else first).append(i)
        seen.add(int(y[i]))
    return first + rest
