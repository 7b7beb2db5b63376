"""Typed run configuration: YAML -> nested dataclasses, with validation.

- Unknown keys and wrong types are ``ConfigError``s that name the key path
  (``optim.lr: expected float, got 'fast'``).
- Overrides: ``apply_overrides(cfg_dict, ["optim.lr=0.01", "defense.params.beta=6"])``;
  values are parsed as YAML scalars.
- Floats must be finite (no NaN/inf). ``eps`` fields accept ``8/255``-style strings.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
    arch: str | None = None                # built-in / timm / tv: name (see `robustkit models`)
    pretrained: str | None = None          # run dir, model dir, or .pt/.safetensors state dict
    num_classes: int | None = None         # default: from the dataset
    mean: list[float] | None = None
    std: list[float] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
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
    weight_perturbation: str | None = None  # awp | rwp
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


# -- attack and benchmark (``robustkit attack`` / ``robustkit benchmark``) --------------------
def _cfg_check(key: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``; a ``ValueError`` it raises becomes a ``ConfigError`` naming ``key``."""
    try:
        return fn(*args)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _name_list(value: str | list[str], key: str, unique: bool) -> list[str]:
    """``"a,b"`` or ``[a, b]`` -> ``["a", "b"]`` (lower case; ``unique`` drops repeats)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in (str(i).strip().lower() for i in items):
        if item and (not unique or item not in out):
            out.append(item)
    if not out:
        raise ConfigError(f"{key}: needs at least one name, e.g. {key}: [pgd]")
    return out


def _eps_list(value: str | list[str] | None, key: str) -> list[str] | None:
    """``"0,0.1"`` / ``[0, 8/255]`` -> ``["0", "0.1"]``, each a valid eps; ``None`` stays ``None``."""
    if value is None:
        return None
    items = [t.strip() for t in (value.split(",") if isinstance(value, str) else map(str, value)) if t.strip()]
    for t in items:
        _cfg_check(key, parse_eps, t)
    return items


@dataclass
class AttackConfig:
    """``robustkit attack``: one model under an attack or a chain (recipes: ``configs/attack_*.yaml``).

    ``params`` are keyword arguments for the attacks: each goes to every attack of the chain that
    accepts it, and one that no attack accepts is an error. ``eps``: one value or several (a
    robustness curve); ``None`` leaves it to the attack (minimum-norm DeepFool needs none).
    """

    model: str | None = None               # run directory or model directory (required; --model)
    dataset: str = "mnist5k"
    data_root: str | None = None
    download: bool = False
    split: str = "test"                    # test | train
    attack: str | list[str] = "pgd"        # a registered name, or a chain: "pgd,deepfool" / [pgd, deepfool]
    mode: str = "chained"                  # chained (AutoAttack-style) | independent
    norm: str | None = None                # linf | l2 (l1: autoattack); None: each attack's default
    eps: str | list[str] | None = None     # 0.3, "8/255", or a list (robustness curve)
    params: dict[str, Any] = field(default_factory=dict)   # e.g. {steps: 40, restarts: 2, loss: dlr}
    n: int | None = None                   # first n images (None: all)
    batch_size: int = 256
    amp: bool = False
    seed: int = 0
    out: str | None = None                 # default: runs/attack-<attack>
    save_adversarials: bool = False

    def __post_init__(self) -> None:
        from robustkit.threat import parse_norm
        from robustkit.validate import integer, one_of

        self.attack = _name_list(self.attack, "attack", unique=False)
        self.mode = _cfg_check("mode", one_of, "mode", self.mode, ("chained", "independent"))
        self.split = _cfg_check("split", one_of, "split", self.split, ("test", "train"))
        if self.norm is not None:
            self.norm = _cfg_check("norm", parse_norm, self.norm, ("linf", "l2", "l1"))
        self.eps = _eps_list(self.eps, "eps")
        if self.eps is not None and not self.eps:
            raise ConfigError("eps: needs at least one value, e.g. 0.3 or 8/255 or [0, 0.1, 0.2]")
        self.params = {str(k).replace("-", "_"): v for k, v in self.params.items()}
        if self.n is not None:
            _cfg_check("n", integer, "n", self.n, 1)

    @property
    def eps_values(self) -> list[float] | None:
        return None if self.eps is None else [parse_eps(e) for e in self.eps]


@dataclass
class BenchmarkSmoothingConfig:
    n0: int = 100                          # selection samples (Cohen et al. 2019)
    n: int = 10_000                        # estimation samples
    alpha: float = 0.001                   # failure probability of each certificate
    n_images: int | None = None            # images certified (None: min(benchmark n, 100))

    def __post_init__(self) -> None:
        from robustkit.validate import integer, probability

        for key in ("n0", "n") + (("n_images",) if self.n_images is not None else ()):
            _cfg_check(f"smoothing.{key}", integer, key, getattr(self, key), 1)
        _cfg_check("smoothing.alpha", probability, "alpha", self.alpha)


@dataclass
class BenchmarkConfig:
    """``robustkit benchmark``: a leaderboard of models under one threat model (``configs/benchmark_*.yaml``).

    ``attack_params`` holds per-attack keyword overrides (``{pgd: {steps: 20}}``); ``eps_grid`` the
    eps values of the PGD robustness curve (``None``: 5 points up to ``eps``; ``[]`` / ``none``: no curve).
    """

    models: list[str] = field(default_factory=list)   # run / model directories (--models)
    dataset: str = "mnist5k"
    data_root: str | None = None
    download: bool = False
    norm: str = "linf"                     # linf | l2
    eps: str = "0.3"
    n: int = 1000                          # first n test images
    attacks: str | list[str] = field(default_factory=lambda: ["autoattack", "pgd", "deepfool"])
    attack_params: dict[str, Any] = field(default_factory=dict)
    certify: str | list[str] = field(default_factory=list)   # ibp, crown-ibp (L-inf at eps), smoothing (L2)
    sigma: float | None = None             # smoothing noise (None: the run's noise-defense sigma)
    eps_grid: str | list[str] | None = None
    batch_size: int = 256
    seed: int = 0
    smoothing: BenchmarkSmoothingConfig = field(default_factory=BenchmarkSmoothingConfig)
    out: str = "runs/benchmark"

    def __post_init__(self) -> None:
        from robustkit.threat import parse_norm
        from robustkit.validate import integer, positive

        self.norm = _cfg_check("norm", parse_norm, self.norm)
        _cfg_check("eps", parse_eps, self.eps)
        _cfg_check("n", integer, "n", self.n, 1)
        self.attacks = _name_list(self.attacks, "attacks", unique=True)
        self.certify = [] if self.certify in ("", []) else _name_list(self.certify, "certify", unique=True)
        params: dict[str, dict[str, Any]] = {}
        for name, kw in self.attack_params.items():
            if not isinstance(kw, dict):
                raise ConfigError(f"attack_params.{name}: expected a mapping of keyword arguments, got {kw!r}")
            params[str(name).strip().lower()] = {str(k).replace("-", "_"): v for k, v in kw.items()}
        self.attack_params = params
        if self.sigma is not None:
            _cfg_check("sigma", positive, "sigma", self.sigma)
        if isinstance(self.eps_grid, str) and self.eps_grid.strip().lower() in ("none", ""):
            self.eps_grid = []
        self.eps_grid = _eps_list(self.eps_grid, "eps_grid")
        if isinstance(self.smoothing, dict):
            self.smoothing = from_dict(BenchmarkSmoothingConfig, self.smoothing, "smoothing")

    @property
    def eps_value(self) -> float:
        return parse_eps(self.eps)

    @property
    def eps_grid_values(self) -> list[float]:
        """The PGD curve's eps values, sorted (default: 0, eps/4, ..., eps)."""
        e = self.eps_value
        grid = [round(e * k / 4, 8) for k in range(5)] if self.eps_grid is None else map(parse_eps, self.eps_grid)
        return sorted(set(grid))


