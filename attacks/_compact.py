"""Small device-side helpers of the shared attack loop (``attacks._loop``) and DeepFool:
autocast, input memory format, the one seeded generator, how often to compact, broadcasting."""

from __future__ import annotations

import contextlib

import torch

DEFAULT_SEED = 0   # every seeded attack's default: runs are reproducible unless asked otherwise


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the model's forward: bf16 (fp16 on CUDA GPUs without bf16) on
    ``device``'s type; a no-op when disabled or where the device type has no autocast.

    Input gradients are only used through their direction (sign / L2-normalized), and the
    losses in ``attacks._losses`` cast logits to float32, so no loss scaling is needed.
    """
    if not enabled or not autocast_available(device.type):
        return contextlib.nullcontext()
    dtype = torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    return torch.autocast(device.type, dtype=dtype)


def autocast_available(device_type: str) -> bool:
    """Whether ``torch.autocast`` supports ``device_type`` (torch < 2.4 has no query: cpu and cuda)."""
    query = getattr(torch.amp, "is_autocast_available", None)
    return bool(query(device_type)) if query is not None else device_type in ("cpu", "cuda")


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
    (``nonzero``); on CPU that is free, on an accelerator we let finished samples ride along
    for a few steps instead of stalling the stream every step."""
    return 1 if device.type == "cpu" else 4


def expand_as_image(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(B,)`` -> ``(B, 1, 1, 1)`` (as many trailing ones as ``like`` has dims)."""
    return v.view(-1, *([1] * (like.dim() - 1)))
