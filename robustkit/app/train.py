"""The one training pipeline: from a ``TrainConfig`` to a trained run directory. It is what
``robustkit train``, ``robustkit finetune``, the quickstart and the benchmarks run.

    config -> dataset info -> model (fresh ``arch``, a checkpoint, a state dict or a cached
    timm / ``tv:`` model) -> defense objective (+ AWP / RWP) -> LR schedule, optimizer ->
    ``defenses.trainer.Trainer`` -> run directory (config.yaml, metrics, checkpoints,
    results.json, report.md, plots/training_curves.png)

Everything that can reject the input (the run directory, the model and its fit to the
dataset, the objective's and the schedule's parameters, the per-epoch attack) is built
before anything is written. Under ``torchrun`` the model is wrapped in DDP and only rank 0
writes. Library code: no CLI, no argparse.
"""

from __future__ import annotations

import copy
import inspect
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import defenses  # noqa: F401  (registers the objectives)
from defenses.base import Defense
from defenses.schedules import Schedule, make_schedule
from defenses.trainer import Trainer, make_optimizer
from robustkit.app.build import build_attack
from robustkit.config import TrainConfig, dump_yaml, to_dict
from robustkit.data import Data, TensorLoader, dataset_info, load_data, make_loader
from robustkit.errors import CheckpointError, ConfigError
from robustkit.evaluate import clean_accuracy, robust_accuracy
from robustkit.registry import DEFENSES
from robustkit.report import line_plot, md_table, write_markdown, write_results
from robustkit.runs import RunDir
from robustkit.threat import parse_eps
from robustkit.zoo import RobustModel, check_compatible, create, from_pretrained_file, is_arch, load, save

STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _construct(factory: Callable[..., Any], where: str, *args: Any, **params: Any) -> Any:
    """``factory(*args, **params)`` after checking ``params`` against its signature, so a wrong
    key is a ``ConfigError`` naming ``where`` and a ``TypeError`` inside ``factory`` stays a bug."""
    sig = inspect.signature(factory)
    try:
        sig.bind(*args, **params)
    except TypeError as e:
        valid = [n for n, p in sig.parameters.items() if p.kind is p.KEYWORD_ONLY]
        raise ConfigError(f"{where}: {e}; valid keys: {', '.join(valid) or 'none'}") from None
    return factory(*args, **params)


def names_a_model(src: str | None) -> bool:
    """``model.pretrained`` is a timm / ``tv:`` model *name* (not a path): its cached weights."""
    return bool(src) and not Path(src).exists()


def build_model(cfg: TrainConfig, device: torch.device) -> RobustModel:
    """The model of ``cfg.model``: a fresh ``arch``, or ``model.pretrained`` (a run or model
    directory, a plain state dict with ``model.arch``, or a timm / ``tv:`` name whose pretrained
    weights are in the local cache). ``IncompatibleError`` unless it fits the dataset."""
    info = dataset_info(cfg.data.name)
    m = cfg.model
    num_classes = m.num_classes or info.num_classes
    src = m.pretrained
    if not src:
        if not m.arch:
            raise ConfigError("model.arch is required when model.pretrained is not given (see `robustkit models`)")
        model = create(m.arch, num_classes, info.input_shape, m.mean, m.std, **m.kwargs)
    elif names_a_model(src):
        if not is_arch(src):
            raise ConfigError(f"pretrained model not found: {src} (expected a run directory, a model directory with "
                              "model.json + model.safetensors, a .pt/.pth/.safetensors state dict, or a timm / tv: "
                              "model name with locally cached weights)")
        try:
            model = create(src, num_classes, info.input_shape, m.mean, m.std, pretrained=True, **m.kwargs)
        except (RuntimeError, OSError) as e:  # e.g. weights not in the local cache and no internet
            raise ConfigError(f"cannot load the pretrained weights of {src!r}: {str(e).splitlines()[0][:200]}"
                              ) from None
    elif Path(src).is_file() and Path(src).suffix in STATE_DICT_SUFFIXES and Path(src).name != "model.safetensors":
        if not m.arch:
            raise ConfigError(f"model.arch is required to load the plain state dict {src}")
        model = from_pretrained_file(src, m.arch, num_classes, info.input_shape, m.mean, m.std, **m.kwargs)
    else:
        model = load(src)
        if m.arch and model.arch != m.arch:
            raise CheckpointError(f"{src}: pretrained model is {model.arch!r}, but the config asks for {m.arch!r}")
    check_compatible(model, info)
    return model.to(device)


def build_defense(cfg: TrainConfig) -> Defense:
    """The objective ``defense.name(**defense.params)``, wrapped in ``defense.weight_perturbation``."""
    d = cfg.defense
    defense = _construct(DEFENSES.get(d.name), f"defense.params for {d.name!r}", **d.params)
    if d.weight_perturbation:
        wp = DEFENSES.get(d.weight_perturbation)
        defense = _construct(wp, f"defense.wp_params for {d.weight_perturbation!r}", defense, **d.wp_params)
    return defense


