"""Resident memory of this process from /proc (Linux; no psutil), shared by the benchmarks."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Self


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise KeyError(f"/proc/self/status has no {key}")


def rss_mib() -> dict[str, float]:
    """Current and peak resident memory in MiB."""
    return {"rss_mib": round(_status_kib("VmRSS") / 1024, 1), "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1)}


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class AnonPeak:
    """Peak anonymous resident memory (``RssAnon``) while the block runs, sampled by a thread.

    Unlike VmRSS / VmHWM it leaves out file pages: transformers keeps a checkpoint's safetensors mapped
    after loading, several GB at full size, which RSS counts though the tensors live in anonymous memory
    (or on the GPU). A sampler can miss a peak shorter than ``interval``; the optimisation's peaks last
    far longer than 10 ms.
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> Self:
        self.peak_kib = _status_kib("RssAnon")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))

    @property
    def peak_mib(self) -> float:
        return round(self.peak_kib / 1024, 1)


def anon_mib() -> float:
    """Current anonymous resident memory in MiB."""
    return round(_status_kib("RssAnon") / 1024, 1)
