"""Digital corruptions of CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019; ``make_cifar_c.py``),
with CIFAR-C's severity tables; parameters the reference writes as fractions of its 32-px image
size (elastic) scale with the image."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch

from robustkit._corruptions import _ops, _rng
from robustkit._corruptions._base import CORRUPTIONS, level

CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)              # factor towards the per-channel mean
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)            # added to HSV value
# per image size n: displacement scale, displacement smoothness (sigma), affine jitter -- times n
ELASTIC = ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03))
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)            # down-sampling factor (PIL box filter both ways)
JPEG = (80, 65, 58, 50, 40)                         # PIL JPEG quality


@CORRUPTIONS.register("contrast")
def contrast(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Contrast: ``(x - m) c + m`` with ``m`` the per-image, per-channel mean."""
    c = level(CONTRAST, severity)
    m = x.mean(dim=(2, 3), keepdim=True)
    return ((x - m) * c + m).clamp(0, 1)


@CORRUPTIONS.register("brightness")
def brightness(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Brightness: ``c`` added to the HSV value, hue and saturation kept (the reference goes
    through skimage's ``rgb2hsv`` / ``hsv2rgb``; for fixed hue and saturation RGB is linear in
    the value, so this is ``x V' / V``, gray ``V'`` where ``V = 0``; on gray images ``x + c``)."""
    c = level(BRIGHTNESS, severity)
    v = x.amax(dim=1, keepdim=True)                                              # (B, 1, H, W)
    v2 = (v + c).clamp(0, 1)
    scaled = x * (v2 / v.clamp_min(1e-12))
    return torch.where(v > 0, scaled, v2.expand_as(x)).clamp(0, 1)


def _affine_inverse(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """``(B, 2, 3)`` affine maps taking ``dst (B, 3, 2)`` points to ``src (B, 3, 2)`` ((x, y) = (col, row))
    -- the inverse of OpenCV's ``getAffineTransform(src, dst)``, which ``warpAffine`` applies."""
    ones = torch.ones(*dst.shape[:2], 1, dtype=torch.float64, device=dst.device)
    return torch.linalg.solve(torch.cat([dst.double(), ones], 2), src.double()).transpose(1, 2)


@CORRUPTIONS.register("elastic_transform")
def elastic_transform(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Elastic: a random affine warp (three control points jittered by ``U(-j, j)``; OpenCV
    ``warpAffine``, bilinear, mirror borders), then a smooth random displacement field
    (``U(-1, 1)`` blurred with sigma ``s`` (truncate 3, reflect), times ``a``; scipy
    ``map_coordinates`` order 1, reflect)."""
    b, c, h, w = x.shape
    n = h                                             # the reference's IMSIZE (square images)
    a, s, j = (v * n for v in level(ELASTIC, severity))
    dev = x.device
    centre = torch.tensor([h // 2, w // 2], dtype=torch.float64)
    half = min(h, w) // 3
    pts1 = torch.stack([centre + half, torch.stack([centre[0] + half, centre[1] - half]), centre - half])   # (3, 2)
    pts1 = pts1.expand(b, 3, 2).to(dev)
    pts2 = pts1 + _rng.uniform(gens, (3, 2), -j, j, dev).double()
    inv = _affine_inverse(pts1, pts2)                                            # (B, 2, 3)
    rows, cols = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float64),
                                torch.arange(w, device=dev, dtype=torch.float64), indexing="ij")
    src_x = inv[:, 0, 0, None, None] * cols + inv[:, 0, 1, None, None] * rows + inv[:, 0, 2, None, None]
    src_y = inv[:, 1, 0, None, None] * cols + inv[:, 1, 1, None, None] * rows + inv[:, 1, 2, None, None]
    y = _ops.sample_bilinear(x, src_y.to(x.dtype), src_x.to(x.dtype), "mirror")
    field = _rng.uniform(gens, (2, h, w), -1.0, 1.0, dev).to(x.dtype)            # (B, 2, H, W): dx, dy
    field = _ops.gaussian_blur(field, s, mode="reflect", truncate=3.0) * a
    rr, cc = rows.to(x.dtype)[None] + field[:, 1], cols.to(x.dtype)[None] + field[:, 0]
    return _ops.sample_bilinear(y, rr, cc, "reflect").clamp(0, 1)


@CORRUPTIONS.register("pixelate")
def pixelate(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Pixelate: PIL box resize to ``int(n c)`` pixels and back."""
    c = level(PIXELATE, severity)
    h, w = x.shape[-2:]
    small = _ops.box_resize(x, (int(h * c), int(w * c)))
    return _ops.box_resize(small, (h, w)).clamp(0, 1)


@CORRUPTIONS.register("jpeg_compression")
def jpeg_compression(x: torch.Tensor, severity: int, gens: Sequence[torch.Generator]) -> torch.Tensor:
    """JPEG: PIL encode / decode at quality ``q`` (8-bit; RGB, or gray ``L`` for one channel)."""
    from PIL import Image

    q = level(JPEG, severity)
    u8 = (x.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for img in u8:                                                               # (H, W, C)
        buf = io.BytesIO()
        pil = Image.fromarray(img[..., 0], "L") if img.shape[2] == 1 else Image.fromarray(img, "RGB")
        pil.save(buf, "JPEG", quality=q)
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert(pil.mode), dtype=np.uint8)
        out.append(torch.from_numpy(dec.reshape(img.shape).copy()))
    return (torch.stack(out).permute(0, 3, 1, 2).to(x) / 255).clamp(0, 1)
