"""An in-process gateway's audit writer made to fail at its IO seam (the fsync), and healed.

The writer calls its disk's fsync function on its own thread after writing each batch; an
`OSError` there is what a full or failing disk gives. `fail()` makes it raise (for every
batch, or only for batches whose bytes `when` picks); `heal()` gives the real fsync back
and reopens the writer if the failure closed it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

from gateway.audit.writer import AuditWriter

# Enough to hold one batch of a few entries (an entry is well under 1 KiB).
TAIL_BYTES = 16 * 1024


def _tail(fd: int) -> bytes:
    """The last bytes of the file behind `fd` (b"" for the directory's fsync)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        return b""
    start = max(info.st_size - TAIL_BYTES, 0)
    # The writer's descriptor is write-only: read the same file through another one.
    with open(f"/proc/self/fd/{fd}", "rb") as f:
        f.seek(start)
        return f.read()


class FailingAuditDisk:
    def __init__(self, writer: AuditWriter | None) -> None:
        assert writer is not None
        self.writer = writer
        self._disk = writer._disk
        self._real = self._disk._fsync_fn

    def fail(self, when: Callable[[bytes], bool] | None = None) -> None:
        """Every fsync raises ENOSPC, or only those whose file's tail `when` picks."""

        def fsync(fd: int) -> None:
            if when is None or when(_tail(fd)):
                raise OSError(28, "No space left on device")
            self._real(fd)

        self._disk._fsync_fn = fsync

    async def heal(self) -> None:
        """The disk works again; the writer takes entries again."""
        self._disk._fsync_fn = self._real
        if not self.writer.healthy:
            await self.writer.close()
            await self.writer.open()
