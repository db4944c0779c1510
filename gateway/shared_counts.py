"""The shared memory behind the per-address counts (`gateway.core.peers`).

`optgate serve` makes it once, before any worker starts: an anonymous file (``memfd``; on
a system without it, an unlinked file under the data dir) sized for one column per
worker, mapped shared. Each worker inherits its descriptor and maps the same pages, so the
SMTP and HTTPS caps and the login throttle count a client address once across all
workers. Nothing of it is ever on disk by name, and it ends with the last process holding
it.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gateway.core.peers import Counts, size_in_cells


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedCounts:
    """A mapping of the table; `fd` is what a worker process inherits."""

    fd: int
    mapping: mmap.mmap

    def view(self, column: int) -> Counts:
        return Counts(memoryview(self.mapping).cast("q"), column)

    def close(self) -> None:
        # Views handed out keep the mapping alive; only the descriptor is ours to close.
        os.close(self.fd)


def create(columns: int, data_dir: Path) -> SharedCounts:
    """A fresh, formatted table with `columns` columns."""
    size = 8 * size_in_cells(columns)
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("optgate-counts", 0)  # close-on-exec: handed down explicitly
    else:  # pragma: no cover - Linux has memfd
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".counts-", dir=data_dir)
        os.unlink(name)
    os.ftruncate(fd, size)  # zero-filled; pages are only allocated once written
    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    Counts.format(memoryview(mapping).cast("q"), columns)
    return SharedCounts(fd=fd, mapping=mapping)


def attach(fd: int) -> SharedCounts:
    """The table made by `create` in the supervisor, from the descriptor it handed down."""
    size = os.fstat(fd).st_size
    mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return SharedCounts(fd=fd, mapping=mapping)
