"""Outputs of the certification pipeline: ``results.json``, ``report.md`` and the PNG plot of the
certified-accuracy curve (all written atomically), from the one results schema of
``robustkit.app.certify.summarize``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustkit.report import certified_accuracy_curve, line_plot, md_table, radius_grid, write_markdown, write_results

NORM_NAME = {"l2": "L2", "linf": "L-inf"}
TITLE = {"smoothing": "randomized smoothing (Cohen et al. 2019)", "ibp": "IBP (Gowal et al. 2018)",
         "crown-ibp": "CROWN-IBP (Zhang et al. 2020)",
         "lipschitz": "Lipschitz margins (Gram iteration bounds, Delattre et al. 2023)"}


def plot_curves(path: str | Path, named: dict[str, dict[str, Any]], title: str = "") -> Path:
    """One step plot of certified accuracy vs radius for each ``{label: results}``, on a dense
    version of the radius grid (up to 4 radius units, or further if some radius is larger)."""
    series = {}
    norms = set()
    for label, res in named.items():
        recs, scale = res["per_sample"], res["radius_scale"]
        top = max([4.0] + [r["radius"] / scale for r in recs if r["correct"]])
        grid = radius_grid(scale, points=401, top=top)
        curve = certified_accuracy_curve([r["radius"] for r in recs], [r["correct"] for r in recs], grid)
        series[label] = (curve["radius"], curve["certified_accuracy"])
        norms.add(NORM_NAME.get(res["norm"], res["norm"]))
    return line_plot(path, series, xlabel=f"radius ({', '.join(sorted(norms))}, pixel space)",
                     ylabel="certified accuracy", title=title, step=True)


def markdown(res: dict[str, Any], model: str | None = None) -> str:
    """The report page of one certification run."""
    unit = NORM_NAME.get(res["norm"], res["norm"])
    curve = res["curve"]
    rows = [{f"radius ({unit})": r, "certified accuracy": a}
            for r, a in zip(curve["radius"], curve["certified_accuracy"])]
    params = ", ".join(f"{k} = {v}" for k, v in res["params"].items() if v is not None)
    lines = [f"# Certification: {TITLE.get(res['certifier'], res['certifier'])}\n\n",
             f"Model `{model or res.get('model', '?')}`, dataset {res['dataset'] or '?'} (test, {res['n']} images), "
             f"{params}, seed {res['seed']}.\n\n", md_table(rows), "\n",
             f"- clean accuracy (predicted right, not abstained: certified at radius 0): "
             f"{curve['certified_accuracy'][0]:.4f}; abstain rate {res['abstain_rate']:.4f}\n",
             f"- average certified radius (ACR, Zhai et al. 2020): {res['average_certified_radius']:.4f}\n"]
    if res.get("max_radius") is not None:
        lines.append(f"- largest radius this certifier can return here: {res['max_radius']:.4f}\n")
    if res.get("lipschitz_constant") is not None:
        lines.append(f"- L2 Lipschitz bound L = {res['lipschitz_constant']:.6g} (radius: margin / (sqrt(2) L))\n")
    if res.get("samples"):
        sm = res["samples"]
        lines.append(f"- noise samples per image: mean {sm['mean']:.0f}, max {sm['max']} (incl. n0)\n")
    lines += [f"- {res['seconds']:.1f} s\n", f"- guarantee: {res['guarantee']}\n",
              "\n![certified accuracy](plots/certified_accuracy.png)\n"]
    return "".join(lines)


def write_outputs(out: str | Path, res: dict[str, Any], model: str | None = None) -> Path:
    """``out/results.json``, ``out/report.md`` and ``out/plots/certified_accuracy.png``; returns ``results.json``."""
    out = Path(out)
    plot_curves(out / "plots" / "certified_accuracy.png", {res["certifier"]: res},
                title=TITLE.get(res["certifier"], res["certifier"]))
    write_markdown(out, markdown(res, model))
    return write_results(out, res)
