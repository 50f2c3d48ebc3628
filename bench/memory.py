"""Resident memory of a whole process tree (the service with its ansible-playbook and
its forks), sampled in the background; idle and peak per phase.

RSS is summed over the tree (pages shared between forks count once per process, as
`ps` and the OOM killer's accounting see them); PSS (shared pages split between the
processes sharing them) is sampled too, for the notes.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def _children(pid: int) -> list[int]:
    found = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:  # the process ended while the tree was read
        return found
    for task in tasks:
        with contextlib.suppress(OSError, ValueError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        frontier = [c for p in frontier for c in _children(p)]
        pids += frontier
    return pids


def rss(pid: int) -> int:
    """Bytes resident for `pid` and every descendant (0 for a process that is gone)."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE
    return total


def pss(pid: int) -> int:
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


class Sampler:
    """Samples one process tree every `interval` seconds into the current phase."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.samples: dict[str, list[int]] = {}
        self.pss_peak: dict[str, int] = {}
        self.phase_name = "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        tick = 0
        while not self._stop.wait(self.interval):
            phase = self.phase_name
            self.samples.setdefault(phase, []).append(rss(self.pid))
            if tick % 5 == 0:
                self.pss_peak[phase] = max(self.pss_peak.get(phase, 0), pss(self.pid))
            tick += 1

    @contextlib.contextmanager
    def phase(self, name: str):
        previous, self.phase_name = self.phase_name, name
        self.samples.setdefault(name, []).append(rss(self.pid))
        try:
            yield
        finally:
            self.samples[name].append(rss(self.pid))
            self.phase_name = previous

    def peak(self, name: str) -> float:
        return float(max(self.samples.get(name) or [0]))

    def median(self, name: str) -> float:
        return float(statistics.median(self.samples.get(name) or [0]))

    def overall_peak(self) -> float:
        return float(max((max(v) for v in self.samples.values() if v), default=0))


def idle(sampler: Sampler, seconds: float) -> None:
    """Let the sampler see `seconds` of a quiet process (a deadline, not a guess)."""
    with sampler.phase("idle"):
        deadline = time.monotonic() + seconds
        count = len(sampler.samples.get("idle", []))
        while time.monotonic() < deadline or len(sampler.samples["idle"]) < count + 3:
            time.sleep(sampler.interval)
