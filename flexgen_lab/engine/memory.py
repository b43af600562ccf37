"""Real memory use of the process: peak resident set size above a starting point.

A sampler thread reads /proc/self/statm every few milliseconds, because ru_maxrss is a
lifetime peak that cannot be reset between runs. The tiers' accounted peaks are checked
against this figure.
"""

from __future__ import annotations

import ctypes
import os
import threading

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


class PeakRSS:
    """Context manager: `peak_bytes` = highest RSS seen inside it minus the RSS at entry."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        release_free_heap()  # start from live data, not from heap an earlier run left behind
        self.start_bytes = current_rss_bytes()
        self._peak_abs = self.start_bytes
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._peak_abs = max(self._peak_abs, current_rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak_abs = max(self._peak_abs, current_rss_bytes())
        self.peak_bytes = self._peak_abs - self.start_bytes


def release_free_heap() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), so RSS shows live data only.

    Placing weights makes and frees one part at a time; without this the freed parts of
    mid-sized tensors stay in the process and RSS overstates what the tiers hold.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
