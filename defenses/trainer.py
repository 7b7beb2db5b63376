"""One training loop for every defense objective.

The ``Trainer`` owns the optimizer, the LR schedule (per step), AMP, channels_last,
gradient clipping, progress bars, per-epoch metrics, checkpoints and resume; the
objective (``defenses.base.Defense``) owns only the loss. It trains from scratch or
from a pretrained model alike (fine-tuning is training with a different schedule).

Resume is exact: the checkpoint holds the weights, optimizer, scheduler, AMP scaler
and RNG states and the position (epoch, batch) in the deterministic loader order, so
an interrupted run continued with ``resume=True`` ends with the same weights as an
uninterrupted one (on the same device).

Under DDP (``model`` a ``DistributedDataParallel`` replica, ``torchrun``): the loader gives
each rank its shard, DDP averages the gradients, so gradient clipping, the AMP scaler's
inf check and the per-step schedule see the same numbers on every rank; the epoch's metrics
(``train_loss`` ...) are averaged over all ranks' batches (one all-reduce per epoch); only the
main process (rank 0) shows progress, evaluates, logs and writes checkpoints. A checkpoint
holds every rank's RNG state and epoch sums (gathered), so ``resume`` is exact under DDP as
well, with the same number of processes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from defenses.base import Defense, StepContext, gather_objects, replicated
from defenses.schedules import Schedule, lr_lambda
from robustkit.data import TensorLoader
from robustkit.errors import InputError
from robustkit.runs import RunDir
from robustkit.validate import integer, number, one_of, positive
from robustkit.zoo import RobustModel, unwrap

Evaluator = Callable[[RobustModel], dict[str, float]]


def make_optimizer(params, name: str = "sgd", lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                   nesterov: bool = False) -> torch.optim.Optimizer:
    name = one_of("optimizer", name, ("sgd", "adam", "adamw"))
    lr, weight_decay = number("lr", lr, 0.0), number("weight_decay", weight_decay, 0.0)
    momentum = number("momentum", momentum, 0.0)
    if nesterov and (name != "sgd" or momentum == 0):
        raise InputError(f"nesterov needs optimizer sgd with momentum > 0, got {name} with momentum {momentum:g}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def check_resume_world(state: dict[str, Any], world_size: int) -> None:
    """``InputError`` unless the trainer ``state`` was written by ``world_size`` processes."""
    saved = int(state.get("world_size", 1))
    if saved != world_size:
        raise InputError(f"resume: the checkpoint was written by {saved} process(es), this run has {world_size}; "
                         f"resume with {saved} (torchrun --nproc_per_node / --nnodes: the batch position and the "
                         "per-rank random states depend on it), or start a new run from checkpoints/last with --model")


class Trainer:
    """Train ``model`` with ``defense`` on ``loader`` for ``epochs``.

    Args:
        model: a ``RobustModel`` (or a DDP wrapper around one), already on its device.
        defense: the objective.
        loader: a ``TensorLoader`` (deterministic order per epoch via ``set_epoch``).
        schedule: LR multiplier by training progress (``defenses.schedules``).
        evaluator: called after each epoch with the model in eval mode; returns metrics
            such as ``clean_accuracy`` / ``robust_accuracy``.
        run: where checkpoints and metrics go (``None``: keep nothing on disk).
        best_by: metric that selects ``checkpoints/best`` (higher is better).
        checkpoint_every: also write ``last`` every N optimizer steps (0: per epoch only).
        is_main: whether this process writes files and shows progress; default: rank 0 of the
            process group (``True`` without one).
    """

    def __init__(self, model: nn.Module, defense: Defense, loader: TensorLoader, *, epochs: int,
                 optimizer: torch.optim.Optimizer, schedule: Schedule, amp: bool = False,
                 channels_last: bool = False, grad_clip: float | None = None, evaluator: Evaluator | None = None,
                 run: RunDir | None = None, best_by: str = "robust_accuracy", checkpoint_every: int = 0,
                 progress: bool = True, is_main: bool | None = None) -> None:
        integer("epochs", epochs, minimum=1)
        integer("checkpoint_every", checkpoint_every, minimum=0)
        if grad_clip is not None:
            positive("grad_clip", grad_clip)
        check = getattr(defense, "check_run", None)
        if callable(check):
            check(epochs)  # e.g. DAFA's warm-up must end before the last epoch
        self.model, self.defense, self.loader, self.epochs = model, defense, loader, epochs
        self.optimizer, self.amp, self.grad_clip = optimizer, amp, grad_clip
        self.evaluator, self.run, self.best_by = evaluator, run, best_by
        if is_main is None:
            is_main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
        self.checkpoint_every, self.progress, self.is_main = checkpoint_every, progress, is_main
        self.ddp = replicated(model)
        self.world_size = torch.distributed.get_world_size() if self.ddp else 1
        self.steps_per_epoch = max(len(loader), 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(schedule, epochs * self.steps_per_epoch))
        self.device = next(unwrap(model).parameters()).device
        self.amp_dtype = torch.bfloat16 if (amp and self.device.type == "cuda" and torch.cuda.is_bf16_supported()) \
            else torch.float16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp and self.device.type == "cuda"
                                           and self.amp_dtype == torch.float16)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.epoch, self.batch, self.step, self.best = 0, 0, 0, -math.inf
        self.history: list[dict[str, Any]] = []
        self._sums: dict[str, torch.Tensor | float] = {}   # this rank's log sums over the epoch so far
        self._n_batches = 0

    # -- state ---------------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        """What differs between DDP ranks: RNG states and the epoch's log sums so far."""
        r: dict[str, Any] = {"rng_cpu": torch.get_rng_state(), "n_batches": self._n_batches,
                             "sums": {k: float(v) for k, v in self._sums.items()}}
        if self.device.type == "cuda":
            r["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return r

    def state(self) -> dict[str, Any]:
        """The resumable state. Under DDP a collective (gathers every rank's RNG state): call it
        on every rank."""
        s: dict[str, Any] = {"epoch": self.epoch, "batch": self.batch, "step": self.step, "best": self.best,
                             "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                             "scaler": self.scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
                             "world_size": self.world_size}
        if torch.cuda.is_available():
            s["rng_cuda"] = torch.cuda.get_rng_state_all()
        s["defense"] = self.defense.state_dict()  # e.g. ADR's EMA teacher (identical on every DDP rank)
        s["ranks"] = gather_objects(self._rank_state()) if self.ddp else [self._rank_state()]
        return s

    def load_state(self, s: dict[str, Any]) -> None:
        check_resume_world(s, self.world_size)
        self.epoch, self.batch, self.step = int(s["epoch"]), int(s["batch"]), int(s["step"])
        self.best = float(s.get("best", -math.inf))
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        if s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        torch.set_rng_state(s["rng_cpu"])
        if "rng_cuda" in s and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(s["rng_cuda"])
        rank = torch.distributed.get_rank() if self.ddp else 0
        mine = s["ranks"][rank] if "ranks" in s else {}
        if mine:
            torch.set_rng_state(mine["rng_cpu"])
            if "rng_cuda" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["rng_cuda"], self.device)
            self._sums, self._n_batches = dict(mine["sums"]), int(mine["n_batches"])
        self.defense.load_state_dict(s.get("defense") or {})

    def _checkpoint(self, name: str = "last") -> None:
        """Write checkpoint ``name`` (main process only), and beside it ``name-SUFFIX`` for each of the
        defense's ``exported_models()`` (e.g. ADR's EMA teacher as ``last-ema``: weights only, the
        resumable copy is in ``state.pt``). A collective under DDP: every rank calls it."""
        if self.run is None:
            return
        state = self.state() if name == "last" else None
        if self.is_main:
            self.run.save_checkpoint(name, unwrap(self.model), state)
            hook = getattr(self.defense, "exported_models", None)
            for suffix, extra in (hook() if callable(hook) else {}).items():
                self.run.save_checkpoint(f"{name}-{suffix}", unwrap(extra))

    # -- the loop ------------------------------------------------------------------
    def fit(self, resume: bool = False) -> list[dict[str, Any]]:
        """Train; returns the per-epoch metric records (also appended to ``metrics.jsonl``)."""
        if resume:
            if self.run is None:
                raise InputError("resume needs a run directory (Trainer(run=RunDir(...)))")
            self.load_state(self.run.load_checkpoint("last", unwrap(self.model)))
            if self.is_main:
                self.run.truncate_metrics(self.epoch)
            self.history = self.run.metrics()
        while self.epoch < self.epochs and not self._stop_requested():
            record = self._train_epoch()
            record.update(self._end_epoch())
            record.update(self._evaluate())
            self.history.append(record)
            self.epoch, self.batch = self.epoch + 1, 0
            improved = record.get(self.best_by, -math.inf) > self.best
            if improved:
                self.best = record[self.best_by]
            if self.run is not None:
                if self.is_main:
                    self.run.log(record)
                self._checkpoint("last")
                if self.is_main and (improved or self.run.checkpoint_dir("best") is None):
                    self._checkpoint("best")
        return self.history

    def _train_epoch(self) -> dict[str, Any]:
        model, loader = self.model, self.loader
        loader.set_epoch(self.epoch)
        model.train()
        t0 = time.perf_counter()
        if self.batch == 0:  # a fresh epoch (resuming mid-epoch keeps the sums of the checkpoint)
            self._sums, self._n_batches = {}, 0
        sums = self._sums
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{self.epochs}",
                   disable=not (self.progress and self.is_main), leave=False, initial=self.batch)
        for b, (x, y) in enumerate(loader):
            if b < self.batch:  # resuming mid-epoch: the order is deterministic, skip what was done
                continue
            ctx = StepContext(self.epoch, self.epochs, self.step, self.steps_per_epoch, self.optimizer)
            logs = self._train_step(x, y, ctx)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + (v.detach().float() if isinstance(v, torch.Tensor) else float(v))
            self._n_batches += 1
            self.step, self.batch = self.step + 1, b + 1
            bar.update(1)
            if self.is_main and self.progress and self._n_batches % 20 == 0:
                bar.set_postfix({k: f"{float(v) / self._n_batches:.3f}" for k, v in sums.items()})
            if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.batch < self.steps_per_epoch:
                self._checkpoint("last")
        bar.close()
        rec: dict[str, Any] = {"epoch": self.epoch, "step": self.step,
                               "lr": self.optimizer.param_groups[0]["lr"], "train_seconds": time.perf_counter() - t0}
        rec.update({f"train_{k}": v for k, v in self._epoch_means().items()})
        return rec

    def _epoch_means(self) -> dict[str, float]:
        """Each log's mean over the epoch's batches, of all ranks under DDP (one all-reduce:
        with equal per-rank batches it is the mean over the global batches)."""
        keys = sorted(self._sums)
        vals = [float(self._sums[k]) for k in keys] + [float(self._n_batches)]
        if self.ddp:
            t = torch.tensor(vals, dtype=torch.float64, device=self.device)    # (len(keys) + 1,)
            torch.distributed.all_reduce(t)
            vals = t.tolist()
        n = max(vals[-1], 1.0)
        return {k: v / n for k, v in zip(keys, vals[:-1])}

    def _train_step(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> dict[str, Any]:
        self.defense.before_loss(self.model, x, y, ctx)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp and self.device.type == "cuda"):
            loss, logs = self.defense.loss(self.model, x, y)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at epoch {ctx.epoch + 1}, step {ctx.step}; "
                                     "lower the learning rate or enable grad_clip")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.defense.after_step(self.model, ctx)
        return logs

    def _end_epoch(self) -> dict[str, Any]:
        """The defense's ``end_epoch(model, ctx) -> metrics`` hook (``Defense.end_epoch``; a wrapper
        forwards to its inner objective), on every rank after the epoch's last step and before the
        evaluation (fast AT's catastrophic-overfitting check may put back earlier weights and ask to
        stop: ``stop_training``)."""
        ctx = StepContext(self.epoch, self.epochs, self.step, self.steps_per_epoch, self.optimizer)
        hook = getattr(self.defense, "end_epoch", None)
        return dict(hook(self.model, ctx)) if callable(hook) else {}

    def _stop_requested(self) -> bool:
        """The defense asks to end training early (``stop_training``: identical on every rank)."""
        return bool(getattr(self.defense, "stop_training", False))

    def _evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        t0 = time.perf_counter()
        out = dict(self.evaluator(unwrap(self.model)))
        out["eval_seconds"] = time.perf_counter() - t0
        return out


def fit(model: RobustModel, defense: Defense, loader: TensorLoader, *, epochs: int,
        optimizer: torch.optim.Optimizer, schedule: Schedule | None = None) -> RobustModel:
    """Train in memory (no run directory, no evaluation, no progress bar) and return ``model`` in
    eval mode: the short trainings of tests and benchmarks, through the same loop as everything else."""
    from defenses.schedules import make_schedule

    Trainer(model, defense, loader, epochs=epochs, optimizer=optimizer, schedule=schedule or make_schedule("constant"),
            progress=False).fit()
    return model.eval()  # type: ignore[return-value]
