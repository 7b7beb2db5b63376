"""The typed configs of ``robustkit attack``, ``benchmark`` and ``certify``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from robustkit._config_io import from_dict
from robustkit.errors import ConfigError
from robustkit.threat import parse_eps, parse_norm


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
class BenchmarkSparsityConfig:
    """Adversarial sparsity (Olivier & Raj 2023, ``attacks.sparsity``); a mapping turns it on."""

    enabled: bool = True
    n_images: int | None = None            # first images evaluated (None: min(benchmark n, 100))
    directions: int = 64                   # random directions per point (the code's --num-cones)
    search_steps: int = 10                 # bisection steps per direction (--num-search)
    steps: int | None = None               # PGD steps per test (None: 10 L2, 20 L-inf)
    step_size: float | None = None         # None: eps/2 (L2), 0.281 eps (L-inf), as in the code

    def __post_init__(self) -> None:
        from robustkit.validate import integer, positive

        for key in ("directions", "search_steps") + tuple(k for k in ("n_images", "steps")
                                                          if getattr(self, k) is not None):
            _cfg_check(f"sparsity.{key}", integer, key, getattr(self, key), 1)
        if self.step_size is not None:
            _cfg_check("sparsity.step_size", positive, "step_size", self.step_size)


@dataclass
class BenchmarkTransferConfig:
    """Transfer success matrix between the benchmark's models (``robustkit.app._bench_transfer``)."""

    enabled: bool = True
    steps: int = 50                        # I-FGSM iterations on the source (LGV's 50)
    step_size: float | None = None         # None: eps / 10 (LGV's)
    sources: list[str] = field(default_factory=list)   # extra source rows: LGV collections, model dirs

    def __post_init__(self) -> None:
        from robustkit.validate import integer, positive

        _cfg_check("transfer.steps", integer, "steps", self.steps, 1)
        if self.step_size is not None:
            _cfg_check("transfer.step_size", positive, "step_size", self.step_size)


