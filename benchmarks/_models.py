"""Models for the attack benchmark: a briefly trained small CNN (cached, ``_common.cached_model``) and
the pretrained CIFAR-10 ResNet-18 shipped in PyPI ``pyautoattack`` (examples/model_test.pt)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import Recipe, cached_model
from robustkit.zoo import RobustModel, load_weights


def small_cnn(device: torch.device, arch: str = "ibp-small", epochs: int = 1, seed: int = 0
              ) -> tuple[RobustModel, dict[str, Any]]:
    """``arch`` trained ``epochs`` epoch(s) with Adam 2e-3, batch 64, on mnist5k/train (4,000 images,
    a few seconds); cached."""
    recipe = Recipe(f"{arch}-mnist5k", arch, epochs=epochs, lr=2e-3, batch_size=64, seed=seed)
    return cached_model(recipe, device)


def cifar_resnet18(device: torch.device) -> tuple[RobustModel, dict[str, Any]]:
    """The CIFAR-10 ResNet-18 of pyautoattack's examples, as a ``RobustModel``.

    pyautoattack's ``examples/eval.py`` feeds ``transforms.ToTensor()`` images (``[0, 1]``, no
    normalization) to it, so mean 0 / std 1. Weights load with ``torch.load(weights_only=True)``.
    """
    spec = importlib.util.find_spec("pyautoattack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("PyPI package pyautoattack is not installed (pip install pyautoattack)")
    ex = Path(next(iter(spec.submodule_search_locations))) / "examples"
    mod_spec = importlib.util.spec_from_file_location("_pyaa_resnet", ex / "resnet.py")
    if mod_spec is None or mod_spec.loader is None:
        raise FileNotFoundError(f"pyautoattack's example model is missing: {ex / 'resnet.py'}")
    resnet = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(resnet)
    net = resnet.ResNet18()
    state = torch.load(ex / "model_test.pt", map_location="cpu", weights_only=True)
    model = RobustModel(net, "pyautoattack-resnet18", 10, (3, 32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    load_weights(model, state, source=str(ex / "model_test.pt"))
    return model.to(device).eval(), {"weights": str(ex / "model_test.pt"), "normalization": "none (mean 0, std 1), "
                                     "as in pyautoattack/examples/eval.py"}