# -- certify (``robustkit certify``) --------------------------------------------------------
@dataclass
class CertifySmoothingConfig:
    """Randomized smoothing (Cohen et al. 2019): the paper's defaults."""

    sigma: float = 0.25                    # noise level, pixel space (they use 0.12, 0.25, 0.5, 1.0)
    n0: int = 100                          # selection samples per image
    n: int = 100_000                       # estimation samples per image (the maximum, if sequential)
    alpha: float = 0.001                   # failure probability of each certificate
    sequential: bool = False               # anytime-valid early stopping per image
    tol: float | None = None               # sequential: stop when the radius can grow by <= tol (None: sigma/4)


@dataclass
class CertifyBoundsConfig:
    """IBP / CROWN-IBP: radius = the largest certified eps, by bisection on [0, max_eps] to tol."""

    eps: str = "0.1"                       # the threat radius (reported, and the bisection splits at it)
    norm: str = "linf"                     # linf | l2
    tol: float = 1e-3
    max_eps: float = 1.0                   # an L-inf ball of radius 1 already covers the [0, 1] box


@dataclass
class CertifyConfig:
    """``robustkit certify``: certificates of one model on test images (recipes: ``configs/certify_*.yaml``).

    ``method`` is a ``CERTIFIERS`` name; its settings come from ``smoothing`` or ``bounds``.
    Per-image results depend only on (``seed``, image index) and the certifier settings, not on
    ``chunk`` or ``batch_size`` (those only trade memory for speed).
    """

    model: str | None = None               # run directory or model directory (required; --model)
    method: str = "smoothing"              # smoothing | ibp | crown-ibp
    dataset: str = "mnist5k"
    data_root: str | None = None
    download: bool = False
    n_images: int = 100                    # certify the first n_images test images ...
    skip: int = 1                          # ... of every skip-th one
    batch_size: int = 1000                 # noisy rows per forward pass (smoothing) / images per bound pass
    chunk: int | None = None               # images per certifier call and per progress save (None: auto)
    amp: bool = False                      # CUDA autocast (smoothing)
    seed: int = 0
    out: str = "runs/certify"
    smoothing: CertifySmoothingConfig = field(default_factory=CertifySmoothingConfig)
    bounds: CertifyBoundsConfig = field(default_factory=CertifyBoundsConfig)

    def __post_init__(self) -> None:
        from robustkit.threat import parse_norm
        from robustkit.validate import integer

        self.method = str(self.method).strip().lower()
        for key in ("n_images", "skip", "batch_size") + (("chunk",) if self.chunk is not None else ()):
            _cfg_check(key, integer, key, getattr(self, key), 1)
        if isinstance(self.smoothing, dict):
            self.smoothing = from_dict(CertifySmoothingConfig, self.smoothing, "smoothing")
        if isinstance(self.bounds, dict):
            self.bounds = from_dict(CertifyBoundsConfig, self.bounds, "bounds")
        _cfg_check("bounds.eps", parse_eps, self.bounds.eps)
        self.bounds.norm = _cfg_check("bounds.norm", parse_norm, self.bounds.norm, ("linf", "l2"))


