"""Standard-training speed on mnist5k: seconds per epoch, the data pipeline's share, and the
Trainer's overhead over the bare limit.

Per architecture: epochs of standard training through the project's ``Trainer`` (SGD 0.05, cosine,
batch 128, 4,000 images), against (a) iterating the loader alone and (b) the bare limit measured in
the same run: the same number of forward + backward + SGD steps on one batch already in memory (no
loader, no Trainer bookkeeping). Target (issue: foundation): an epoch of the small CNN on 2 CPU cores
takes seconds, the loader is a small fraction of it (no per-sample Python transforms for in-memory
datasets), and the Trainer stays close to the bare limit.

    python -m benchmarks.training [--quick] [--archs ibp-small,lenet] [--epochs 3] [--device auto]
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks._common import log, median_seconds, parser, setup, write_results
from defenses.schedules import make_schedule
from defenses.standard import Standard
from defenses.trainer import Trainer, make_optimizer
from robustkit.data import make_loader
from robustkit.zoo import create

BATCH = 128


def loader_seconds(augment: str, device: torch.device) -> float:
    loader = make_loader("mnist5k", "train", batch_size=BATCH, augment=augment, device=device)
    t0 = time.perf_counter()
    for _x, _y in loader:
        pass
    return time.perf_counter() - t0


def epoch_seconds(arch: str, epochs: int, device: torch.device) -> list[float]:
    torch.manual_seed(0)
    model = create(arch, 10, (1, 28, 28)).to(device)
    loader = make_loader("mnist5k", "train", batch_size=BATCH, device=device)
    opt = make_optimizer(model.parameters(), "sgd", 0.05)
    trainer = Trainer(model, Standard(), loader, epochs=epochs, optimizer=opt, schedule=make_schedule("cosine"),
                      progress=False)
    return [r["train_seconds"] for r in trainer.fit()]


def bare_epoch_seconds(arch: str, steps: int, device: torch.device, repeats: int) -> float:
    """``steps`` forward + backward + SGD steps on one resident batch: the limit an epoch can reach."""
    torch.manual_seed(0)
    model = create(arch, 10, (1, 28, 28)).to(device).train()
    x, y = next(iter(make_loader("mnist5k", "train", batch_size=BATCH, device=device)))   # (B, 1, 28, 28), (B,)
    opt = make_optimizer(model.parameters(), "sgd", 0.05)

    def epoch() -> None:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

    return median_seconds(epoch, device, repeats, warmup=0)


def main(argv: list[str] | None = None) -> int:
    p = parser("training", __doc__)
    p.add_argument("--archs", default=None, help="comma list (default ibp-small,lenet; quick ibp-small)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per architecture (default 3, quick 2)")
    args = p.parse_args(argv)
    device = setup(args)
    archs = (args.archs or ("ibp-small" if args.quick else "ibp-small,lenet")).split(",")
    epochs = args.epochs or (2 if args.quick else 3)
    n_train = len(make_loader("mnist5k", "train").data)
    steps = math.ceil(n_train / BATCH)
    loader_s = {"none": loader_seconds("none", device), "crop-flip": loader_seconds("crop-flip", device)}
    body: dict[str, Any] = {"dataset": f"mnist5k ({n_train} train images, batch {BATCH})", "epochs": epochs,
                            "loader_seconds_per_epoch": loader_s, "models": {}}
    for arch in archs:
        secs = epoch_seconds(arch, epochs, device)
        best = min(secs)
        bare = bare_epoch_seconds(arch, steps, device, repeats=epochs)
        body["models"][arch] = {"epoch_seconds": secs, "best_epoch_seconds": best, "images_per_second": n_train / best,
                                "loader_share": loader_s["none"] / best, "bare_epoch_seconds": bare,
                                "trainer_over_bare": best / bare}
        log("training", f"{arch}: best epoch {best:.2f}s ({n_train / best:.0f} img/s), bare limit {bare:.2f}s "
            f"(x{best / bare:.2f}), loader share {loader_s['none'] / best:.3f}")
    write_results(args.out, "training", body, device=device, args=args)
    log("training", f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
