"""Private helpers shared by the white-box attacks: autocast, input formatting, seeded
generators and the active-set bookkeeping of per-sample early exit (index compaction)."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in bf16 (fp16 where the GPU has no bf16) on CUDA; a no-op elsewhere.

    Input gradients are only used through their direction (sign / L2-normalized), and the
    losses in ``attacks._losses`` cast logits to float32, so no loss scaling is needed.
    """
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def fmt_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in channels_last memory format when asked (the model should be converted by the caller)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def make_generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed``; ``None`` (the global RNG) when ``seed`` is None."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def compact_every(device: torch.device) -> int:
    """How often (in steps) the active batch is compacted. Compaction needs one host sync
    (``nonzero``); on CPU that is free, on GPU we let finished samples ride along for a few
    steps instead of stalling the stream every step."""
    return 1 if device.type == "cpu" else 4


def rows(mask_or_idx: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Index every tensor's first dimension with the same index tensor."""
    return [t[mask_or_idx] for t in tensors]


def expand_as_image(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, 1, 1)`` (as many trailing ones as ``like`` has dims)."""
    return v.view(-1, *([1] * (like.dim() - 1)))
