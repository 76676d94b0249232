"""Ctrl-C and SIGTERM during training: the first one asks the loop to checkpoint after the current step
and stop; a second one stops at once (the last complete checkpoint is intact either way)."""

from __future__ import annotations

import signal
import threading

__all__ = ["StopSignal"]


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop checkpoints after the current step and stops."""

    def __init__(self):
        self.raised: int | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.raised is not None:  # a second Ctrl-C: stop now (the last checkpoint is intact)
            raise KeyboardInterrupt
        self.raised = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        return False
