"""The 15 common corruptions of Hendrycks & Dietterich, "Benchmarking Neural Network Robustness
to Common Corruptions and Perturbations" (ICLR 2019), as batched torch transforms in pixel space.

    from robustkit._corruptions import NAMES, corrupt
    x_c = corrupt(x, "fog", 3, seeds)          # x (B, C, H, W) in [0, 1], seeds (B,) int64 -> (B, C, H, W)

Definitions and severity tables are those of the paper's CIFAR-10-C generator
(hendrycks/robustness, ``ImageNet-C/create_c/make_cifar_c.py``), not ImageNet-C's: the same 15
functions with weaker, small-image parameters (e.g. Gaussian noise std 0.04-0.10 instead of
0.08-0.38). Each library call of the reference (scipy, scikit-image, OpenCV, PIL, ImageMagick's
motion blur) is re-implemented after that library's rule (``_ops``); deviations, all small:

- outputs stay float: the reference stores 8-bit images (``np.uint8`` truncates, up to -1/255);
  8-bit rounding is kept only inside the algorithms where it is part of them (glass blur's
  intermediate, snow's layer, JPEG);
- randomness comes from one torch generator per image (seeded from the run seed and the image's
  dataset index by the caller), so corrupted images are reproducible but not the same draws as
  CIFAR-10-C's numpy ones -- accuracies are comparable to CIFAR-10-C in distribution, not per image;
- one-channel images: colour steps use the image itself as gray (brightness, snow) and the
  ITU-R 601 luma of colour layers (frost);
- images of 16 to 64 px: the few sizes the reference hard-codes to 32 px (glass-blur loop, fog
  crop, frost crop, pixelate size, elastic's fractions) follow the image size.

Why not PyPI ``imagecorruptions`` (1.1.2, the maintained package of Michaelis et al. 2019):
it implements the ImageNet-C severities, rejects images under 32 px, draws from numpy's global
random state one image at a time, depends on OpenCV and scikit-image, and (checked here, with
setuptools 84.2, scikit-image 0.26, numpy 2.4) does not import without ``pkg_resources`` (gone from
current setuptools), and once that is shimmed, glass blur fails (skimage's removed ``multichannel``
argument) and so does fog (numpy 2 removed ``np.float_``). Its frost photographs are bundled (no
downloads); ours are the reference's, see ``robustkit/_data/frost.md``.
"""

from __future__ import annotations

import torch

from robustkit._corruptions import blur, digital, noise, weather  # noqa: F401  (register the corruptions)
from robustkit._corruptions._base import CORRUPTIONS
from robustkit._corruptions._rng import generators
from robustkit.errors import InputError

# the paper's order (noise, blur, weather, digital); RobustBench's names
NAMES = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
         "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
MIN_SIZE, MAX_SIZE = 16, 64


def canonical(name: str) -> str:
    """``"Gaussian-Noise"`` -> ``"gaussian_noise"``; ``InputError`` listing the valid names."""
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if key not in NAMES:
        raise InputError(f"unknown corruption {name!r}; valid corruptions: {', '.join(NAMES)}")
    return key


def check_images(x: torch.Tensor) -> None:
    """``InputError`` unless ``x`` is a float ``(B, C, H, W)`` batch with 1 or 3 channels and
    16..64 px sides (the CIFAR-C parameters are for 32-px images)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"corruptions need a float image batch (B, C, H, W) in [0, 1], got {shape}")
    b, c, h, w = x.shape
    if c not in (1, 3):
        raise InputError(f"corruptions need 1 (gray) or 3 (RGB) channels, got {c}")
    if not (MIN_SIZE <= h <= MAX_SIZE and MIN_SIZE <= w <= MAX_SIZE):
        raise InputError(f"corruptions use the CIFAR-10-C parameters, for images of {MIN_SIZE} to {MAX_SIZE} px; "
                         f"got {h} x {w}")


def corrupt(x: torch.Tensor, name: str, severity: int, seeds: torch.Tensor) -> torch.Tensor:
    """``x (B, C, H, W)`` in [0, 1] corrupted by ``name`` at ``severity`` (0 = unchanged, 1..5),
    image ``i`` drawing all its randomness from ``seeds[i]`` (``(B,)`` int64 >= 0): same shape,
    dtype and device, in [0, 1]. The result for an image depends only on it and its seed."""
    fn = CORRUPTIONS.get(canonical(name))
    if isinstance(severity, bool) or not isinstance(severity, int) or not 0 <= severity <= 5:
        raise InputError(f"severity must be an integer 0..5 (0: clean), got {severity!r}")
    check_images(x)
    seeds = torch.as_tensor(seeds, dtype=torch.int64).reshape(-1)
    if seeds.numel() != x.shape[0]:
        raise InputError(f"need one seed per image: {x.shape[0]} images, {seeds.numel()} seeds")
    if severity == 0 or x.shape[0] == 0:
        return x.clone()
    with torch.no_grad():
        out = fn(x.detach(), severity, generators(seeds))
    return out.to(dtype=x.dtype)
