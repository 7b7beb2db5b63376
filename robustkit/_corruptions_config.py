"""The typed config of ``robustkit corruptions`` (recipes: ``configs/corruptions_*.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from robustkit.errors import ConfigError


def corruption_names(value: str | list[str] | None, key: str = "corruptions") -> list[str]:
    """``"all"`` / ``None`` -> the 15 of Hendrycks & Dietterich in the paper's order; ``"fog,snow"``
    or ``[fog, snow]`` -> those (canonical names, the paper's order, repeats dropped)."""
    from robustkit._corruptions import NAMES, canonical

    if value is None or (isinstance(value, str) and value.strip().lower() in ("all", "")):
        return list(NAMES)
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    try:
        chosen = {canonical(v) for v in items if v.strip()}
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    if not chosen:
        raise ConfigError(f"{key}: needs at least one corruption name, or all")
    return [n for n in NAMES if n in chosen]


def severity_list(value: str | int | list[int] | None, key: str = "severities") -> list[int]:
    """``"1,3,5"`` / ``[1, 3, 5]`` / ``3`` -> sorted distinct severities, each in 1..5 (``None``: all five)."""
    if value is None:
        return [1, 2, 3, 4, 5]
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    out = set()
    for v in items:
        s = str(v).strip()
        if not s:
            continue
        if not s.lstrip("+").isdigit() or not 1 <= int(s) <= 5:
            raise ConfigError(f"{key}: each severity is an integer 1..5, got {v!r}")
        out.add(int(s))
    if not out:
        raise ConfigError(f"{key}: needs at least one severity in 1..5")
    return sorted(out)


@dataclass
class CorruptionsConfig:
    """``robustkit corruptions``: accuracy of one model under the 15 common corruptions x 5
    severities (Hendrycks & Dietterich 2019, CIFAR-10-C definitions), applied on the fly to the
    first ``n`` test images; CE / mCE against ``baseline`` (a model, or the ``results.json`` of an
    earlier corruptions run with the same dataset, n and seed)."""

    model: str | None = None               # run directory or model directory (required; --model)
    baseline: str | None = None            # mCE reference: model/run directory or results.json
    dataset: str = "mnist5k"
    data_root: str | None = None
    download: bool = False
    n: int = 1000                          # first n test images
    corruptions: str | list[str] = "all"   # all, or names (gaussian_noise, ..., jpeg_compression)
    severities: str | int | list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    batch_size: int = 250                  # images corrupted and classified at once
    amp: bool = False                      # CUDA autocast for the forward passes
    seed: int = 0                          # per image: seed(run seed, corruption, severity, dataset index)
    out: str = "runs/corruptions"

    def __post_init__(self) -> None:
        from robustkit.validate import integer

        self.corruptions = corruption_names(self.corruptions)
        self.severities = severity_list(self.severities)
        for key in ("n", "batch_size"):
            try:
                integer(key, getattr(self, key), 1)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}") from None
        try:
            integer("seed", self.seed, 0)
        except ValueError as e:
            raise ConfigError(f"seed: {e}") from None
