"""Results: ``results.json``, ``report.md`` tables, certified-accuracy curves (one radius grid)
and PNG plots (all written atomically)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from robustkit.io import atomic_write, atomic_write_json, atomic_write_text


def write_results(out: str | Path, results: Mapping[str, Any]) -> Path:
    return atomic_write_json(Path(out) / "results.json", dict(results))


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def md_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (dicts), columns in the given order."""
    if not rows:
        return "_(no rows)_\n"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_markdown(out: str | Path, text: str, name: str = "report.md") -> Path:
    return atomic_write_text(Path(out) / name, text)


# -- certified accuracy ----------------------------------------------------------------------
def radius_grid(scale: float, points: int = 17, top: float = 4.0) -> list[float]:
    """THE radius grid of every certified-accuracy curve: ``points`` radii evenly spaced from 0 to
    ``top * scale``. ``scale`` is the certifier's radius unit (sigma for smoothing, the threat eps
    for IBP), so the default 17 points step by ``scale / 4`` and ``scale`` itself (the threat eps)
    is exactly on the grid (Cohen et al. 2019 plot smoothing up to ~4 sigma)."""
    if not scale > 0 or points < 2:
        raise ValueError(f"radius_grid needs scale > 0 and points >= 2, got {scale!r}, {points!r}")
    return [scale * (k * top / (points - 1)) for k in range(points)]


def certified_accuracy_curve(radius: Sequence[float], correct: Sequence[bool], grid: Sequence[float]
                             ) -> dict[str, Any]:
    """THE certified-accuracy curve: per grid radius ``r`` the fraction of points that are
    ``correct`` (predicted right and not abstained) with certified ``radius >= r``; and the
    average certified radius (ACR, Zhai et al. 2020, MACER): the mean over all points of the
    radius of the correct ones, 0 for the others. Returns
    ``{"radius": grid, "certified_accuracy": [...], "average_certified_radius": float}``."""
    r = np.asarray(radius, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct, dtype=bool).reshape(-1)
    if r.shape != ok.shape:
        raise ValueError(f"radius and correct need the same length, got {r.size} and {ok.size}")
    n = max(r.size, 1)
    acc = [float(np.count_nonzero(ok & (r >= g)) / n) for g in grid]
    return {"radius": [float(g) for g in grid], "certified_accuracy": acc,
            "average_certified_radius": float(np.where(ok, r, 0.0).sum() / n)}


def line_plot(path: str | Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], xlabel: str,
              ylabel: str, title: str = "", ylim: tuple[float, float] | None = (0.0, 1.0),
              step: bool = False) -> Path:
    """One PNG with a line per series: ``{label: (xs, ys)}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for label, (xs, ys) in series.items():
        if step:
            ax.step(list(xs), list(ys), where="post", label=label)
        else:
            ax.plot(list(xs), list(ys), marker="o", ms=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1 or any(series):
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def image_grid(path: str | Path, rows: Sequence[Sequence[Any]], titles: Sequence[Sequence[str]] | None = None,
               row_labels: Sequence[str] | None = None) -> Path:
    """PNG grid of images; ``rows[r][c]`` is a ``(C, H, W)`` tensor in ``[0, 1]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nr, nc = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(nr, nc, figsize=(1.3 * nc, 1.5 * nr), dpi=110, squeeze=False)
    for r in range(nr):
        for c in range(nc):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(rows[r]):
                continue
            img = rows[r][c].detach().float().cpu().clamp(0, 1)
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            if titles:
                ax.set_title(titles[r][c], fontsize=7)
        if row_labels:
            axes[r][0].text(-0.1, 0.5, row_labels[r], transform=axes[r][0].transAxes, ha="right",
                            va="center", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
