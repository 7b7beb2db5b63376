"""Models for the attack benchmark: a briefly trained small CNN (cached) and the pretrained
CIFAR-10 ResNet-18 shipped in PyPI ``pyautoattack`` (examples/model_test.pt)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path
from typing import Any

import torch

from defenses.standard import Standard
from defenses.trainer import fit
from robustkit.data import make_loader
from robustkit.zoo import RobustModel, create, load, load_weights, save


def small_cnn(cache: Path, device: torch.device, arch: str = "ibp-small", epochs: int = 1,
              seed: int = 0) -> tuple[RobustModel, dict[str, Any]]:
    """``arch`` trained ``epochs`` epoch(s) with Adam on mnist5k/train (4,000 images, a few
    seconds); cached in ``cache`` (model.json + model.safetensors + bench_meta.json)."""
    meta = {"arch": arch, "epochs": epochs, "seed": seed, "optimizer": "adam 2e-3, batch 64", "data": "mnist5k/train"}
    meta_file = cache / "bench_meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()).get("config") == meta:
        return load(cache, map_location=device), json.loads(meta_file.read_text())
    torch.manual_seed(seed)
    model = create(arch, num_classes=10, input_shape=(1, 28, 28)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = make_loader("mnist5k", "train", batch_size=64, seed=seed, device=device)
    t0 = time.perf_counter()
    fit(model, Standard(), loader, epochs=epochs, optimizer=opt)
    info = {"config": meta, "train_seconds": time.perf_counter() - t0}
    save(model, cache)
    meta_file.write_text(json.dumps(info, indent=2))
    return model, info


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
    resnet = importlib.util.module_from_spec(mod_spec)
    assert mod_spec.loader is not None
    mod_spec.loader.exec_module(resnet)
    net = resnet.ResNet18()
    state = torch.load(ex / "model_test.pt", map_location="cpu", weights_only=True)
    model = RobustModel(net, "pyautoattack-resnet18", 10, (3, 32, 32), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    load_weights(model, state, source=str(ex / "model_test.pt"))
    return model.to(device).eval(), {"weights": str(ex / "model_test.pt"), "normalization": "none (mean 0, std 1), "
                                     "as in pyautoattack/examples/eval.py"}
