"""What the host brings to a run: its speed now, the filesystem and the fsync latency of
the disk the audit log is written to."""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from harness.common import percentile, percentile_pct

FSYNC_PROBES = 200  # about 0.1 s on an idle disk; printed as p50/p99


def checkout_rev(path: Path) -> str:
    """The commit a checkout is at, "+ changes" when its tracked files differ from it."""
    git = ["git", "-C", str(path)]
    head = subprocess.run([*git, "log", "-1", "--format=%h"], capture_output=True, check=False)
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, check=False
    )
    rev = head.stdout.decode().strip() or "? (not a git checkout)"
    return rev + (" + changes" if dirty.stdout.strip() else "")


def fs_type(path: Path) -> str:
    """The filesystem type holding path (fsync cost depends on it)."""
    best, kind = "", "?"
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint
        if str(path).startswith(mount) and len(mount) > len(best):
            best, kind = mount, part.fstype
    return kind


def host_speed_ms() -> float:
    """CPU milliseconds a fixed piece of pure-Python work takes now (best of 3), measured
    between runs. This VM's speed drifts by a third within minutes (neighbours, not shown
    as steal); each run line prints it so rows from different moments can be compared."""
    best = math.inf
    for _ in range(3):
        start = time.process_time()
        total = 0
        for i in range(200_000):
            total += i * i % 7
        best = min(best, time.process_time() - start)
    return best * 1000


def disk_fsync_probe(directory: Path, seconds: float = 10.0) -> str:
    """Append + fsync a small line every 3 ms for `seconds` in `directory` (the audit log's
    disk), nothing else running: how the disk alone behaves. Every send waits for its
    decision entry's fsync, so a stall here is a stall of every message."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    took: list[float] = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            os.write(fd, b"x" * 400 + b"\n")
            start = time.monotonic()
            os.fsync(fd)
            took.append((time.monotonic() - start) * 1000)
            time.sleep(0.003)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    took.sort()
    slow = sum(t > 25 for t in took)
    return (
        f"{len(took)} fsyncs in {seconds:g} s: p50 {percentile(took, 0.5):.2f} ms, p99"
        f" {percentile(took, 0.99):.2f} ms, {slow} over 25 ms, slowest {took[-1]:.0f} ms"
    )


def fsync_latency_ms(directory: Path, count: int = FSYNC_PROBES) -> tuple[float, float]:
    """p50 and p99 of append + fsync of a small line in `directory` (the audit log's disk)."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    took = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 400 + b"\n")
            os.fsync(fd)
            took.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    took.sort()
    return percentile_pct(took, 50), percentile_pct(took, 99)
