"""The parts of ``robustkit attack``'s report beyond the main table: the robustness curve, the
query-budget table of query-based attacks, the saved adversarial examples and the per-image
records (see ``robustkit.app.attack``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from robustkit.io import atomic_write_json
from robustkit.report import image_grid, line_plot, md_table


def per_image(out: Path, eps: list[str | None], results: list[dict[str, Any]]) -> Path:
    """``per_image.json``: per eps value, one record per image (in selection order): label, clean
    prediction, clean-correct, robust, the attack that broke it (``None``: none did), the size of
    that break, the queries spent on it. The same for any number of processes."""
    runs = []
    for e, r in zip(eps, results):
        cols = [r[k].tolist() for k in ("y", "pred_clean", "clean_correct", "robust", "l2", "linf", "queries",
                                        "queries_to_success")]
        runs.append({"eps": e, "records": [
            {"index": i, "label": lab, "pred_clean": p, "clean_correct": c, "robust": rb, "broken_by": b, "l2": l2,
             "linf": li, "queries": q, "queries_to_success": qs}
            for i, (lab, p, c, rb, l2, li, q, qs, b) in enumerate(zip(*cols, r["broken_by"]))]})
    return atomic_write_json(out / "per_image.json", {"format": "robustkit-attack-per-image/1", "runs": runs})


def curve_section(out: Path, res: dict[str, Any], name: str) -> list[str]:
    """Robust accuracy vs eps: ``plots/robustness_curve.png`` and its table."""
    rows = res["curve"]
    line_plot(out / "plots" / "robustness_curve.png", {name: ([r["eps"] for r in rows], [r["robust_accuracy"]
                                                                                        for r in rows])},
              xlabel=f"eps ({res['norm']})", ylabel="robust accuracy", title="robustness curve")
    cols = ["eps_str", "robust_accuracy", "attack_success_rate", "mean_l2", "mean_linf", "unverified", "seconds"]
    return ["\n## Robustness curve\n", md_table([{c: ("" if r[c] is None else r[c]) for c in cols} for r in rows],
                                                cols), "\n![robustness curve](plots/robustness_curve.png)\n"]


def success_vs_budget(queries: torch.Tensor, success: torch.Tensor, attacked: int, max_queries: int,
                      points: int = 12) -> list[dict[str, Any]]:
    """Success rate (over the ``attacked`` points) within each query budget of a geometric grid."""
    grid = sorted({max(1, round(max_queries ** (i / (points - 1)))) for i in range(points)} | {max_queries})
    q = queries[success]
    return [{"budget": b, "success_rate": (int((q <= b).sum()) / attacked) if attacked else 0.0} for b in grid]


def queries_section(out: Path, res: dict[str, Any], r: dict[str, Any], chain: list[Any]) -> list[str]:
    """Queries of the verified successes (``res["queries"]``) and success rate vs query budget."""
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


def save_adversarials(out: Path, r: dict[str, Any], res: dict[str, Any], show: int = 8) -> list[str]:
    """``adversarials.safetensors`` (x, x_adv, labels, success) and a grid of a few of them."""
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
