"""Common corruptions (``robustkit._corruptions``): fidelity to the reference's library calls, and speed.

    python -m benchmarks.corruptions [--quick] [--device auto] [--threads 1]

1. Fidelity (needs ``pip install opencv-python-headless scikit-image`` -- not robustkit
   dependencies; skipped with a note when missing): every deterministic step of
   Hendrycks & Dietterich's ``make_cifar_c.py`` recomputed with the library the reference calls, on
   the same 32 x 32 RGB input and (for the random ones) the same draws, against ours: scikit-image
   ``gaussian`` (nearest; reflect, truncate 3), the OpenCV defocus disk + ``filter2D``, scipy
   ``zoom`` (``clipped_zoom``), PIL ``BOX`` pixelate, skimage HSV brightness, contrast, OpenCV
   ``warpAffine`` and scipy ``map_coordinates`` (elastic) and glass blur's pixel loop (numpy, as
   written, views included). Reported: max |ours - reference| per check.
2. Speed: corrupted images per second for each corruption (all five severities) on a batch of
   Fashion-MNIST-shaped (1, 28, 28) and CIFAR-shaped (3, 32, 32) random-content images.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch

from benchmarks._common import log, parser, setup, write_results
from robustkit._corruptions import NAMES, _ops, blur, corrupt, digital


def _cmp(ours: torch.Tensor, ref: np.ndarray) -> float:
    o = ours[0].permute(1, 2, 0).numpy() if ours.dim() == 4 else ours.numpy()
    return float(np.abs(o - ref).max())


def _glass_reference(img: np.ndarray, sigma: float, delta: int, iters: int, d: torch.Tensor) -> np.ndarray:
    """make_cifar_c's glass blur loop verbatim in numpy (views included), with the draws ``d``."""
    from skimage.filters import gaussian

    ref = np.uint8(gaussian(img, sigma=sigma, channel_axis=-1) * 255)
    n = img.shape[0]
    for i in range(iters):
        for a, h in enumerate(range(n - delta, delta, -1)):
            for b, w in enumerate(range(n - delta, delta, -1)):
                hp, wp = h + int(d[i, a, b, 1]), w + int(d[i, a, b, 0])
                ref[h, w], ref[hp, wp] = ref[hp, wp], ref[h, w]
    return np.clip(gaussian(ref / 255., sigma=sigma, channel_axis=-1), 0, 1)


