"""The flock(2) helpers that serialise the processes sharing one embedded server.

Advisory locks on files in the server's home (``store.embedded`` names them): one held
exclusively while a process starts or stops the server, and shared holds that say "someone
still uses it" (every attached process) or "someone restarts it" (the supervisor's
``store.keeper``). A lock dies with its descriptor, so a crashed holder never leaves one
behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from gateway.errors import StoreUnavailable


@contextlib.asynccontextmanager
async def locked(path: Path, *, timeout_s: float, poll_s: float) -> AsyncIterator[None]:
    """Hold `path`'s flock exclusively, waiting (every `poll_s`, without blocking the loop)
    at most `timeout_s` for another holder to let go; StoreUnavailable after that."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"another optgate process has held {path} for over {timeout_s:.0f} s"
                    ) from None
                await asyncio.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def lock_shared(path: Path) -> int:
    """An open descriptor holding a shared flock on `path` (released when closed)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only for a holder of LOCK_EX: a brief probe
    except BaseException:
        os.close(fd)
        raise
    return fd


def held_by_others(path: Path, own_fd: int | None = None) -> bool:
    """Whether a process other than us holds `path`'s flock (shared or exclusive).

    `own_fd`, our own shared hold, is given up for the probe and taken again after it."""
    fd = (
        own_fd
        if own_fd is not None
        else os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    )
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_SH if own_fd is not None else fcntl.LOCK_UN)
        return False
    finally:
        if own_fd is None:
            os.close(fd)
