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

Under ``torchrun`` (``robustkit.app.shard.setup``: NCCL on CUDA, gloo on CPU, ``cuda:LOCAL_RANK``):

- every rank validates the whole input (run directory, model, objective, data, schedule,
  optimizer, evaluator); if any rank fails, every rank raises the same error and nothing is
  written. Then rank 0 alone writes (config, metrics, checkpoints, report) and evaluates;
- the global batch is ``data.batch_size x WORLD_SIZE``: rank ``r`` takes positions ``r, r + W,
  ...`` of the epoch's permutation, so its ``b``-th batch and the other ranks' together are
  exactly the ``b``-th batch of one process with ``W`` times the batch size. A training set
  whose size is not a multiple of ``W`` loses its last ``n mod W`` samples (so every rank takes
  the same number of equal-sized steps; the loss is then the global mean);
- the model's initial weights are those of rank 0 (DDP broadcasts them); the training RNG
  (random starts, noise) differs per rank: rank 0 keeps the single-process stream, rank ``r``
  is reseeded from ``(seed, r)``;
- batch norm: each rank normalizes its own batch (no SyncBatchNorm), and DDP broadcasts rank
  0's running statistics before every forward, so the saved model holds rank 0's;
- the call returns on every rank after rank 0 has written everything (a barrier), so the
  next stage of a pipeline can read the run directory on any rank.