def build_schedule(cfg: TrainConfig) -> Schedule:
    """The LR multiplier of ``cfg.schedule`` (warm-up as a fraction of training)."""
    s = cfg.schedule
    knobs: dict[str, Any] = {"warmup": s.warmup_epochs / cfg.epochs, **s.params}
    if s.name == "step":
        knobs.update(milestones=s.milestones, gamma=s.gamma)
    return make_schedule(s.name, **knobs)


def make_evaluator(cfg: TrainConfig, device: torch.device) -> Callable[[RobustModel], dict[str, float]]:
    """Per-epoch clean and (with ``eval.attack``) attack accuracy on the first ``eval.n`` test images."""
    e = cfg.eval
    data = load_data(cfg.data.name, "test", cfg.data.root, cfg.data.download)
    loader = TensorLoader(Data(data.info, data.images[:e.n], data.labels[:e.n]), cfg.data.eval_batch_size,
                          device=device)
    attack = None
    if e.attack:
        attack = build_attack(e.attack, {"steps": e.steps}, norm=e.norm, eps=parse_eps(e.eps))

    def evaluate(model: RobustModel) -> dict[str, float]:
        out = {"clean_accuracy": clean_accuracy(model, loader)["clean_accuracy"]}
        if attack is not None:
            out["robust_accuracy"] = robust_accuracy(model, loader, attack)["robust_accuracy"]
        return out

    return evaluate


def _dist() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) under torchrun; (0, 1, 0) otherwise."""
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), ws, int(os.environ.get("LOCAL_RANK", "0"))


def best_metric(cfg: TrainConfig) -> str:
    """The metric that picks ``checkpoints/best``: ``eval.best_by`` (robust accuracy becomes clean
    accuracy when no per-epoch attack runs)."""
    by = cfg.eval.best_by
    return "clean_accuracy" if by == "robust_accuracy" and not cfg.eval.attack else by


def train(cfg: TrainConfig, out: str | Path, device: torch.device, resume: bool = False,
          progress: bool = True) -> RunDir:
    """Train (or fine-tune) per ``cfg`` into run directory ``out``; writes metrics, checkpoints,
    ``results.json``, ``report.md`` and ``plots/training_curves.png``. DDP under ``torchrun``.
    A timm / ``tv:`` name in ``model.pretrained`` is saved to ``out/pretrained`` and the recorded
    config points there, so the run says exactly which weights it started from."""
    rank, world, local = _dist()
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    run = RunDir(out).check(resume)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, device)
    defense = build_defense(cfg)
    loader = make_loader(cfg.data.name, "train", batch_size=cfg.data.batch_size, n=cfg.data.n_train, seed=cfg.seed,
                         augment=cfg.data.augment, data_root=cfg.data.root, download=cfg.data.download,
                         rank=rank, world_size=world, device=device)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    schedule = build_schedule(cfg)
    o = cfg.optim
    optimizer = make_optimizer(net.parameters(), o.name, o.lr, o.momentum, o.weight_decay, o.nesterov)
    evaluator = make_evaluator(cfg, device) if rank == 0 else None
    start_from = cfg.model.pretrained if names_a_model(cfg.model.pretrained) else None
    if start_from:
        cfg = copy.deepcopy(cfg)
        cfg.model.pretrained, cfg.model.arch = str(run.path / "pretrained"), start_from
    if rank == 0:  # the input is valid: from here on we write
        run.create(dump_yaml(cfg), resume=resume)
        if start_from:
            save(model, run.path / "pretrained")
    trainer = Trainer(net, defense, loader, epochs=cfg.epochs, optimizer=optimizer, schedule=schedule,
                      amp=cfg.amp, channels_last=cfg.channels_last, grad_clip=cfg.grad_clip, evaluator=evaluator,
                      run=run, best_by=best_metric(cfg), checkpoint_every=cfg.checkpoint_every,
                      progress=progress, is_main=rank == 0)
    t0 = time.perf_counter()
    history = trainer.fit(resume=resume)
    if rank == 0:
        write_training_report(run, cfg, history, time.perf_counter() - t0)
    return run


def write_training_report(run: RunDir, cfg: TrainConfig, history: list[dict[str, Any]], seconds: float) -> None:
    """``results.json`` (final and best epoch, the config) and ``report.md`` with the curves."""
    last = history[-1] if history else {}
    best_key = best_metric(cfg)
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
    wp = f" + {cfg.defense.weight_perturbation}" if cfg.defense.weight_perturbation else ""
    text = (f"# Training run `{run.path.name}`\n\n{cfg.model.arch} on {cfg.data.name}, defense `{cfg.defense.name}`"
            f"{wp}, {cfg.epochs} epochs, schedule `{cfg.schedule.name}`.\n\n"
            f"Evaluation each epoch on the first {cfg.eval.n} test images{attack_txt}."
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
