"""Run directories::

    runs/NAME/
      config.yaml            the resolved config
      metrics.jsonl          one JSON line per epoch (and per eval)
      checkpoints/last/      model.safetensors + model.json + state.pt (optimizer, scheduler, RNG, step)
      checkpoints/best/      model.safetensors + model.json (best by the configured metric)
      results.json  report.md  plots/

Checkpoints are written to a temporary directory and swapped in with renames, so a
``kill -9`` at any moment leaves either the previous or the new checkpoint, never a
mix. ``state.pt`` holds only tensors, numbers and strings and is read back with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from robustkit.errors import CheckpointError
from robustkit.io import atomic_write_text
from robustkit.zoo import RobustModel, load_weights, save


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.ckpt = self.path / "checkpoints"
        self.plots = self.path / "plots"

    def check(self, resume: bool = False) -> RunDir:
        """``CheckpointError`` (before anything is written) when a new run would overwrite an
        existing one, or when ``resume`` finds nothing to resume."""
        has_run = self.checkpoint_dir("last") is not None
        if has_run and not resume:
            raise CheckpointError(f"run directory {self.path} already holds a run; pass --resume to continue it "
                                  "or choose another --out")
        if resume and not has_run:
            raise CheckpointError(f"nothing to resume in {self.path}: no checkpoints/last (run without --resume to "
                                  "start it)")
        if self.path.exists() and not self.path.is_dir():
            raise CheckpointError(f"run directory {self.path} is a file")
        return self

    def create(self, config_yaml: str, resume: bool = False) -> RunDir:
        """Check (see ``check``), then make the directory and write the resolved ``config.yaml``."""
        self.check(resume)
        self.path.mkdir(parents=True, exist_ok=True)
        self.plots.mkdir(exist_ok=True)
        atomic_write_text(self.path / "config.yaml", config_yaml)
        return self

    # -- metrics ---------------------------------------------------------------------
    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    def log(self, record: dict[str, Any]) -> None:
        with open(self.metrics_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        out = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line after a crash
                continue
        return out

    def truncate_metrics(self, before_epoch: int) -> None:
        """Keep only records of epochs ``< before_epoch`` (used on resume)."""
        kept = [r for r in self.metrics() if r.get("epoch", -1) < before_epoch]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))

    # -- checkpoints -----------------------------------------------------------------
    def _swap_in(self, name: str, fill) -> Path:  # fill(tmp_dir) writes the files
        self.ckpt.mkdir(parents=True, exist_ok=True)
        final, old = self.ckpt / name, self.ckpt / f"{name}.old"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=self.ckpt))
        try:
            fill(tmp)
            if old.exists():
                shutil.rmtree(old)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            if old.exists():
                shutil.rmtree(old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def save_checkpoint(self, name: str, model: RobustModel, state: dict[str, Any] | None = None) -> Path:
        def fill(d: Path) -> None:
            save(model, d)
            if state is not None:
                torch.save(state, d / "state.pt")

        return self._swap_in(name, fill)

    def checkpoint_dir(self, name: str) -> Path | None:
        """The directory of checkpoint ``name``, recovering from a crash mid-swap."""
        final, old = self.ckpt / name, self.ckpt / f"{name}.old"
        if (final / "model.json").exists():
            return final
        if (old / "model.json").exists():
            return old
        return None

    def load_checkpoint(self, name: str, model: RobustModel) -> dict[str, Any]:
        """Load weights into ``model`` and return the trainer state of checkpoint ``name``."""
        from safetensors.torch import load_file

        d = self.checkpoint_dir(name)
        if d is None:
            raise CheckpointError(f"no checkpoint {name!r} in {self.ckpt} to resume from")
        spec = json.loads((d / "model.json").read_text())
        if spec.get("arch") != model.arch or spec.get("num_classes") != model.num_classes:
            raise CheckpointError(f"{d}: checkpoint is for {spec.get('arch')!r} with {spec.get('num_classes')} "
                                  f"classes, the config asks for {model.arch!r} with {model.num_classes}")
        try:
            weights = load_file(str(d / "model.safetensors"))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{d / 'model.safetensors'}: corrupt ({e})") from None
        load_weights(model, weights, source=str(d / "model.safetensors"))
        state_file = d / "state.pt"
        if not state_file.exists():
            return {}
        try:
            return torch.load(state_file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{state_file}: corrupt trainer state ({type(e).__name__})") from None
