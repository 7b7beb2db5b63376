"""Outputs of ``robustkit corruptions`` (all written atomically): ``results.json``, ``report.md``,
``plots/corruption_accuracy.png`` (heat map: corruption x severity, plus the clean column),
``model_info.json`` (RobustBench's corruptions ``model_info`` fields: percent strings, ``eps``
null; ``corruptions_mce`` only with a baseline, and a footnote naming it, since RobustBench's is
AlexNet) and ``unaggregated_results.csv`` (RobustBench's two header rows, corruption then
severity, and one row of accuracies)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from robustkit.io import atomic_write, atomic_write_json, atomic_write_text
from robustkit.report import md_table, write_markdown, write_results

HEATMAP = "plots/corruption_accuracy.png"


def percent(frac: float) -> str:
    return f"{100 * frac:.2f}"


def heatmap(path: str | Path, res: Mapping[str, Any]) -> Path:
    """PNG heat map of accuracy per corruption (rows, the paper's order) and severity (columns),
    a first column for clean accuracy, each cell labelled in percent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names, sev = res["corruptions"], res["severities"]
    acc = np.array([[res["clean_accuracy"]] + [res["corruption_accuracy"][c][str(s)] for s in sev] for c in names])
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * (len(sev) + 1) + 1.6, 0.8 + 0.36 * len(names)), dpi=120)
    im = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sev) + 1), ["clean"] + [str(s) for s in sev])
    ax.set_yticks(range(len(names)), [c.replace("_", " ") for c in names])
    ax.set_xlabel("severity")
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            ax.text(j, i, f"{100 * acc[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="black" if acc[i, j] > 0.6 else "white")
    ax.set_title(f"{Path(str(res['model'])).name} on {res['dataset']} (n={res['n']}): "
                 f"mean {100 * res['corruptions_acc']:.1f}%", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05, label="accuracy")
    fig.tight_layout()

    def save(tmp: str) -> None:
        fig.savefig(tmp, format="png")

    try:
        return atomic_write(Path(path), save)
    finally:
        plt.close(fig)


def model_info(res: Mapping[str, Any]) -> dict[str, Any]:
    """RobustBench's corruptions ``model_info`` dict (their key order) for ``res``."""
    d: dict[str, Any] = {"link": "", "name": Path(str(res["model"])).name, "authors": "", "additional_data": None,
                         "number_forward_passes": 1, "dataset": res["dataset"], "venue": "N/A",
                         "architecture": res.get("arch") or "", "eps": None,
                         "clean_acc": percent(res["clean_accuracy"]), "reported": "",
                         "corruptions_acc": percent(res["corruptions_acc"])}
    notes = [f"robustkit corruptions: {res['definitions']}, first {res['n']} test images, seed {res['seed']}"]
    if len(res["corruptions"]) < 15 or len(res["severities"]) < 5:
        notes.append(f"only {len(res['corruptions'])} corruptions x severities {res['severities']}")
    if res.get("mce") is not None:
        d["corruptions_mce"] = f"{res['mce']:.2f}"
        notes.append(f"corruptions_mce relative to {res['baseline']['model']}, not RobustBench's AlexNet")
    d["footnote"] = "; ".join(notes) + "."
    d["threat_model"] = "corruptions"
    return d


def unaggregated_csv(res: Mapping[str, Any]) -> str:
    """RobustBench's ``unaggregated_results.csv`` layout: header rows (corruption, severity), one model row."""
    cols = [(c, s) for c in res["corruptions"] for s in res["severities"]]
    buf = io.StringIO()
    buf.write("," + ",".join(c for c, _ in cols) + "\n")
    buf.write("," + ",".join(str(s) for _, s in cols) + "\n")
    buf.write(Path(str(res["model"])).name + "," + ",".join(repr(res["corruption_accuracy"][c][str(s)])
                                                         for c, s in cols) + "\n")
    return buf.getvalue()


def markdown(res: Mapping[str, Any]) -> str:
    """The report page."""
    sev = res["severities"]
    base = res.get("baseline")
    rows = []
    for c in res["corruptions"]:
        row: dict[str, Any] = {"corruption": c, **{f"s{s}": res["corruption_accuracy"][c][str(s)] for s in sev},
                               "mean": res[f"corruptions_acc_{c}"]}
        if base is not None:
            row["CE"] = res["ce"][c] if res["ce"][c] is not None else "n/a"
            row["rel. CE"] = res["relative_ce"][c] if res["relative_ce"][c] is not None else "n/a"
        rows.append(row)
    rows.append({"corruption": "**mean**", **{f"s{s}": res["severity_accuracy"][str(s)] for s in sev},
                 "mean": res["corruptions_acc"],
                 **({"CE": res["mce"] if res["mce"] is not None else "n/a",
                     "rel. CE": res["relative_mce"] if res["relative_mce"] is not None else "n/a"}
                    if base is not None else {})})
    lines = [f"# Common corruptions: {Path(str(res['model'])).name}\n\n",
             f"Model `{res['model']}` ({res.get('arch')}), {res['dataset']} test, first {res['n']} images, seed "
             f"{res['seed']}; {len(res['corruptions'])} corruptions x severities {sev}; {res['definitions']}.\n\n",
             f"- clean accuracy {res['clean_accuracy']:.4f}\n",
             f"- mean corruption accuracy (RobustBench `corruptions_acc`) {res['corruptions_acc']:.4f}\n"]
    if base is not None:
        mce = "n/a" if res["mce"] is None else f"{res['mce']:.2f}"
        rmce = "n/a" if res["relative_mce"] is None else f"{res['relative_mce']:.2f}"
        lines += [f"- baseline `{base['model']}`: clean {base['clean_accuracy']:.4f}\n",
                  f"- mCE {mce} (over {res['mce_over']} corruptions), relative mCE {rmce} (over "
                  f"{res['relative_mce_over']}); percent of the baseline's errors (Hendrycks & Dietterich 2019)\n"]
    lines += [f"- {res['seconds']:.1f} s\n\n", "Accuracy per corruption and severity:\n\n", md_table(rows),
              f"\n![accuracy per corruption and severity]({HEATMAP})\n"]
    return "".join(lines)


def write_outputs(out: str | Path, res: Mapping[str, Any]) -> Path:
    """Every output of one run; returns the path of ``results.json``."""
    out = Path(out)
    heatmap(out / HEATMAP, res)
    atomic_write_json(out / "model_info.json", model_info(res))
    atomic_write_text(out / "unaggregated_results.csv", unaggregated_csv(res))
    write_markdown(out, markdown(res))
    return write_results(out, {**res, "robustbench": model_info(res)})
