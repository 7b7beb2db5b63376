"""Real CIFAR-10 through the bring-your-own-model path: the 20 CIFAR-10 test images shipped in
PyPI ``foolbox`` (``foolbox/data/cifar10_<i>_<label>.png``) and the pretrained CIFAR-10 ResNet-18
shipped in PyPI ``pyautoattack`` (``examples/resnet.py`` + ``examples/model_test.pt``, a plain
state dict, inputs in [0, 1] without normalization).

Measured on the project's 2-core CPU box (one thread): 20/20 correct; PGD-10 at L-inf 8/255 breaks
20/20 (~4 s); smoothing with sigma=0.01, n0=16, n=100, alpha=0.001 certifies 20/20 at the largest
radius n=100 allows (~0.0154 L2; ~55 s, ``slow``); a one-epoch PGD-AT fine-tune via the CLI ~16 s.
Skipped when foolbox or pyautoattack is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import robustkit
from robustkit.errors import InputError
from robustkit.zoo import RobustModel, from_pretrained_file, load, load_state_dict_file, save

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")  # label order


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)  # locates the package without importing it
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


FOOLBOX, PYAA = _package_dir("foolbox"), _package_dir("pyautoattack")
pytestmark = pytest.mark.skipif(FOOLBOX is None or PYAA is None or not (PYAA / "examples" / "model_test.pt").is_file(),
                                reason="needs PyPI foolbox (its 20 real CIFAR-10 images) and pyautoattack (its "
                                       "pretrained CIFAR-10 ResNet-18): pip install foolbox pyautoattack")
EXAMPLES = PYAA / "examples" if PYAA else Path()
WEIGHTS = EXAMPLES / "model_test.pt"


@pytest.fixture(scope="module")
def cifar() -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    """The 20 files, images ``(20, 3, 32, 32)`` in [0, 1] and labels ``(20,)`` (from the file names)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    files = sorted((FOOLBOX / "data").glob("cifar10_*.png"))
    assert len(files) == 20
    x = torch.stack([pil_to_tensor(Image.open(f).convert("RGB")) for f in files]).float() / 255
    y = torch.tensor([int(f.stem.rsplit("_", 1)[1]) for f in files])
    return files, x, y


@pytest.fixture(scope="module")
def model() -> RobustModel:
    """The pyautoattack ResNet-18 as ``--arch _user_nets:CifarResNet18 --weights model_test.pt`` builds it."""
    return from_pretrained_file(WEIGHTS, "_user_nets:CifarResNet18", 10, (3, 32, 32)).eval()


def test_model_test_pt_is_a_plain_state_dict():
    state = load_state_dict_file(WEIGHTS)  # torch.load(weights_only=True); saved from CUDA, mapped to CPU
    assert len(state) == 122 and "conv1.weight" in state and "linear.weight" in state
    assert not any(k.startswith(("module.", "net.")) for k in state)  # bare classifier keys


def test_wrap_and_arch_path_classify_all_20(cifar, model, monkeypatch, tmp_path):
    _, x, y = cifar
    monkeypatch.syspath_prepend(str(EXAMPLES))  # as a user would: the example's directory on sys.path
    import resnet  # pyautoattack/examples/resnet.py

    net = resnet.ResNet18()
    net.load_state_dict(load_state_dict_file(WEIGHTS))
    wrapped = robustkit.wrap(net.eval(), mean=[0.0] * 3, std=[1.0] * 3, input_shape=(3, 32, 32))
    assert wrapped.num_classes == 10
    with torch.no_grad():
        logits = wrapped(x)
        assert (logits.argmax(1) == y).all()  # 20/20
        torch.testing.assert_close(model(x), logits)  # the --arch path builds the same network
    with pytest.raises(InputError, match="missing a required argument: 'block'"):
        save(wrapped, tmp_path / "m")  # resnet:ResNet needs (block, num_blocks): load() could not rebuild it
    assert not (tmp_path / "m").exists()


def test_pgd_8_255_breaks_every_one(cifar, model):
    from attacks.pgd import PGD

    _, x, y = cifar
    res = PGD(norm="linf", eps="8/255", steps=10)(model, x, y)
    assert res.success.all()
    assert (res.x_adv - x).abs().max() <= 8 / 255 + 1e-6 and res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    with torch.no_grad():
        assert (model(res.x_adv).argmax(1) != y).all()


@pytest.mark.slow
def test_smoothing_certifies_all_20(cifar, model):
    """Not a noise-trained net, so a small sigma: 0.01 (at 0.02 one image abstains, at 0.03 two fail)."""
    from certify.smoothing import SmoothingCertifier

    _, x, y = cifar
    cert = SmoothingCertifier(sigma=0.01, n0=16, n=100, alpha=0.001, batch_size=400)
    c = cert(model, x, seeds=torch.arange(20))
    assert (c.prediction == y).all() and not c.abstained.any()
    assert (c.radius >= 0.014).all() and (c.radius <= cert.max_radius + 1e-9).all()  # measured: all at max ~0.0154


def test_one_epoch_finetune_on_an_imagefolder_via_the_cli(cifar, tmp_path):
    """ImageFolder of the 20 images (train = test); they cover 8 of the 10 classes (no bird, no deer)
    and empty class folders are not a dataset, so the user slices the head to those 8 classes: the
    8-class state dict still classifies all 20 correctly (argmax over a subset that holds the label)."""
    files, x, y = cifar
    for split in ("train", "test"):
        for f, label in zip(files, y.tolist()):
            (tmp_path / "data" / split / CLASSES[label]).mkdir(parents=True, exist_ok=True)
            shutil.copy(f, tmp_path / "data" / split / CLASSES[label])
    present = sorted(set(y.tolist()))
    state = load_state_dict_file(WEIGHTS)
    state["linear.weight"], state["linear.bias"] = state["linear.weight"][present], state["linear.bias"][present]
    torch.save(state, tmp_path / "head8.pt")
    remap = torch.tensor([present.index(c) for c in y.tolist()])
    before = from_pretrained_file(tmp_path / "head8.pt", "_user_nets:CifarResNet18", 8, (3, 32, 32)).eval()
    with torch.no_grad():
        assert (before(x).argmax(1) == remap).all()

    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "robustkit", "finetune", "--arch", "_user_nets:CifarResNet18",
           "--weights", str(tmp_path / "head8.pt"), "--dataset", f"imagefolder:{tmp_path / 'data'}", "--epochs", "1",
           "--batch-size", "10", "--defense", "pgd-at", "--eps", "8/255", "--set", "defense.params.steps=2",
           "--set", "eval.steps=2", "--lr", "0.01", "--device", "cpu", "--out", str(tmp_path / "run")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fine-tuned _user_nets:CifarResNet18 with pgd-at for 1 epochs" in out.stdout
    spec = json.loads((tmp_path / "run" / "checkpoints" / "last" / "model.json").read_text())
    assert (spec["arch"], spec["num_classes"], spec["input_shape"]) == ("_user_nets:CifarResNet18", 8, [3, 32, 32])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics if "clean_accuracy" in m] == [0]
    tuned = load(tmp_path / "run")  # rebuilt from model.json: imports _user_nets, no unpickling
    assert tuned(x).shape == (20, 8)