def fidelity() -> dict[str, Any]:
    """Max |ours - reference| per check (see the module docstring)."""
    try:
        import cv2
        import skimage as sk
        from PIL import Image
        from scipy.ndimage import map_coordinates
        from scipy.ndimage import zoom as scizoom
        from skimage.filters import gaussian
    except ImportError as e:
        return {"skipped": f"needs opencv-python-headless and scikit-image ({e})"}
    rng = np.random.default_rng(0)
    img = rng.random((32, 32, 3)).astype(np.float32)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous()                 # (1, 3, 32, 32)
    out: dict[str, float] = {}
    for s in (0.4, 1.0):
        out[f"gaussian sigma={s}"] = _cmp(_ops.gaussian_blur(x, s), gaussian(img, sigma=s, channel_axis=-1))
    f = rng.uniform(-1, 1, (32, 32))
    out["gaussian reflect truncate=3 sigma=6.4"] = _cmp(
        _ops.gaussian_blur(torch.from_numpy(f).float()[None, None], 6.4, "reflect", 3.0)[0, 0],
        gaussian(f, 6.4, mode="reflect", truncate=3))
    for sev, (r, a) in enumerate(blur.DEFOCUS, 1):
        t = np.arange(-8, 9)
        xx, yy = np.meshgrid(t, t)
        k = np.array((xx ** 2 + yy ** 2) <= r ** 2, dtype=np.float32)
        k = cv2.GaussianBlur(k / k.sum(), ksize=(3, 3), sigmaX=a)
        ref = np.stack([cv2.filter2D(img[:, :, c], -1, k) for c in range(3)], 2)
        out[f"defocus_blur {sev}"] = _cmp(blur.defocus_blur(x, sev, []), np.clip(ref, 0, 1))
    for z in (1.05, 1.25, 1.75, 2.25):
        ch = int(np.ceil(32 / z))
        top = (32 - ch) // 2
        zz = scizoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
        t = (zz.shape[0] - 32) // 2
        out[f"clipped_zoom {z}"] = _cmp(_ops.clipped_zoom(x, z), zz[t:t + 32, t:t + 32])
    u8 = (img * 255).round().astype(np.uint8)
    xu = torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 255
    for sev, c in enumerate(digital.PIXELATE, 1):
        p = Image.fromarray(u8).resize((int(32 * c), int(32 * c)), Image.BOX).resize((32, 32), Image.BOX)
        out[f"pixelate {sev} (PIL rounds to 8 bits)"] = _cmp(digital.pixelate(xu, sev, []),
                                                             np.asarray(p).astype(np.float32) / 255)
    for sev, c in enumerate(digital.BRIGHTNESS, 1):
        hsv = sk.color.rgb2hsv(img)
        hsv[:, :, 2] = np.clip(hsv[:, :, 2] + c, 0, 1)
        out[f"brightness {sev}"] = _cmp(digital.brightness(x, sev, []), np.clip(sk.color.hsv2rgb(hsv), 0, 1))
    for sev, c in enumerate(digital.CONTRAST, 1):
        m = img.mean(axis=(0, 1), keepdims=True)
        out[f"contrast {sev}"] = _cmp(digital.contrast(x, sev, []), np.clip((img - m) * c + m, 0, 1))
    pts1 = np.float32([[26, 26], [26, 6], [6, 6]])
    pts2 = pts1 + rng.uniform(-2.5, 2.5, size=pts1.shape).astype(np.float32)
    ref = cv2.warpAffine(img, cv2.getAffineTransform(pts1, pts2), (32, 32), borderMode=cv2.BORDER_REFLECT_101)
    inv = digital._affine_inverse(torch.from_numpy(pts1)[None].double(), torch.from_numpy(pts2)[None].double())
    rows, cols = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    sx = inv[0, 0, 0] * cols + inv[0, 0, 1] * rows + inv[0, 0, 2]
    sy = inv[0, 1, 0] * cols + inv[0, 1, 1] * rows + inv[0, 1, 2]
    out["elastic affine (warpAffine)"] = _cmp(_ops.sample_bilinear(x, sy[None].float(), sx[None].float(), "mirror"),
                                              ref)
    dx, dy = rng.uniform(-3, 3, (32, 32)), rng.uniform(-3, 3, (32, 32))
    gx, gy, gz = np.meshgrid(np.arange(32), np.arange(32), np.arange(3))
    idx = (np.reshape(gy + dy[..., None], (-1, 1)), np.reshape(gx + dx[..., None], (-1, 1)), np.reshape(gz, (-1, 1)))
    ref = map_coordinates(img, idx, order=1, mode="reflect").reshape(img.shape)
    out["elastic displacement (map_coordinates)"] = _cmp(
        _ops.sample_bilinear(x, (rows + torch.from_numpy(dy).float())[None],
                             (cols + torch.from_numpy(dx).float())[None], "reflect"), ref)
    for sev, (sigma, delta, iters) in enumerate(blur.GLASS, 1):
        d = torch.randint(-delta, delta, (iters, 32 - 2 * delta, 32 - 2 * delta, 2),
                          generator=torch.Generator().manual_seed(sev))
        out[f"glass_blur {sev} (same draws)"] = _cmp(blur.glass_blur(x, sev, [torch.Generator().manual_seed(sev)]),
                                                     _glass_reference(img, sigma, delta, iters, d))
    return out


def speed(device: torch.device, batch: int, repeats: int) -> dict[str, Any]:
    """Corrupted images per second per corruption (median over ``repeats`` of all five severities)."""
    out: dict[str, Any] = {}
    for shape in ((1, 28, 28), (3, 32, 32)):
        x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0)).to(device)
        seeds = torch.arange(batch)
        row = {}
        for name in NAMES:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                for s in range(1, 6):
                    corrupt(x, name, s, seeds)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
            row[name] = 5 * batch / sorted(times)[len(times) // 2]
        out["x".join(map(str, shape))] = {k: round(v, 1) for k, v in row.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = parser("corruptions", __doc__)
    p.add_argument("--batch-size", type=int, default=None, help="images per call (default 500, quick 100)")
    args = p.parse_args(argv)
    device = setup(args)
    batch = args.batch_size or (100 if args.quick else 500)
    body: dict[str, Any] = {"fidelity_max_abs_diff": fidelity()}
    worst = max((v for v in body["fidelity_max_abs_diff"].values() if isinstance(v, float)), default=None)
    log("corruptions", "fidelity: " + (f"max |diff| {worst:.2e} over all checks" if worst is not None else
                                       body["fidelity_max_abs_diff"]["skipped"]))
    body["images_per_second"] = speed(device, batch, 1 if args.quick else 3)
    body["batch_size"] = batch
    for shape, row in body["images_per_second"].items():
        log("corruptions", f"{shape}: slowest {min(row, key=row.get)} {min(row.values()):.0f} img/s, fastest "
            f"{max(row, key=row.get)} {max(row.values()):.0f} img/s")
    write_results(args.out, "corruptions", body, device=device, args=args, packages=("opencv-python-headless",
                                                                                     "scikit-image", "scipy"))
    log("corruptions", f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
