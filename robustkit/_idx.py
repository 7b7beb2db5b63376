"""IDX files (the MNIST / Fashion-MNIST format, LeCun et al. 1998), read without torchvision.

An IDX file is a 4-byte magic number ``0x00 0x00 <type> <ndim>`` (type ``0x08`` = unsigned
byte, the only type these datasets use), ``ndim`` big-endian uint32 sizes, then the
``prod(sizes)`` values in C order. Files may be gzip-compressed (detected by the gzip magic
bytes, not by the name). Anything else -- another magic number, a wrong number of dimensions,
too few or too many bytes, a broken gzip stream -- is a ``DatasetError`` naming the file.

Fashion-MNIST (Xiao et al. 2017, https://github.com/zalandoresearch/fashion-mnist): the
Debian package ``dataset-fashion-mnist`` installs the four gzipped files under
``/usr/share/datasets/fashion-mnist/``; torchvision keeps them under ``ROOT/FashionMNIST/raw/``.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from robustkit.errors import DatasetError

UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
# the split's file stems: (images, labels)
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """The uint8 array of IDX file ``path`` (gzipped or not), which must have ``ndim`` dimensions."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:   # gzip.BadGzipFile is an OSError
        raise DatasetError(f"{path}: cannot read ({type(e).__name__}: {e}); reinstall the file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != UBYTE or raw[3] != ndim:
        raise DatasetError(f"{path}: not an IDX file of unsigned bytes with {ndim} dimension(s) "
                           f"(magic {raw[:4].hex() or 'missing'}, expected 000008{ndim:02x})")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DatasetError(f"{path}: truncated IDX header ({len(raw)} bytes, need {head})")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape, dtype=np.int64))
    if len(raw) - head != size:
        raise DatasetError(f"{path}: IDX sizes {shape} need {size} data bytes, the file has {len(raw) - head} "
                           f"({'truncated' if len(raw) - head < size else 'trailing bytes'})")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def find_split(dirs: list[Path], split: str) -> tuple[Path, Path] | None:
    """``(images, labels)`` of ``split`` in the first directory of ``dirs`` that holds both files
    (each as ``STEM`` or ``STEM.gz``); ``None`` when none does."""
    for d in dirs:
        found = [next((p for p in (d / stem, d / f"{stem}.gz") if p.is_file()), None) for stem in FILES[split]]
        if found[0] is not None and found[1] is not None:
            return found[0], found[1]
    return None


def load_split(images_path: Path, labels_path: Path, num_classes: int,
               image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 1, H, W)`` uint8 and labels ``(N,)`` int64 from one split's IDX pair, checked:
    ``H, W == image_size``, as many labels as images, every label in ``[0, num_classes)``."""
    images = read_idx(images_path, 3)                # (N, H, W)
    labels = read_idx(labels_path, 1)                # (N,)
    if images.shape[1:] != image_size:
        raise DatasetError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected "
                           f"{image_size[0]}x{image_size[1]}")
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{labels_path}: {labels.shape[0]} labels for the {images.shape[0]} images of "
                           f"{images_path}")
    if labels.size and int(labels.max()) >= num_classes:
        raise DatasetError(f"{labels_path}: label {int(labels.max())} out of range (expected 0..{num_classes - 1})")
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, H, W) uint8, writable
    y = torch.from_numpy(labels.astype(np.int64))    # (N,)
    return x, y
