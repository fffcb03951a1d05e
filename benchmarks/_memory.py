"""Process memory readings from /proc (Linux): current and peak RSS, anonymous RSS sampled in a thread."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from typing_extensions import Self


def _status() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[key] = int(value.split()[0]) * 1024
    return fields


def rss() -> int:
    return _status()["VmRSS"]


def anon_rss() -> int:
    return _status()["RssAnon"]


def peak_rss() -> int:
    return _status()["VmHWM"]


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0); silently a no-op where not permitted."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class AnonPeak:
    """Samples anonymous RSS every ``interval`` seconds while the ``with`` block runs."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, anon_rss())
            time.sleep(self.interval)

    def __enter__(self) -> Self:
        self.peak = anon_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon_rss())
