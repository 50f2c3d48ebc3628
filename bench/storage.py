"""What the service keeps on disk: its database (the bytes of its rows and index
entries, from SQLite's dbstat, as the latest commit sees them, WAL included) and its
ansible run artifacts (bytes and files under the data dir)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from bench.stack import BenchStack

SWEEPS_PER_DAY = 24 * 60 // 5  # HEALTH_INTERVAL_MINUTES' default: every 5 minutes


def db_bytes(path: Path) -> int:
    """Payload bytes of every table and index (pages in use where SQLite has no dbstat:
    page granularity, too coarse for what one sweep adds)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        try:
            return conn.execute("SELECT SUM(payload) FROM dbstat").fetchone()[0] or 0
        except sqlite3.OperationalError:
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            size = conn.execute("PRAGMA page_size").fetchone()[0]
            return (pages - free) * size


def tree_size(root: Path) -> tuple[int, int]:
    total = files = 0
    for folder, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
                files += 1
    return total, files


@dataclass
class Snapshot:
    db_bytes: int
    artifact_bytes: int
    artifact_files: int

    def minus(self, other: Snapshot) -> Snapshot:
        return Snapshot(self.db_bytes - other.db_bytes,
                        self.artifact_bytes - other.artifact_bytes,
                        self.artifact_files - other.artifact_files)


def snapshot(stack: BenchStack) -> Snapshot:
    artifact_bytes, artifact_files = tree_size(stack.data_dir / "ansible-runs")
    return Snapshot(db_bytes(stack.database), artifact_bytes, artifact_files)
