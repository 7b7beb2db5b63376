"""The benchmark's transfer success matrix (``transfer: true``; see ``robustkit.app.benchmark``).

Rows are *sources*: every benchmarked model, then the extra ``transfer.sources`` (LGV
collections from ``robustkit lgv``, attacked one member per iteration, or any model directory).
Columns are *targets*: the benchmarked models. On each source, the transfer attack (``attacks.lgv``:
I-FGSM, ``steps`` iterations of ``eps / 10``, the last iterate; on a plain model it is I-FGSM on
that model) crafts one adversarial per image from the true labels. Entry ``[s][t]`` is the
fraction of the target's clean-correct images whose adversarial from ``s`` the target
misclassifies -- checked on the target itself, with the adversarial inside the benchmark's ball
and ``[0, 1]`` (``ThreatModel.contains``; one that is not counts as not transferred, and is
counted under ``unverified``). The diagonal is each model's white-box success under the attack.

Per-image results depend only on the image (no random start), so they do not depend on the
batch size; the matrix is cached in ``out/transfer.json`` with the settings and every model's
weight fingerprint, and reused by a rerun.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustkit.errors import InputError
from robustkit.evaluate import predict
from robustkit.io import atomic_write, atomic_write_json
from robustkit.report import fmt, md_table
from robustkit.threat import ThreatModel
from robustkit.zoo import fingerprint

CACHE = "transfer.json"


def load_sources(paths: list[str], device: torch.device | str | None) -> dict[str, nn.Module]:
    """The extra sources: LGV collection directories (``collection.json``) or model directories."""
    from robustkit.app._bench_models import display_name
    from robustkit.app.lgv import is_collection, load_collection
    from robustkit.zoo import load

    out: dict[str, nn.Module] = {}
    for p in paths:
        if is_collection(p):
            m: nn.Module = load_collection(p)
            name = f"lgv:{Path(p).name}"
        else:
            m, name = load(p), display_name(Path(p))
        if device is not None:
            m = m.to(device)
        base, k = name, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out[name] = m.eval()
    return out


def transfer_matrix(sources: Mapping[str, nn.Module], targets: Mapping[str, nn.Module], x: torch.Tensor,
                    y: torch.Tensor, *, norm: str, eps: float, steps: int = 50, step_size: float | None = None,
                    batch_size: int = 256, amp: bool = False) -> dict[str, Any]:
    """Transfer success of adversarials crafted on each source, on each target.

    x: (N, C, H, W) in [0, 1]; y: (N,). Returns ``{"sources", "targets", "success"`` (rows x
    columns, fractions; None where a target has no clean-correct image), ``"broken"`` and
    ``"clean_correct"`` (counts), ``"unverified"``, ``"attack"`` (the attack's parameters), ``"n"``,
    ``"seconds"``}.
    """
    from attacks.lgv import LGV

    if not sources or not targets:
        raise InputError("a transfer matrix needs at least one source and one target model")
    atk = LGV(norm=norm, eps=eps, steps=steps, step_size=step_size, amp=amp)
    tm = ThreatModel(norm, eps)
    correct = {t: _on(model, x, batch_size, amp) == y for t, model in targets.items()}   # (N,) per target
    success, broken, unverified, seconds = [], [], {}, {}
    for s, src in sources.items():
        t0 = time.perf_counter()
        dev = _device(src)
        x_adv = torch.cat([atk(src, x[i:i + batch_size].to(dev), y[i:i + batch_size].to(dev)).x_adv.cpu()
                           for i in range(0, x.shape[0], batch_size)]) if x.shape[0] else x.clone()
        ok = tm.contains(x_adv, x)                                                         # (N,)
        unverified[s] = int((~ok).sum())
        row, counts = [], []
        for t, model in targets.items():
            hit = correct[t] & ok & (_on(model, x_adv, batch_size, amp) != y)              # (N,)
            k = int(correct[t].sum())
            row.append(int(hit.sum()) / k if k else None)
            counts.append(int(hit.sum()))
        success.append(row)
        broken.append(counts)
        seconds[s] = round(time.perf_counter() - t0, 3)
    return {"sources": list(sources), "targets": list(targets), "success": success, "broken": broken,
            "clean_correct": {t: int(c.sum()) for t, c in correct.items()}, "unverified": unverified,
            "attack": atk.params(), "n": int(x.shape[0]), "seconds": seconds}


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _on(model: nn.Module, x: torch.Tensor, batch_size: int, amp: bool) -> torch.Tensor:
    """Labels ``(N,)`` on CPU (``robustkit.evaluate.predict``; a model collection predicts by mean logits)."""
    return predict(model, x, batch_size=batch_size, amp=amp)


def cached_matrix(out: Path, key: dict[str, Any], compute: Any) -> dict[str, Any]:
    """``out/transfer.json``'s matrix if it was made with ``key``, else ``compute()`` (then saved)."""
    f = out / CACHE
    if f.is_file():
        try:
            old = json.loads(f.read_text())
        except json.JSONDecodeError:
            old = None
        if isinstance(old, dict) and old.get("key") == json.loads(json.dumps(key)):
            return old["matrix"]
    res = compute()
    atomic_write_json(f, {"key": key, "matrix": res})
    return res


def cache_key(settings: dict[str, Any], sources: Mapping[str, nn.Module], targets: Mapping[str, nn.Module]
              ) -> dict[str, Any]:
    return {"settings": settings, "sources": {k: fingerprint(m) for k, m in sources.items()},
            "targets": {k: fingerprint(m) for k, m in targets.items()}}


# -- report ---------------------------------------------------------------------------------
def heatmap(path: Path, tm: dict[str, Any]) -> Path:
    """PNG heat map of the success matrix (sources as rows, targets as columns, values printed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    vals = np.array([[np.nan if v is None else v for v in row] for row in tm["success"]], dtype=float)
    fig, ax = plt.subplots(figsize=(2.4 + 1.1 * len(tm["targets"]), 1.4 + 0.55 * len(tm["sources"])), dpi=120)
    im = ax.imshow(vals, vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
    ax.set_xticks(range(len(tm["targets"])), tm["targets"], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(tm["sources"])), tm["sources"], fontsize=8)
    for i in range(vals.shape[0]):
        for j in range(vals.shape[1]):
            txt = "n/a" if np.isnan(vals[i, j]) else f"{vals[i, j]:.2f}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                    color="white" if np.isnan(vals[i, j]) or vals[i, j] < 0.6 else "black")
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    ax.set_title("transfer success", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path


def markdown(tm: dict[str, Any], plot: str | None) -> str:
    """The report.md section: the matrix as a table (rows: sources), how it was made, the plot."""
    rows = [{"source \\ target": s, **{t: "n/a" if v is None else fmt(v) for t, v in zip(tm["targets"], row)}}
            for s, row in zip(tm["sources"], tm["success"])]
    a = tm["attack"]
    text = ["\n## Transferability\n\n",
            f"Fraction of each target's clean-correct points (of {tm['n']}) misclassified by adversarials crafted on "
            f"the source: {a['attack']} (I-FGSM, {a['steps']} steps of {a['step_size']:g}, {a['norm']} eps "
            f"{a['eps']:g}, last iterate; LGV collections one member per step). The diagonal is white-box "
            "success.\n\n", md_table(rows)]
    bad = {s: v for s, v in tm["unverified"].items() if v}
    if bad:
        text.append(f"\n**Flag:** adversarials outside the ball / [0, 1], not counted: {bad}\n")
    if plot:
        text.append(f"\n![{plot}]({plot})\n")
    return "".join(text)
