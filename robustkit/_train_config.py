"""The typed config of ``robustkit train`` / ``finetune`` and the quickstart (``TrainConfig``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from robustkit import validate
from robustkit.errors import ConfigError, InputError
from robustkit.threat import parse_eps, parse_norm


# -- train (``robustkit train`` / ``finetune``, the quickstart) -----------------------------
def _valid(key: str, check: Any, value: Any, *args: Any, **kw: Any) -> Any:
    """``check(key, value, ...)`` (a ``robustkit.validate`` helper), its ``InputError`` a ``ConfigError``."""
    try:
        return check(key, value, *args, **kw)
    except InputError as e:
        raise ConfigError(str(e)) from None


@dataclass
class ModelConfig:
    arch: str | None = None                # built-in / timm / tv: name, or package.module:ClassName (your class)
    pretrained: str | None = None          # run dir, model dir, or .pt/.safetensors state dict (--weights)
    num_classes: int | None = None         # default: from the dataset
    mean: list[float] | None = None
    std: list[float] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # the architecture's keyword arguments
    resize: int | str | list[int] | None = None  # H, "HxW" or [H, W] -> [H, W]: the network's input size,
    #                                        resized inside the model (--resize)
    strict: bool = True                    # a plain state dict must match every key (--no-strict: partial)

    def __post_init__(self) -> None:
        if not isinstance(self.kwargs, dict):
            raise ConfigError(f"model.kwargs: must be a mapping of keyword arguments, got {self.kwargs!r}")
        own = sorted(set(self.kwargs) & {"num_classes", "input_shape", "mean", "std", "pretrained", "resize"})
        if own:
            raise ConfigError(f"model.kwargs (--arch-kwargs): {own[0]!r} is set by robustkit, not an architecture "
                              f"keyword; use model.{own[0]} (e.g. --set model.{own[0]}=...)")
        if self.resize is not None:
            from robustkit.nets import parse_resize

            self.resize = list(_valid("model.resize (--resize)", lambda k, v: parse_resize(v, k), self.resize))
        if not isinstance(self.strict, bool):
            raise ConfigError(f"model.strict: must be true or false, got {self.strict!r}")
        if self.num_classes is not None:
            _valid("model.num_classes", validate.integer, self.num_classes, 2)
        for key in ("mean", "std"):
            v = getattr(self, key)
            if v is not None and not v:
                raise ConfigError(f"model.{key}: needs one value per input channel, got []")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ConfigError(f"model.std: must be > 0 per channel, got {self.std}")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ConfigError(f"model.mean and model.std need the same length, got {len(self.mean)} and "
                              f"{len(self.std)}")


@dataclass
class DataConfig:
    name: str = "mnist5k"
    root: str | None = None
    download: bool = False
    batch_size: int = 128
    eval_batch_size: int = 500
    n_train: int | None = None             # first n training samples (None: all)
    augment: str | None = None             # None: the dataset's default

    def __post_init__(self) -> None:
        if self.n_train is not None:
            _valid("data.n_train", validate.integer, self.n_train, 1)
        if self.augment is not None:
            self.augment = _valid("data.augment", validate.one_of, self.augment, ("none", "crop-flip"))


@dataclass
class OptimConfig:
    name: str = "sgd"                      # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False

    def __post_init__(self) -> None:
        self.name = _valid("optim.name", validate.one_of, self.name, ("sgd", "adam", "adamw"))
        for key in ("momentum", "weight_decay"):
            _valid(f"optim.{key}", validate.number, getattr(self, key), 0.0)


@dataclass
class ScheduleConfig:
    name: str = "cosine"                   # see defenses.schedules.SCHEDULES
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of training (step)
    gamma: float = 0.1
    params: dict[str, Any] = field(default_factory=dict)  # schedule-specific knobs

    def __post_init__(self) -> None:
        _valid("schedule.warmup_epochs", validate.number, self.warmup_epochs, 0.0)
        for i, m in enumerate(self.milestones):
            _valid(f"schedule.milestones[{i}] (a fraction of training)", validate.number, m, 0.0, 1.0)
        _valid("schedule.gamma", validate.positive, self.gamma)


@dataclass
class DefenseConfig:
    name: str = "standard"
    params: dict[str, Any] = field(default_factory=dict)
    weight_perturbation: str | None = None  # awp | rwp | sam | amp
    wp_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    n: int = 500                           # held-out slice (first n of the test split)
    attack: str | None = "pgd"             # per-epoch robust accuracy; None to skip
    norm: str = "linf"
    eps: str = "0.3"
    steps: int = 10
    best_by: str = "robust_accuracy"       # or clean_accuracy, train_acc (higher is better)

    def __post_init__(self) -> None:
        _valid("eval.n", validate.integer, self.n, 1)
        _valid("eval.steps", validate.integer, self.steps, 0)
        try:
            self.norm = parse_norm(self.norm)
        except InputError as e:
            raise ConfigError(f"eval.norm: {e}") from None
        self.best_by = _valid("eval.best_by", validate.one_of, self.best_by,
                              ("robust_accuracy", "clean_accuracy", "train_acc"))
        try:
            parse_eps(self.eps)
        except ValueError as e:
            raise ConfigError(f"eval.eps: {e}") from None


@dataclass
class TrainConfig:
    epochs: int = 5
    amp: bool = False
    channels_last: bool = False
    grad_clip: float | None = None
    checkpoint_every: int = 0              # also checkpoint every N steps mid-epoch (0: per epoch only)
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _valid("checkpoint_every", validate.integer, self.checkpoint_every, 0)
        if self.grad_clip is not None:
            _valid("grad_clip", validate.positive, self.grad_clip)
        if isinstance(self.schedule, ScheduleConfig) and isinstance(self.epochs, int) \
                and self.schedule.warmup_epochs > self.epochs:
            raise ConfigError(f"schedule.warmup_epochs ({self.schedule.warmup_epochs:g}) must be <= epochs "
                              f"({self.epochs})")