# -- conversion -------------------------------------------------------------------------
def _check(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        (inner,) = typing.get_args(tp)
        return [_check(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        for k, v in value.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{path}.{k}: must be finite, got {v}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{path}: must be finite, got {value}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: must be finite, got {value}")
        return str(value)
    raise ConfigError(f"{path}: unsupported type {tp}")  # pragma: no cover


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]!s}; valid keys{' in ' + path if path else ''}: "
                          f"{', '.join(sorted(names))}")
    kwargs = {k: _check(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    obj = cls(**kwargs)
    _validate(obj, path)
    return obj


def _validate(obj: Any, path: str) -> None:
    p = f"{path}." if path else ""
    if isinstance(obj, EvalConfig):
        try:
            parse_eps(obj.eps)
        except ValueError as e:
            raise ConfigError(f"{p}eps: {e}") from None
    for name in ("epochs", "batch_size", "eval_batch_size"):
        v = getattr(obj, name, None)
        if isinstance(v, int) and v < 1:
            raise ConfigError(f"{p}{name}: must be >= 1, got {v}")
    v = getattr(obj, "lr", None)
    if isinstance(v, float) and v < 0:
        raise ConfigError(f"{p}lr: must be >= 0, got {v}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = TrainConfig) -> Any:
    """YAML file (optional) + overrides -> validated dataclass."""
    data = load_yaml(path) if path else {}
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