"""

from __future__ import annotations

import copy
import inspect
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import defenses  # noqa: F401  (registers the objectives)
from defenses.base import Defense
from defenses.schedules import Schedule, make_schedule
from defenses.trainer import Trainer, check_resume_world, make_optimizer
from robustkit import errors
from robustkit._evaluation import per_class
from robustkit.app import shard
from robustkit.app.build import build_attack
from robustkit.config import TrainConfig, dump_yaml, to_dict
from robustkit.data import Data, TensorLoader, dataset_info, load_data, make_loader
from robustkit.errors import CheckpointError, ConfigError, InputError, RobustkitError
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
    kw = {**m.kwargs, "resize": m.resize}  # model.resize: the network's input size, resized inside the model
    src = m.pretrained
    if not src:
        if not m.arch:
            raise ConfigError("model.arch is required when model.pretrained is not given (see `robustkit models`)")
        model = create(m.arch, num_classes, info.input_shape, m.mean, m.std, **kw)
    elif names_a_model(src):
        if not is_arch(src):
            raise ConfigError(f"pretrained model not found: {src} (expected a run directory, a model directory with "
                              "model.json + model.safetensors, a .pt/.pth/.safetensors state dict, or a timm / tv: "
                              "model name with locally cached weights)")
        try:
            model = create(src, num_classes, info.input_shape, m.mean, m.std, pretrained=True, **kw)
        except (RuntimeError, OSError) as e:  # e.g. weights not in the local cache and no internet
            raise ConfigError(f"cannot load the pretrained weights of {src!r}: {str(e).splitlines()[0][:200]}"
                              ) from None
    elif Path(src).is_file() and Path(src).suffix in STATE_DICT_SUFFIXES and Path(src).name != "model.safetensors":
        if not m.arch:
            raise ConfigError(f"model.arch is required to load the plain state dict {src}")
        model = from_pretrained_file(src, m.arch, num_classes, info.input_shape, m.mean, m.std, strict=m.strict, **kw)
    else:
        model = load(src)
        if m.arch and model.arch != m.arch:
            raise CheckpointError(f"{src}: pretrained model is {model.arch!r}, but the config asks for {m.arch!r}")
        have = list(model.resize.size) if model.resize is not None else None
        if m.resize is not None and have != m.resize:
            raise ConfigError(f"{src}: the saved model runs at resize={have}; model.resize={m.resize} cannot change it")
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
    """Per-epoch clean and (with ``eval.attack``) attack accuracy on the first ``eval.n`` test images,
    plus the worst class's: ``worst_class_clean_accuracy`` always (free, from the clean pass) and
    ``worst_class_robust_accuracy`` with an attack (the minimum over the classes present; see
    ``robustkit._evaluation.per_class``)."""
    e = cfg.eval
    data = load_data(cfg.data.name, "test", cfg.data.root, cfg.data.download)
    labels = data.labels[:e.n]                                                 # (n,) int64
    loader = TensorLoader(Data(data.info, data.images[:e.n], data.labels[:e.n]), cfg.data.eval_batch_size,
                          device=device)
    attack = None
    if e.attack:
        attack = build_attack(e.attack, {"steps": e.steps}, norm=e.norm, eps=parse_eps(e.eps))

    def evaluate(model: RobustModel) -> dict[str, float]:
        clean = clean_accuracy(model, loader)
        c = clean["correct"]                                                     # (n,) bool
        out = {"clean_accuracy": clean["clean_accuracy"],
               "worst_class_clean_accuracy": min((r["clean_accuracy"] for r in per_class(labels, c, c)["per_class"]),
                                                 default=0.0)}
        if attack is not None:
            r = robust_accuracy(model, loader, attack)
            out["robust_accuracy"] = r["robust_accuracy"]
            out["worst_class_robust_accuracy"] = r["worst_class_robust_accuracy"]
        return out

    return evaluate


def agree(build: Callable[[], Any]) -> Any:
    """``build()`` on every rank; if it raises on any rank, every rank raises: its own error, or a
    copy of the first failing rank's (a ``RobustkitError`` keeps its type, anything else is a
    bug and becomes a ``RuntimeError``). A collective under torchrun; plain ``build()`` otherwise."""
    if not shard.world().distributed:
        return build()
    try:
        out, failure = build(), None
    except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
        out, failure = None, e
    reports = shard.all_gather(None if failure is None else (type(failure).__name__, str(failure)))
    bad = [(r, rep) for r, rep in enumerate(reports) if rep is not None]
    if not bad:
        return out
    if failure is not None:
        raise failure
    rank, (kind, msg) = bad[0]
    cls = getattr(errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, RobustkitError):
        raise cls(msg)
    raise RuntimeError(f"rank {rank} failed: {kind}: {msg}")


def _even_shards(loader: TensorLoader, world: shard.World) -> TensorLoader:
    """``loader`` with its last ``n mod W`` samples dropped, so every rank's shard has the same size
    (and the same number of steps: DDP hangs otherwise)."""
    n = len(loader.data)
    shard.check_enough(n, "training samples")
    extra = n % world.size
    if not extra:
        return loader
    if world.is_main:
        print(f"robustkit: {n} training samples for {world.size} processes: the last {extra} are left out "
              "so that every rank takes equal batches", file=sys.stderr)
    d = loader.data
    return TensorLoader(Data(d.info, d.images[:n - extra], d.labels[:n - extra]), loader.batch_size,
                        loader.shuffle, loader.seed, loader.augment, loader.drop_last, world.rank, world.size,
                        loader.device)


def resume_state(run: RunDir) -> dict[str, Any]:
    """The trainer state of ``checkpoints/last`` (memory-mapped: only its small fields are read)."""
    d = run.checkpoint_dir("last")
    f = d / "state.pt" if d is not None else None
    if f is None or not f.exists():
        return {}
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{f}: corrupt trainer state ({type(e).__name__})") from None


def rank_seed(seed: int, rank: int) -> int:
    """The training RNG seed of ``rank``: ``seed`` on rank 0 (= one process), distinct per rank."""
    return seed if rank == 0 else (seed * 1_000_003 + 7_919 * rank) % 2**63


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
    world, device = shard.setup(device)
    run = RunDir(out)

    def validated() -> tuple[RobustModel, Defense, TensorLoader, Schedule, Callable | None]:
        run.check(resume)
        if resume:
            check_resume_world(resume_state(run), world.size)
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, device)
        defense = build_defense(cfg)
        if callable(getattr(defense, "check_run", None)):
            defense.check_run(cfg.epochs)  # e.g. DAFA's warm-up must end before the last epoch
        for d in (defense, getattr(defense, "inner", None)):   # an objective that needs a kind of model (denoiser-*)
            if callable(getattr(d, "check_model", None)):
                d.check_model(model)
        if not any(p.requires_grad for p in model.parameters()):
            raise InputError(f"model {cfg.model.arch!r} has no trainable parameters (e.g. a fixed-alpha mix of two "
                             "frozen members): nothing to train; build it with a mixing network or train a member")
        loader = make_loader(cfg.data.name, "train", batch_size=cfg.data.batch_size, n=cfg.data.n_train,
                             seed=cfg.seed, augment=cfg.data.augment, data_root=cfg.data.root,
                             download=cfg.data.download, rank=world.rank, world_size=world.size, device=device)
        o = cfg.optim
        make_optimizer(model.parameters(), o.name, o.lr, o.momentum, o.weight_decay, o.nesterov)  # validates
        evaluator = make_evaluator(cfg, device) if world.is_main else None
        return model, defense, _even_shards(loader, world) if world.distributed else loader, build_schedule(cfg), \
            evaluator

    model, defense, loader, schedule, evaluator = agree(validated)  # every rank, or none, goes on
    net: torch.nn.Module = model
    if world.distributed:
        torch.manual_seed(rank_seed(cfg.seed, world.rank))
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    o = cfg.optim
    optimizer = make_optimizer(net.parameters(), o.name, o.lr, o.momentum, o.weight_decay, o.nesterov)
    start_from = cfg.model.pretrained if names_a_model(cfg.model.pretrained) else None
    if start_from:
        cfg = copy.deepcopy(cfg)
        cfg.model.pretrained, cfg.model.arch = str(run.path / "pretrained"), start_from
    if world.is_main:  # the input is valid on every rank: from here on rank 0 writes
        run.create(dump_yaml(cfg), resume=resume)
        if start_from:
            save(model, run.path / "pretrained")
    trainer = Trainer(net, defense, loader, epochs=cfg.epochs, optimizer=optimizer, schedule=schedule,
                      amp=cfg.amp, channels_last=cfg.channels_last, grad_clip=cfg.grad_clip, evaluator=evaluator,
                      run=run, best_by=best_metric(cfg), checkpoint_every=cfg.checkpoint_every,
                      progress=progress, is_main=world.is_main)
    t0 = time.perf_counter()
    history = trainer.fit(resume=resume)
    if world.is_main:
        write_training_report(run, cfg, history, time.perf_counter() - t0)
    shard.barrier()  # the run directory is complete when any rank returns
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
                        "worst_class_clean_accuracy", "worst_class_robust_accuracy", "train_seconds")
            if any(c in r for r in history)]
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