@dataclass
class BenchmarkRejectConfig:
    """CPR selective classification (Chen et al. 2023, ``robustkit reject``'s settings; ``robustkit.app.
    _bench_reject``); a mapping turns it on. The threat model, seed and attack_params are the benchmark's."""

    enabled: bool = True
    n_images: int | None = None            # first images evaluated (None: min(benchmark n, 100))
    preset: str | None = "mnist"           # CPR's defaults: mnist | cifar10 | None (all three below given)
    eps_rej: str | float | None = None     # rejection radius (None: the preset's)
    rej_steps: int | None = None           # CPR's inner attack steps (None: the preset's)
    rej_step_size: float | None = None     # CPR's inner attack step (None: the preset's)
    alphas: list[float] | None = None      # fractions of eps (None: the code's ALPHA_LIST); 0 is always added
    attack: str | list[str] = field(default_factory=lambda: ["pgd"])   # outer attacks on the base model
    steps: int = 20                        # BPDA outer / inner attack steps
    restarts: int = 1
    targets: int | None = None             # BPDA target classes (None: every wrong class)

    def __post_init__(self) -> None:
        from robustkit.validate import integer, number

        self.attack = _name_list(self.attack, "reject.attack", unique=True)
        _cfg_check("reject.steps", integer, "steps", self.steps, 0)
        _cfg_check("reject.restarts", integer, "restarts", self.restarts, 1)
        for key in ("n_images", "rej_steps", "targets"):
            if getattr(self, key) is not None:
                _cfg_check(f"reject.{key}", integer, key, getattr(self, key), 1 if key == "n_images" else 0)
        if self.alphas is not None:
            if not isinstance(self.alphas, list) or not self.alphas:
                raise ConfigError(f"reject.alphas: expected a list of numbers in [0, 1], got {self.alphas!r}")
            self.alphas = [_cfg_check("reject.alphas", number, "alpha", a, 0.0, 1.0) for a in self.alphas]


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
    certify: str | list[str] = field(default_factory=list)   # ibp, crown-ibp, lipschitz; smoothing, dual-smoothing
    sigma: float | None = None             # smoothing noise (None: the run's noise-defense sigma)
    eps_grid: str | list[str] | None = None
    batch_size: int = 256
    seed: int = 0
    smoothing: BenchmarkSmoothingConfig = field(default_factory=BenchmarkSmoothingConfig)
    sparsity: BenchmarkSparsityConfig | bool = False   # true / {directions: 16, ...}: adversarial sparsity
    transfer: BenchmarkTransferConfig | bool = False   # true / {sources: [LGV_DIR]}: transfer matrix
    reject: BenchmarkRejectConfig | bool = False   # true / {steps: 10, ...}: CPR robust accuracy with rejection
    corruptions: str | list[str] | None = None   # common corruptions (all | names) -> corruptions_acc; None: off
    out: str = "runs/benchmark"

    def __post_init__(self) -> None:
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
        for key, cls in (("sparsity", BenchmarkSparsityConfig), ("transfer", BenchmarkTransferConfig),
                         ("reject", BenchmarkRejectConfig)):
            v = getattr(self, key)
            if isinstance(v, bool):
                setattr(self, key, cls(enabled=v))
            elif isinstance(v, dict):
                setattr(self, key, from_dict(cls, v, key))
        if self.corruptions in (None, [], "", "none"):
            self.corruptions = None
        else:
            from robustkit._corruptions_config import corruption_names

            self.corruptions = corruption_names(self.corruptions)

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
class CertifyLipschitzConfig:
    """Lipschitz-margin certificates (``certify.lipschitz``): radius = margin / (sqrt(2) L)."""

    norm: str = "l2"                       # l2 | linf (= the L2 radius / sqrt(d): looser)
    eps: str | None = None                 # the threat radius the report marks (None: none)
    gram_iters: int = 10                   # Gram iterations per layer bound (Delattre et al. 2023)
    pairwise: bool = False                 # also per-class-pair margins of the final Linear (never smaller)


@dataclass
class CertifyConfig:
    """``robustkit certify``: certificates of one model on test images (recipes: ``configs/certify_*.yaml``).

    ``method`` is a ``CERTIFIERS`` name; its settings come from ``smoothing`` or ``bounds``.
    Per-image results depend only on (``seed``, image index) and the certifier settings, not on
    ``chunk`` or ``batch_size`` (those only trade memory for speed).
    """

    model: str | None = None               # run directory or model directory (required; --model)
    method: str = "smoothing"              # smoothing | dual-smoothing | ibp | crown-ibp
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
    lipschitz: CertifyLipschitzConfig = field(default_factory=CertifyLipschitzConfig)

    def __post_init__(self) -> None:
        from robustkit.validate import integer

        self.method = str(self.method).strip().lower()
        for key in ("n_images", "skip", "batch_size") + (("chunk",) if self.chunk is not None else ()):
            _cfg_check(key, integer, key, getattr(self, key), 1)
        if isinstance(self.smoothing, dict):
            self.smoothing = from_dict(CertifySmoothingConfig, self.smoothing, "smoothing")
        if isinstance(self.bounds, dict):
            self.bounds = from_dict(CertifyBoundsConfig, self.bounds, "bounds")
        if isinstance(self.lipschitz, dict):
            self.lipschitz = from_dict(CertifyLipschitzConfig, self.lipschitz, "lipschitz")
        if self.lipschitz.eps is not None:
            _cfg_check("lipschitz.eps", parse_eps, self.lipschitz.eps)
        self.lipschitz.norm = _cfg_check("lipschitz.norm", parse_norm, self.lipschitz.norm, ("l2", "linf"))
        _cfg_check("bounds.eps", parse_eps, self.bounds.eps)
        self.bounds.norm = _cfg_check("bounds.norm", parse_norm, self.bounds.norm, ("linf", "l2"))
