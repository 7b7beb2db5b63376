"""Fashion-MNIST from IDX files, offline: the parser on synthetic files (always), the real Debian
files when installed (``apt-get install dataset-fashion-mnist``; skipped otherwise), ``--data-root``
layouts and the error that says how to get the data."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from robustkit import data as data_mod
from robustkit._idx import read_idx
from robustkit.data import FASHION_CLASSES, dataset_info, load_data, make_loader
from robustkit.errors import DatasetError

SYSTEM = data_mod.FASHION_SYSTEM_DIRS[0]
HAVE_DEBIAN = all((SYSTEM / f"{s}.gz").is_file() or (SYSTEM / s).is_file() for s in
                  ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                   "t10k-labels-idx1-ubyte"))
needs_debian = pytest.mark.skipif(not HAVE_DEBIAN, reason=f"full Fashion-MNIST not installed in {SYSTEM} "
                                  "(apt-get install dataset-fashion-mnist)")


def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x000008<ndim>, big-endian sizes, the data."""
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_split(d: Path, split: str, n: int, gz: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    stem = "train" if split == "train" else "t10k"
    for name, arr in ((f"{stem}-images-idx3-ubyte", images), (f"{stem}-labels-idx1-ubyte", labels)):
        raw = idx_bytes(arr)
        (d / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return images, labels


@pytest.fixture
def no_system(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Pretend the Debian package is absent (its directory points at an empty one)."""
    empty = tmp_path / "no-system"
    empty.mkdir()
    monkeypatch.setattr(data_mod, "FASHION_SYSTEM_DIRS", (empty,))
    return empty


# -- the IDX parser, synthetic files ----------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    p = tmp_path / "a.idx"
    p.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))
    out = read_idx(p, 3)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 5) and np.array_equal(out, arr)


@pytest.mark.parametrize("corrupt, match", [
    (lambda b: b"\x00\x00\x09\x03" + b[4:], "not an IDX file"),          # signed-byte type
    (lambda b: b"\x00\x00\x08\x01" + b[4:], "not an IDX file"),          # wrong number of dimensions
    (lambda b: b"\x12\x34" + b[2:], "not an IDX file"),                  # garbage magic
    (lambda b: b[:-7], "truncated"),                                     # short data
    (lambda b: b + b"\x00", "trailing bytes"),                           # extra data
    (lambda b: b[:9], "truncated IDX header"),                           # short header
    (lambda b: b"", "not an IDX file"),                                  # empty file
    (lambda b: gzip.compress(b)[:-12], "cannot read"),                   # broken gzip stream
])
def test_read_idx_rejects_corrupt_files(tmp_path: Path, corrupt, match: str) -> None:
    p = tmp_path / "bad.idx"
    p.write_bytes(corrupt(idx_bytes(np.zeros((4, 28, 28), np.uint8))))
    with pytest.raises(DatasetError, match=match):
        read_idx(p, 3)


@pytest.mark.parametrize("layout", [".", "fashion-mnist", "FashionMNIST/raw"])
@pytest.mark.parametrize("gz", [False, True])
def test_loader_reads_data_root_layouts(tmp_path: Path, no_system: Path, layout: str, gz: bool) -> None:
    d = tmp_path / "root" / layout
    d.mkdir(parents=True)
    images, labels = write_split(d, "test", 30, gz)
    got = load_data("fashion-mnist", "test", data_root=str(tmp_path / "root"))
    assert got.images.shape == (30, 1, 28, 28) and got.images.dtype == torch.uint8
    assert np.array_equal(got.images[:, 0].numpy(), images) and got.labels.tolist() == labels.tolist()
    assert got.info == dataset_info("fashion-mnist") and got.info.classes == FASHION_CLASSES


def test_loader_checks_labels_and_counts(tmp_path: Path, no_system: Path) -> None:
    write_split(tmp_path, "test", 20, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(20, 10, np.uint8)))
    with pytest.raises(DatasetError, match=r"label 10 out of range \(expected 0..9\)"):
        load_data("fashion-mnist", "test", data_root=str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(19, np.uint8)))
    with pytest.raises(DatasetError, match="19 labels for the 20 images"):
        load_data("fashion-mnist", "test", data_root=str(tmp_path))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((19, 32, 32), np.uint8)))
    with pytest.raises(DatasetError, match="images are 32x32, expected 28x28"):
        load_data("fashion-mnist", "test", data_root=str(tmp_path))


def test_absent_data_says_how_to_get_it(tmp_path: Path, no_system: Path) -> None:
    with pytest.raises(DatasetError) as e:
        load_data("fashion-mnist", "train", data_root=str(tmp_path))
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--download" in msg and "--data-root" in msg
    assert str(tmp_path) in msg and str(no_system) in msg and "\n" not in msg


def test_absent_data_is_exit_2_from_the_cli(tmp_path: Path, no_system: Path, capsys) -> None:
    from robustkit.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--model", "ibp-small", "--dataset", "fashion-mnist", "--data-root", str(tmp_path),
               "--epochs", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "apt-get install dataset-fashion-mnist" in err[0]
    assert not out.exists()


# -- the real files (Debian package) -----------------------------------------------------------------------------
@needs_debian
@pytest.mark.parametrize("split, n", [("train", 60_000), ("test", 10_000)])
def test_real_fashion_mnist(split: str, n: int) -> None:
    d = load_data("fashion-mnist", split)
    assert d.images.shape == (n, 1, 28, 28) and d.images.dtype == torch.uint8
    assert d.labels.shape == (n,) and d.labels.dtype == torch.int64
    assert torch.bincount(d.labels, minlength=10).tolist() == [n // 10] * 10
    assert int(d.images.max()) == 255 and int(d.images.min()) == 0 and 0.2 < d.images.float().mean() / 255 < 0.4
    assert d.info.classes == FASHION_CLASSES and d.info.num_classes == 10
    x, y = next(iter(make_loader("fashion-mnist", split, batch_size=64, shuffle=False)))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and 0.0 <= float(x.min()) <= float(x.max()) <= 1
    assert torch.equal(y, d.labels[:64])
