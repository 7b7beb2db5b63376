"""Typed run configuration: YAML -> nested dataclasses, with validation.

- Unknown keys and wrong types are ``ConfigError``s that name the key path
  (``optim.lr: expected float, got 'fast'``).
- Overrides: ``apply_overrides(cfg_dict, ["optim.lr=0.01", "defense.params.beta=6"])``;
  values are parsed as YAML scalars.
- Floats must be finite (no NaN/inf). ``eps`` fields accept ``8/255``-style strings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from robustkit import _config_io
from robustkit._config_io import apply_overrides, dump_yaml, from_dict, load_yaml, set_path, to_dict
from robustkit._job_configs import (
    AttackConfig,
    BenchmarkConfig,
    BenchmarkSmoothingConfig,
    CertifyBoundsConfig,
    CertifyConfig,
    CertifySmoothingConfig,
)
from robustkit._train_config import (
    DataConfig,
    DefenseConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = ["AttackConfig", "BenchmarkConfig", "BenchmarkSmoothingConfig", "CertifyBoundsConfig", "CertifyConfig",
           "CertifySmoothingConfig", "DataConfig", "DefenseConfig", "EvalConfig", "ModelConfig", "OptimConfig",
           "ScheduleConfig", "TrainConfig", "apply_overrides", "dump_yaml", "from_dict", "load_config", "load_yaml",
           "set_path", "to_dict"]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls: type = TrainConfig) -> Any:
    """YAML file (optional) + ``key.path=value`` overrides -> validated dataclass ``cls``."""
    return _config_io.load_config(path, overrides, cls)
