"""``lgv``: collect LGV surrogates -- weight snapshots along a constant, high-LR SGD run.

Gubri et al., "LGV: Boosting Adversarial Example Transferability from Large Geometric
Vicinity", ECCV 2022 (code ``Framartin/lgv-geometric-transferability``; the clean version is
``torchattacks.LGV``). From a trained model, train ``epochs`` more epochs of plain cross-entropy
SGD at a *constant* learning rate and save ``per_epoch`` snapshots per epoch, evenly spaced in
the epoch. Defaults (the paper's, ImageNet ResNet-50): 10 epochs, lr 0.05, 4 snapshots per epoch
(40 models), SGD momentum 0.9, weight decay 1e-4, batch 256, the dataset's usual augmentation.

The run is the project's ``Trainer`` (``defenses.trainer``) with the ``standard`` objective and
the ``constant`` schedule; a hook after each optimizer step saves the snapshots. Output: ``out/``
holds one model directory per snapshot (``lgv-00`` ..., each loadable with ``robustkit.zoo.load``
and by every command) and ``collection.json`` (format, source, settings, member directories),
which ``load_collection`` turns into an ``attacks.ensemble.ModelCollection`` for ``attacks.lgv``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attacks.ensemble import ModelCollection
from defenses.base import Defense, StepContext
from defenses.schedules import make_schedule
from defenses.standard import Standard
from defenses.trainer import Trainer, make_optimizer
from robustkit.app.sharded_eval import check_output_dir
from robustkit.data import dataset_info, make_loader
from robustkit.errors import CheckpointError, InputError
from robustkit.io import atomic_write_json
from robustkit.validate import integer, number, positive
from robustkit.zoo import RobustModel, check_compatible, load, resolve_model_dir, save, unwrap

FORMAT = "robustkit-lgv/1"
COLLECTION = "collection.json"


class _Snapshots(Defense):
    """Cross-entropy (``inner``) whose ``after_step`` saves the weights at the chosen in-epoch steps."""

    name = "lgv-snapshots"

    def __init__(self, inner: Defense, at: set[int], out: Path, names: list[str]) -> None:
        self.inner, self.at, self.out, self.names = inner, at, out, names

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.inner.loss(model, x, y)

    def after_step(self, model: nn.Module, ctx: StepContext) -> None:
        done = ctx.step + 1 - ctx.epoch * ctx.steps_per_epoch                 # batches done in this epoch
        if done in self.at:
            name = f"lgv-{len(self.names):02d}"
            save(unwrap(model), self.out / name)                               # type: ignore[arg-type]
            self.names.append(name)


def snapshot_steps(steps_per_epoch: int, per_epoch: int) -> set[int]:
    """In-epoch batch counts after which a snapshot is taken: ``per_epoch`` evenly spaced, the last
    at the epoch's end (``InputError`` if the epoch has fewer batches than snapshots)."""
    if per_epoch > steps_per_epoch:
        raise InputError(f"per_epoch={per_epoch} snapshots need at least as many batches per epoch, the loader has "
                         f"{steps_per_epoch}; lower per_epoch or batch_size")
    return {round(steps_per_epoch * (j + 1) / per_epoch) for j in range(per_epoch)}


def collect_lgv(model: str | Path | RobustModel, out: str | Path, *, dataset: str = "mnist5k", epochs: int = 10,
                lr: float = 0.05, per_epoch: int = 4, momentum: float = 0.9, weight_decay: float = 1e-4,
                batch_size: int = 256, augment: str | None = None, n_train: int | None = None, seed: int = 0,
                data_root: str | None = None, download: bool = False, device: torch.device | str | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Collect ``epochs * per_epoch`` LGV snapshots of ``model`` (a run / model directory or a
    ``RobustModel``, not changed) into ``out``; returns the ``collection.json`` record.
    ``InputError`` for bad settings (before anything is written); ``out`` must not hold a collection."""
    epochs, per_epoch = integer("epochs", epochs, 1), integer("per_epoch", per_epoch, 1)
    lr, batch_size = positive("lr", lr), integer("batch_size", batch_size, 1)
    momentum, weight_decay = number("momentum", momentum, 0.0), number("weight_decay", weight_decay, 0.0)
    out = Path(out)
    check_output_dir(out)
    if (out / COLLECTION).exists():
        raise InputError(f"{out / COLLECTION} exists: choose a new --out for another collection")
    source = None if isinstance(model, nn.Module) else str(resolve_model_dir(model).resolve())
    net = copy.deepcopy(model) if isinstance(model, nn.Module) else load(model)
    if not isinstance(net, RobustModel):
        raise InputError(f"LGV needs a RobustModel (saved with robustkit.zoo.save), got {type(net).__name__}")
    if not any(p.requires_grad for p in net.parameters()):
        raise InputError(f"LGV trains the source model's weights, and {net.arch!r} has none to train (a mix "
                         "composite's members are frozen): collect the snapshots of a member instead")
    if device is not None:
        net = net.to(device)
    info = dataset_info(dataset)
    check_compatible(net, info, name="the LGV source model")
    dev = next(net.parameters()).device
    loader = make_loader(dataset, "train", batch_size=batch_size, n=n_train, seed=seed, augment=augment,
                         data_root=data_root, download=download, device=dev)
    at = snapshot_steps(max(len(loader), 1), per_epoch)
    torch.manual_seed(seed)
    names: list[str] = []
    defense = _Snapshots(Standard(), at, out, names)
    optimizer = make_optimizer(net.parameters(), "sgd", lr, momentum, weight_decay)
    out.mkdir(parents=True, exist_ok=True)
    history = Trainer(net, defense, loader, epochs=epochs, optimizer=optimizer, schedule=make_schedule("constant"),
                      progress=progress).fit()
    record = {"format": FORMAT, "source": source, "dataset": dataset, "members": names,
              "settings": {"epochs": epochs, "lr": lr, "per_epoch": per_epoch, "momentum": momentum,
                           "weight_decay": weight_decay, "batch_size": batch_size, "augment": augment,
                           "n_train": n_train, "seed": seed, "schedule": "constant"},
              "lr_per_epoch": [h["lr"] for h in history],
              "train_loss_per_epoch": [h.get("train_loss") for h in history]}
    atomic_write_json(out / COLLECTION, record)
    return record


def is_collection(path: str | Path) -> bool:
    """``path`` is a directory written by ``collect_lgv`` (it holds ``collection.json``)."""
    return (Path(path) / COLLECTION).is_file()


def load_collection(path: str | Path, map_location: str | torch.device = "cpu") -> ModelCollection:
    """The ``ModelCollection`` of an LGV directory (members in collection order)."""
    f = Path(path) / COLLECTION
    try:
        rec = json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{f}: not an LGV collection (no {COLLECTION}; make one with robustkit lgv)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT or not rec.get("members"):
        raise CheckpointError(f"{f}: not a {FORMAT} record with members")
    members = [load(Path(path) / m, map_location=map_location) for m in rec["members"]]
    return ModelCollection(members, name=Path(path).name).eval()
