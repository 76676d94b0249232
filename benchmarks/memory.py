"""Peak memory of a block of code.

On CUDA: ``torch.cuda.max_memory_allocated`` (reset before the block). On CPU, torch's allocations do
not go through Python's allocator, so ``tracemalloc`` cannot see them; instead a sampler thread reads
the process's resident set size (``/proc/self/statm``, or ``ru_maxrss`` where there is no /proc) every
``interval`` seconds while the block runs (torch releases the GIL inside its kernels, so the sampler
keeps running). The reported figure is the peak RSS during the block minus the RSS before it: the
memory the block itself needed on top of what was already resident (models, optimiser state from
earlier steps, the batch). Measure each configuration in a fresh process: freed memory stays in the
allocator's pools, so a second configuration in the same process would read too low.
"""

from __future__ import annotations

import os
import resource
import threading
import time

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except OSError:  # no /proc (macOS): the peak so far is the best we have
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_bytes`` (above the level at entry)."""

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.0005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        self._base = self._max = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._max = max(self._max, rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, rss_bytes())
        self.peak_bytes = self._max - self._base
