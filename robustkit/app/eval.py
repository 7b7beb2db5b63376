"""The ``robustkit eval`` pipeline: clean accuracy of a saved model on a dataset split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from robustkit.data import make_loader
from robustkit.evaluate import clean_accuracy
from robustkit.report import md_table, write_markdown, write_results
from robustkit.zoo import check_compatible, load


def run_eval(model: str | Path, dataset: str, split: str = "test", *, n: int | None = None, batch_size: int = 500,
             out: str | Path | None = None, device: torch.device | str = "cpu", data_root: str | None = None,
             download: bool = False, progress: bool = True) -> dict[str, Any]:
    """Load ``model`` (run or model directory), check it fits ``dataset``, measure clean accuracy on
    the first ``n`` images of ``split``; with ``out``, write ``results.json`` and ``report.md``.
    Returns ``{"model", "arch", "dataset", "split", "n", "clean_accuracy", "seconds"}``."""
    net = load(Path(model), map_location=device)
    loader = make_loader(dataset, split, batch_size=batch_size, n=n, data_root=data_root, download=download,
                         device=device)
    check_compatible(net, loader.info)
    r = clean_accuracy(net, loader, progress=progress)
    res = {"model": str(model), "arch": net.arch, "dataset": dataset, "split": split, "n": r["n"],
           "clean_accuracy": r["clean_accuracy"], "seconds": r["seconds"]}
    if out:
        write_results(out, res)
        write_markdown(out, f"# Evaluation\n\n{md_table([res])}")
    return res
