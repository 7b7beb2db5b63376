"""Peak memory of a block of code, in MiB.

On CUDA: ``torch.cuda.max_memory_allocated`` above the allocation before the block. On CPU: the peak
resident set size above the level before the block (after ``malloc_trim``), sampled every 2 ms from
/proc/self/statm (tracemalloc does not see torch's allocator). The CPU number is a rough lower
bound: memory the allocator kept from earlier runs is not counted again.
"""

from __future__ import annotations

import os
import threading

import torch

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE
    except OSError:  # not Linux
        return 0


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc) so that RSS growth reflects the next block."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory(device) as mem: ...`` then ``mem.peak_mib``."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mib = device, 0.0
        self._stop = threading.Event()
        self._base = self._peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _malloc_trim()
            self._base = self._peak = _rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = (max(self._peak, _rss()) - self._base) / 2**20
