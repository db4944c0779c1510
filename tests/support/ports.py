"""Loopback ports for the processes a test starts (the in-process gateway binds port 0)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A loopback TCP port free a moment ago (for a child process that must be told its port
    up front; the kernel may hand it out again before the child binds, rarely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
