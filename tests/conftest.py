"""Shared fixtures: a tiny MNIST model trained for a few seconds (session-scoped, CPU).

The test session runs torch on one intra-op thread (``ROBUSTKIT_TEST_THREADS`` overrides):
the test models are tiny, and on a small shared CPU box OpenMP's spinning threads made the
attack tests ~5x slower in wall time (measured on this project's 2-core box: 224 s with 2 threads vs 45 s with 1).
"""

from __future__ import annotations

import os

import pytest
import torch

from defenses.standard import Standard
from defenses.trainer import fit
from robustkit.data import Data, TensorLoader, load_data, make_loader
from robustkit.zoo import RobustModel, create


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(int(os.environ.get("ROBUSTKIT_TEST_THREADS", "1")))


def train_tiny_model(n: int = 1000, epochs: int = 1, seed: int = 0, arch: str = "ibp-small") -> RobustModel:
    """``arch`` trained with Adam on ``n`` mnist5k train images, all classes (a seeded random
    subset), about 1-2 s on CPU. Reaches roughly 85-90 % clean
    accuracy on mnist5k/test with the defaults."""
    torch.manual_seed(seed)
    model = create(arch, num_classes=10, input_shape=(1, 28, 28))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    data = load_data("mnist5k", "train")
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n]
    loader = TensorLoader(Data(data.info, data.images[idx], data.labels[idx]), batch_size=32, shuffle=True,
                          seed=seed)
    return fit(model, Standard(), loader, epochs=epochs, optimizer=opt)


@pytest.fixture(scope="session")
def tiny_mnist_model() -> RobustModel:
    """ibp-small trained ~1 epoch on 1,000 mnist5k images. Treat as read-only (do not train it)."""
    return train_tiny_model()


@pytest.fixture(scope="session")
def mnist_test_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """64 mnist5k test images ``(64, 1, 28, 28)`` in [0, 1] and labels ``(64,)``, all classes mixed
    (a fixed seeded shuffle: the split itself is sorted by class)."""
    x, y = next(iter(make_loader("mnist5k", "test", batch_size=64, shuffle=True, seed=0)))
    return x, y
