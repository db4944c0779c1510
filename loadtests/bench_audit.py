"""Audit writer throughput: entries/s with 1, 10 and 100 concurrent writers, real fsync.

Each writer appends one entry at a time and waits until it is durable, as the SMTP path
does; concurrent appends share fsyncs (group commit), so entries/s should grow with the
number of writers. The figure depends on the filesystem of --dir (printed).

    .venv/bin/python loadtests/bench_audit.py
    .venv/bin/python loadtests/bench_audit.py --writers 1,10,100 --seconds 3 --dir /var/tmp
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import psutil  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from gateway.audit.writer import bench

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None  # type: ignore[assignment]


def fs_type(path: Path) -> str:
    best, kind = "", "?"
    for part in psutil.disk_partitions(all=True):
        if str(path).startswith(part.mountpoint) and len(part.mountpoint) > len(best):
            best, kind = part.mountpoint, part.fstype
    return kind


async def run(directory: Path, writers: Sequence[int], seconds: float) -> list[tuple[int, float]]:
    results = []
    for n in writers:
        target = directory / f"writers-{n}"
        target.mkdir()
        rate = await bench(target, n, seconds)
        print(f"{n:>8} {rate:>12,.0f}", flush=True)
        results.append((n, rate))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--writers", default="1,10,100", help="concurrent writers per run (default 1,10,100)"
    )
    p.add_argument("--seconds", type=float, default=3.0, help="seconds per run (default 3)")
    p.add_argument(
        "--dir", type=Path, default=None, help="where to write (default: a temporary dir)"
    )
    args = p.parse_args(argv)
    writers = [int(w) for w in args.writers.split(",") if w.strip()]
    if not writers or min(writers) < 1 or args.seconds <= 0:
        p.error("--writers and --seconds must be positive")
    parent = args.dir.resolve() if args.dir else None
    directory = Path(tempfile.mkdtemp(prefix="optgate-audit-bench-", dir=parent))
    loop = f"uvloop {metadata.version('uvloop')}" if uvloop else "asyncio"
    where = f"{directory} ({fs_type(directory)})"
    print(f"audit writer bench: {args.seconds:g} s per run, {loop}, {where}")
    print(f"{'writers':>8} {'entries/s':>12}")
    try:
        if uvloop is not None:
            uvloop.run(run(directory, writers, args.seconds))
        else:
            asyncio.run(run(directory, writers, args.seconds))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
