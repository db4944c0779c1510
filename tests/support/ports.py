"""Loopback ports for the processes a test starts (the in-process gateway binds port 0).

A child process must be told its port up front, so there is a moment between choosing a
port and the child binding it. A port the kernel hands out for port 0 comes from the
ephemeral range, the same one every outgoing connection takes its source port from: with
two pytest-xdist workers opening connections all the time, one of them took a chosen port
in that moment ("already in use"). So ports are chosen below the ephemeral range (no
outgoing connection takes one), each xdist worker from its own slice (two workers never
choose the same one), each one checked free by binding it, in turn from a random start.
"""

from __future__ import annotations

import itertools
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

LOWEST = 20_000  # below it: well-known services a developer's machine may run
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _below_ephemeral() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default start of the range


def _slice() -> range:
    """This xdist worker's ports (the whole span when the suite runs in one process)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    width = (_below_ephemeral() - LOWEST) // count
    start = LOWEST + (index % count) * width
    return range(start, start + width)


def _candidates() -> Iterator[int]:
    ports = _slice()
    first = random.randrange(len(ports))
    return (ports[(first + i) % len(ports)] for i in itertools.count())


_next_port = _candidates()


def free_port() -> int:
    """A loopback TCP port free a moment ago, which no outgoing connection and no other
    xdist worker will take before the child binds it."""
    for _ in range(len(_slice())):
        port = next(_next_port)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken (a server a test started, or anything else): the next
            return port
    raise OSError("no free loopback port below the ephemeral range")
