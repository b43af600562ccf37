"""Peak anonymous and file-backed resident memory of this process, sampled.

A baseline that maps its offloaded weights (Accelerate reads safetensors through mmap) holds
them as file-backed pages: the kernel may drop them under pressure and read them again, so
they cost differently from the anonymous memory the model computes in. /proc/self/status
reports the two apart (RssAnon, RssFile); a sampler thread keeps the peak of each above the
start, and of their sum (the figure peak_rss_bytes holds for every system).

    >>> with PeakRssSplit() as rss:
    ...     run()
    >>> rss.peak_anon_bytes, rss.peak_file_bytes, rss.peak_bytes
"""

from __future__ import annotations

import threading

from flexgen_lab.engine.memory import release_free_heap

FIELDS = ("RssAnon", "RssFile")


def rss_split_bytes() -> tuple[int, int]:
    """(RssAnon, RssFile) of this process now, in bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in FIELDS:
                values[name] = int(rest.split()[0]) * 1024  # the kernel writes kB (KiB)
    return values["RssAnon"], values["RssFile"]


class PeakRssSplit:
    """Context manager: peaks of RssAnon, RssFile and their sum, each above its value at entry."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak_anon_bytes = self.peak_file_bytes = self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRssSplit:
        release_free_heap()
        self._start = rss_split_bytes()
        self._peaks = [*self._start, sum(self._start)]
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _take(self) -> None:
        anon, file = rss_split_bytes()
        self._peaks = [max(self._peaks[0], anon), max(self._peaks[1], file),
                       max(self._peaks[2], anon + file)]

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._take()
        anon0, file0 = self._start
        self.peak_anon_bytes = self._peaks[0] - anon0
        self.peak_file_bytes = self._peaks[1] - file0
        self.peak_bytes = self._peaks[2] - anon0 - file0
