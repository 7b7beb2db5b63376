"""The benchmark's models: loading (names, devices; ``.json`` items are reported rows, skipped),
weight fingerprints for the resume key, and the noise sigma of runs trained for randomized
smoothing (see ``robustkit.app.benchmark``)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from robustkit.app._robustbench import is_reported
from robustkit.errors import InputError
from robustkit.zoo import RobustModel, load, resolve_model_dir

ModelsArg = Sequence[str | Path | RobustModel] | Mapping[str, str | Path | RobustModel]


def display_name(path: Path) -> str:
    """A run's directory name (``runs/x/checkpoints/best`` -> ``x``), else the model directory's."""
    d = resolve_model_dir(path)
    return d.parent.parent.name if d.parent.name == "checkpoints" else d.name


def load_models(models: ModelsArg, device: torch.device | str | None) -> dict[str, tuple[RobustModel, str | None]]:
    """``{unique name: (model in eval mode, source path or None)}``; names are also file names.
    ``.json`` items are RobustBench model_info files, not models: skipped here (their reported rows
    come from ``robustkit.app._robustbench.reported_entries``)."""
    items = list(models.items()) if isinstance(models, Mapping) else [(None, m) for m in models]
    if not items:
        raise InputError("need at least one model (a run or model directory, or a RobustBench model_info .json)")
    items = [(name, m) for name, m in items if not is_reported(m)]
    out: dict[str, tuple[RobustModel, str | None]] = {}
    for i, (name, m) in enumerate(items):
        if isinstance(m, nn.Module):
            model, source = m, None
            name = name or f"{getattr(m, 'arch', 'model')}-{i}"
        else:
            model, source = (load(m) if device is None else load(m, map_location=device)), str(Path(m))
            name = name or display_name(Path(m))
        name = re.sub(r"[^\w.+-]", "_", str(name))
        if device is not None:
            model = model.to(device)
        base, k = name, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out[name] = (model.eval(), source)
    return out


def run_sigma(source: str | None) -> float | None:
    """Noise sigma of the run that produced ``source`` (``defense: {name: noise, params: {sigma}}``)."""
    if source is None:
        return None
    import yaml

    d = resolve_model_dir(source)
    for cand in (Path(source), d.parent.parent, d.parent):
        f = cand / "config.yaml"
        if f.is_file():
            cfg = yaml.safe_load(f.read_text()) or {}
            defense = cfg.get("defense") or {}
            if defense.get("name") == "noise":
                return float((defense.get("params") or {}).get("sigma", 0.25))
            return None
    return None
