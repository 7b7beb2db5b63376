"""Per-image Gaussian noise streams and the batched vote counter of randomized smoothing.

Image ``i`` draws its noise from its own ``torch.Generator`` seeded with ``seeds[i]``, in
pieces whose size depends only on the image shape (``PIECE`` elements), consumed in order
(selection samples, then estimation samples or the sequential rounds). The forward batches
are cut from these pieces regardless of image boundaries, so small ``num`` still packs
several images into one batch -- and an image's votes depend only on its seed and the
certifier's settings: not on ``batch_size``, the other images of the call, or the chunking.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from robustkit.modes import eval_mode

PIECE = 2 ** 21    # noise elements per generator call (8 MiB in float32)


class NoiseStreams:
    """One seeded standard-normal stream per image; ``seeds (B,)`` int64, ``shape`` = (C, H, W)."""

    def __init__(self, seeds: torch.Tensor, device: torch.device, shape: torch.Size,
                 generators: list[torch.Generator] | None = None) -> None:
        self.device, self.shape = device, tuple(shape)
        self.rows = max(1, PIECE // max(1, math.prod(self.shape)))          # rows per generator call
        if generators is None:
            generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds.tolist()]
        self.generators = generators

    def __len__(self) -> int:
        return len(self.generators)

    def subset(self, idx: list[int]) -> NoiseStreams:
        """The streams of images ``idx`` (the same generators: their state carries on)."""
        return NoiseStreams(torch.empty(0), self.device, self.shape, [self.generators[i] for i in idx])

    def draw(self, i: int, num: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        """The next ``num`` rows ``(r, C, H, W)`` of image ``i``'s stream, in pieces of ``self.rows``."""
        for start in range(0, num, self.rows):
            r = min(self.rows, num - start)
            yield torch.randn((r, *self.shape), generator=self.generators[i], device=self.device, dtype=dtype)


@torch.inference_mode()
def count_votes(model: nn.Module, x: torch.Tensor, sigma: float, num: int, num_classes: int, batch_size: int,
                streams: NoiseStreams, amp: bool = False) -> torch.Tensor:
    """Votes ``(B, K)`` int64 of ``model`` on ``num`` noisy copies ``x_i + sigma * z`` of each image
    of ``x (B, C, H, W)`` (not clipped: the noise lives in pixel space, Cohen et al. 2019), with
    ``z`` from ``streams``; forward batches of ``batch_size`` rows, one ``bincount`` per batch."""
    b, k = x.shape[0], num_classes
    counts = torch.zeros(b * k, dtype=torch.long, device=x.device)
    use_amp = amp and x.device.type == "cuda"
    pending: list[torch.Tensor] = []
    owners: list[int] = []
    sizes: list[int] = []

    def flush() -> None:
        if not pending:
            return
        batch = pending[0] if len(pending) == 1 else torch.cat(pending)    # (bs, C, H, W)
        img = torch.tensor(owners, device=x.device).repeat_interleave(torch.tensor(sizes, device=x.device))
        with torch.autocast(x.device.type, enabled=use_amp):
            pred = model(batch).argmax(1)                                   # (bs,)
        counts.add_(torch.bincount(img * k + pred, minlength=b * k))
        pending.clear()
        owners.clear()
        sizes.clear()

    filled = 0
    with eval_mode(model):
        for i in range(b):
            for piece in streams.draw(i, num, x.dtype):
                piece.mul_(sigma).add_(x[i])
                while piece.shape[0]:
                    take = min(batch_size - filled, piece.shape[0])
                    pending.append(piece[:take])
                    owners.append(i)
                    sizes.append(take)
                    piece, filled = piece[take:], filled + take
                    if filled == batch_size:
                        flush()
                        filled = 0
        flush()
    return counts.view(b, k)
