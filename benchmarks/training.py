"""Standard-training speed on mnist5k: seconds per epoch and the data pipeline's share.

    python benchmarks/training.py [--archs ibp-small,lenet] [--epochs 3] [--threads N] [--out PATH]

Writes JSON (default ``benchmarks/results/training.json``). Target (issue: foundation): an epoch
of the small CNN on 2 CPU cores takes seconds, and iterating the loader alone is a small fraction
of it (no per-sample Python transforms for in-memory datasets).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]  # don't shadow packages
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from defenses.schedules import make_schedule  # noqa: E402
from defenses.standard import Standard  # noqa: E402
from defenses.trainer import Trainer, make_optimizer  # noqa: E402
from robustkit.data import make_loader  # noqa: E402
from robustkit.zoo import create  # noqa: E402


def loader_seconds(augment: str) -> float:
    loader = make_loader("mnist5k", "train", batch_size=128, augment=augment)
    t0 = time.perf_counter()
    for _x, _y in loader:
        pass
    return time.perf_counter() - t0


def epoch_seconds(arch: str, epochs: int) -> list[float]:
    torch.manual_seed(0)
    model = create(arch, 10, (1, 28, 28))
    loader = make_loader("mnist5k", "train", batch_size=128)
    opt = make_optimizer(model.parameters(), "sgd", 0.05)
    trainer = Trainer(model, Standard(), loader, epochs=epochs, optimizer=opt, schedule=make_schedule("cosine"),
                      progress=False)
    hist = trainer.fit()
    return [r["train_seconds"] for r in hist]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default="ibp-small,lenet")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "training.json"))
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    res: dict = {"benchmark": "training", "dataset": "mnist5k (4000 train images, batch 128)",
                 "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
                 "loader_seconds_per_epoch": {"none": loader_seconds("none"), "crop-flip": loader_seconds("crop-flip")},
                 "models": {}}
    for arch in a.archs.split(","):
        secs = epoch_seconds(arch, a.epochs)
        best = min(secs)
        res["models"][arch] = {"epoch_seconds": secs, "best_epoch_seconds": best,
                               "images_per_second": 4000 / best,
                               "loader_share": res["loader_seconds_per_epoch"]["none"] / best}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
