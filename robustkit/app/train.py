"""From a ``TrainConfig`` to a trained run directory: the glue behind ``robustkit train``,
``robustkit finetune`` and the quickstart. Library code: no CLI, no argparse."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

import defenses  # noqa: F401  (registers the objectives)
from defenses.base import Defense
from defenses.schedules import make_schedule
from defenses.trainer import Trainer, make_optimizer
from robustkit.config import TrainConfig, dump_yaml, to_dict
from robustkit.data import Data, TensorLoader, dataset_info, load_data, make_loader
from robustkit.errors import CheckpointError, ConfigError
from robustkit.evaluate import clean_accuracy
from robustkit.registry import ATTACKS, DEFENSES
from robustkit.report import line_plot, md_table, write_markdown, write_results
from robustkit.runs import RunDir
from robustkit.threat import parse_eps
from robustkit.zoo import RobustModel, create, from_pretrained_file, load


def build_model(cfg: TrainConfig, device: torch.device) -> RobustModel:
    """The model of ``cfg.model``: a fresh ``arch`` or a pretrained one (``model.pretrained``)."""
    info = dataset_info(cfg.data.name)
    m = cfg.model
    num_classes = m.num_classes or info.num_classes
    src = m.pretrained
    if src:
        p = Path(src)
        if p.is_file() and p.suffix in (".pt", ".pth", ".bin", ".safetensors") and p.name != "model.safetensors":
            if not m.arch:
                raise ConfigError(f"model.arch is required to load the plain state dict {p}")
            model = from_pretrained_file(p, m.arch, num_classes, info.input_shape, m.mean, m.std, **m.kwargs)
        else:
            model = load(p)
            if m.arch and model.arch != m.arch:
                raise CheckpointError(f"{src}: pretrained model is {model.arch!r}, but the config asks for {m.arch!r}")
    elif not m.arch:
        raise ConfigError("model.arch is required when model.pretrained is not given (see `robustkit models`)")
    else:
        model = create(m.arch, num_classes, info.input_shape, m.mean, m.std, **m.kwargs)
    if tuple(model.input_shape) != tuple(info.input_shape):
        raise ConfigError(f"model input shape {model.input_shape} does not match dataset {cfg.data.name!r} "
                          f"images {info.input_shape}")
    if model.num_classes != num_classes:
        raise ConfigError(f"model has {model.num_classes} classes, dataset {cfg.data.name!r} has {num_classes}")
    return model.to(device)


def build_defense(cfg: TrainConfig) -> Defense:
    d = cfg.defense
    cls = DEFENSES.get(d.name)
    try:
        defense = cls(**d.params)
    except TypeError as e:
        raise ConfigError(f"defense.params for {d.name!r}: {e}") from None
    if d.weight_perturbation:
        wp = DEFENSES.get(d.weight_perturbation)
        try:
            defense = wp(defense, **d.wp_params)
        except TypeError as e:
            raise ConfigError(f"defense.wp_params for {d.weight_perturbation!r}: {e}") from None
    return defense


def make_evaluator(cfg: TrainConfig, device: torch.device, progress: bool = False):
    """Per-epoch clean and attack accuracy on the first ``eval.n`` test images."""
    e = cfg.eval
    data = load_data(cfg.data.name, "test", cfg.data.root, cfg.data.download)
    loader = TensorLoader(Data(data.info, data.images[:e.n], data.labels[:e.n]), cfg.data.eval_batch_size,
                          device=device)
    attack = None
    if e.attack:
        attack = ATTACKS.get(e.attack)(norm=e.norm, eps=parse_eps(e.eps), steps=e.steps)

    def evaluate(model: RobustModel) -> dict[str, float]:
        out = {"clean_accuracy": clean_accuracy(model, loader)["clean_accuracy"]}
        if attack is not None:
            from robustkit.evaluate import robust_accuracy

            r = robust_accuracy(model, loader, attack)
            out["robust_accuracy"] = r["robust_accuracy"]
        return out

    return evaluate


def _dist() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) under torchrun; (0, 1, 0) otherwise."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), ws, int(os.environ.get("LOCAL_RANK", "0"))


def train(cfg: TrainConfig, out: str | Path, device: torch.device, resume: bool = False,
          progress: bool = True) -> RunDir:
    """Train (or fine-tune) per ``cfg`` into run directory ``out``; writes metrics, checkpoints,
    ``results.json``, ``report.md`` and ``plots/training_curves.png``. DDP under ``torchrun``."""
    rank, world, local = _dist()
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.manual_seed(cfg.seed)
    run = RunDir(out)
    if rank == 0:
        run.create(dump_yaml(cfg), resume=resume)
    model = build_model(cfg, device)
    defense = build_defense(cfg)
    loader = make_loader(cfg.data.name, "train", batch_size=cfg.data.batch_size, n=cfg.data.n_train, seed=cfg.seed,
                         augment=cfg.data.augment, data_root=cfg.data.root, download=cfg.data.download,
                         rank=rank, world_size=world, device=device)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    s = cfg.schedule
    knobs: dict[str, Any] = {"warmup": s.warmup_epochs / cfg.epochs, **s.params}
    if s.name == "step":
        knobs.update(milestones=s.milestones, gamma=s.gamma)
    schedule = make_schedule(s.name, **knobs)
    o = cfg.optim
    optimizer = make_optimizer(net.parameters(), o.name, o.lr, o.momentum, o.weight_decay, o.nesterov)
    evaluator = make_evaluator(cfg, device) if rank == 0 else None
    best_by = cfg.eval.best_by if cfg.eval.attack or cfg.eval.best_by != "robust_accuracy" else "clean_accuracy"
    trainer = Trainer(net, defense, loader, epochs=cfg.epochs, optimizer=optimizer, schedule=schedule,
                      amp=cfg.amp, channels_last=cfg.channels_last, grad_clip=cfg.grad_clip, evaluator=evaluator,
                      run=run, best_by=best_by, checkpoint_every=cfg.checkpoint_every,
                      progress=progress, is_main=rank == 0)
    t0 = time.perf_counter()
    history = trainer.fit(resume=resume)
    if rank == 0:
        write_training_report(run, cfg, history, time.perf_counter() - t0)
    return run


def write_training_report(run: RunDir, cfg: TrainConfig, history: list[dict[str, Any]], seconds: float) -> None:
    last = history[-1] if history else {}
    best_key = cfg.eval.best_by if cfg.eval.attack else "clean_accuracy"
    best = max(history, key=lambda r: r.get(best_key, -1.0)) if history else {}
    results = {"kind": "train", "arch": cfg.model.arch, "dataset": cfg.data.name, "defense": cfg.defense.name,
               "weight_perturbation": cfg.defense.weight_perturbation, "epochs": cfg.epochs,
               "seconds_this_invocation": seconds, "train_seconds": sum(r.get("train_seconds", 0) for r in history),
               "final": last, "best": best, "eval": to_dict(cfg.eval), "config": to_dict(cfg)}
    write_results(run.path, results)
    cols = [c for c in ("epoch", "lr", "train_loss", "train_acc", "clean_accuracy", "robust_accuracy",
                        "train_seconds") if any(c in r for r in history)]
    rows = [{**r, "epoch": r["epoch"] + 1} for r in history]
    e = cfg.eval
    attack_txt = f", {e.attack} {e.norm} eps={e.eps}, {e.steps} steps" if e.attack else ""
    text = (f"# Training run `{run.path.name}`\n\n{cfg.model.arch} on {cfg.data.name}, defense `{cfg.defense.name}`"
            f"{' + ' + cfg.defense.weight_perturbation if cfg.defense.weight_perturbation else ''}, "
            f"{cfg.epochs} epochs, schedule `{cfg.schedule.name}`.\n\n"
            f"Evaluation each epoch on the first {cfg.eval.n} test images"
            f"{attack_txt}."
            f"\n\n{md_table(rows, cols)}\n![training curves](plots/training_curves.png)\n")
    write_markdown(run.path, text)
    plot_training(run, history)


def plot_training(run: RunDir, history: list[dict[str, Any]]) -> None:
    if not history:
        return
    ep = [r["epoch"] + 1 for r in history]
    series = {k: (ep, [r[k] for r in history]) for k in ("train_acc", "clean_accuracy", "robust_accuracy")
              if all(k in r for r in history)}
    line_plot(run.plots / "training_curves.png", series, "epoch", "accuracy", title=f"training: {run.path.name}")
