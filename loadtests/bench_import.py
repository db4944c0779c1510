"""Bulk import throughput and Redis memory per opt-out record.

Starts a real `optgate serve` (its own process, embedded Valkey with appendfsync always),
makes a `preferences` API key, writes N NDJSON opt-out lines to a file, then streams that
file to ``POST /v1/optouts:import`` over HTTPS and times it. Redis memory is read with
``INFO memory`` (used_memory) before and after; the change stream's own share is read
with ``MEMORY USAGE og:changes``, and again once the sync worker has trimmed the stream
(no webhook is configured, so it keeps `[sync] stream_retain` entries).

    .venv/bin/python loadtests/bench_import.py                 # 1,000,000 records
    .venv/bin/python loadtests/bench_import.py --records 100000 --workers 1 --streams 1

By default the gateway runs as `optgate serve` does, with one worker per CPU, and the file
is sent as import requests of 20,000 lines, four at a time per worker, each on a new
connection: SO_REUSEPORT hashes each connection to a worker, so a few long requests can
all land on one worker (then the figure is one worker's); many shorter ones spread out,
as the requests of several importing clients would. One request is always one worker's.

Targets: at least 20,000 records/s and under 150 bytes of Redis memory per record.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis
from harness.common import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

TARGET_RATE = 20_000  # records/s
TARGET_BYTES = 150  # Redis bytes/record
CATEGORIES = ("marketing", "fundraising", "research", "billing")
TRIM_WAIT_S = 25.0  # the sync worker trims every 10 s


def write_lines(path: Path, n: int) -> int:
    """N distinct opt-outs, email and sms mixed, one to three categories or all."""
    size = 0
    with path.open("wb") as f:
        for i in range(n):
            if i % 4 == 3:
                doc: dict[str, Any] = {"channel": "sms", "address": f"+1202{i % 10**7:07d}"}
            else:
                doc = {"channel": "email", "address": f"patient{i}@clinic{i % 97}.example.org"}
            if i % 10 == 0:
                doc["all"] = True
            else:
                doc["categories"] = list(CATEGORIES[: 1 + i % 3])
            doc["source"] = "bench"
            line = orjson.dumps(doc) + b"\n"
            size += len(line)
            f.write(line)
    return size


def redis_client(home: Path) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(home / "var" / "redis" / "redis.sock"))


def memory(r: redis.Redis) -> tuple[int, int, int]:
    """(used_memory, stream bytes, record keys)."""
    used = int(r.info("memory")["used_memory"])
    stream = int(r.memory_usage("og:changes", samples=0) or 0)
    keys = int(r.dbsize())
    return used, stream, keys


def stop_embedded(home: Path) -> None:
    """Shut the embedded server down if the gateway left it running (it was killed)."""
    try:
        leftover = redis_client(home)
        leftover.shutdown()
    except (redis.RedisError, OSError):
        pass  # already gone, as it should be


async def wait_ready(port: int, ca: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit("the gateway exited during start")
            ctx = ssl.create_default_context(cafile=str(ca))
            try:
                async with s.get(f"https://127.0.0.1:{port}/readyz", ssl=ctx) as r:
                    if r.status == 200:
                        return
            except (aiohttp.ClientError, OSError):
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("the gateway did not become ready")


def split(path: Path, lines_per_part: int) -> list[Path]:
    """`path` cut into files of `lines_per_part` whole lines (one import request each)."""
    lines = path.read_bytes().splitlines(keepends=True)
    out = []
    for i in range(0, len(lines), lines_per_part):
        part = path.with_suffix(f".{i // lines_per_part}.ndjson")
        part.write_bytes(b"".join(lines[i : i + lines_per_part]))
        out.append(part)
    return out


async def stream_files(
    paths: list[Path], url: str, key: str, ca: Path, concurrency: int
) -> tuple[float, dict[str, Any]]:
    """POST every file, `concurrency` at a time, each on a new connection (so SO_REUSEPORT
    picks a worker per request, as it would for many importing clients); (seconds, sums)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/x-ndjson"}
    timeout = aiohttp.ClientTimeout(total=None)
    todo = list(reversed(paths))

    async def body(path: Path) -> Any:
        with path.open("rb") as f:
            while chunk := f.read(256 * 1024):
                yield chunk

    async def one(path: Path) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession(timeout=timeout) as s,
            s.post(url, data=body(path), headers=headers, ssl=ctx) as resp,
        ):
            result: dict[str, Any] = await resp.json(content_type=None)
            if resp.status != 200:
                raise SystemExit(f"import failed: {resp.status} {result}")
            return result

    async def lane() -> list[dict[str, Any]]:
        done = []
        while todo:
            done.append(await one(todo.pop()))
        return done

    start = time.perf_counter()
    lanes = await asyncio.gather(*(lane() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    results = [r for lane_results in lanes for r in lane_results]
    total = {k: sum(int(r[k]) for r in results) for k in ("applied", "rejected")}
    return elapsed, total


def say(text: str) -> None:
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=500, help="[admin] import_batch")
    cpus = os.cpu_count() or 1
    p.add_argument(
        "--workers", type=int, default=cpus, help="optgate serve --workers N (default: CPUs)"
    )
    p.add_argument("--streams", type=int, help="concurrent import requests (default: 4 per worker)")
    p.add_argument(
        "--request-lines", type=int, default=20_000, help="lines per import request (20,000)"
    )
    p.add_argument("--dir", type=Path, help="work directory (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    args.streams = args.streams or 4 * args.workers

    home = Path(tempfile.mkdtemp(prefix="og-bench-import-", dir=args.dir))
    port = free_port()
    cfg = home / "optgate.toml"
    cfg.write_text(
        '[gateway]\ninstance = "bench"\ndata_dir = "var"\n'
        '[smtp]\nlisten = "127.0.0.1:0"\nlisten_tls = "127.0.0.1:0"\n'
        f'[http]\nlisten = "127.0.0.1:{port}"\n'
        f"[admin]\nimport_batch = {args.batch}\n"
    )
    optgate = [sys.executable, "-m", "gateway"]
    made = subprocess.run(
        [*optgate, "keys", "api-key", "create", "--role", "preferences", "--config", str(cfg)],
        cwd=home, capture_output=True, text=True, check=True,
    )  # fmt: skip
    key = made.stdout.strip()
    data = home / "optouts.ndjson"
    size = write_lines(data, args.records)
    say(
        f"records      {args.records:,} ({size / 1e6:.1f} MB of NDJSON), batch {args.batch}, "
        f"{args.workers} worker(s), {args.streams} concurrent requests of {args.request_lines:,} "
        f"lines, {os.cpu_count()} CPUs"
    )
    parts = split(data, args.request_lines)
    log = (home / "serve.log").open("wb")
    proc = subprocess.Popen(
        [*optgate, "serve", "--workers", str(args.workers), "--config", str(cfg)],
        cwd=home, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        ca = home / "certs" / "ca.pem"
        deadline = time.monotonic() + 30
        while not ca.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # the gateway makes its development CA on its first start
        asyncio.run(wait_ready(port, ca, proc))
        r = redis_client(home)
        before = memory(r)
        url = f"https://127.0.0.1:{port}/v1/optouts:import"
        elapsed, result = asyncio.run(stream_files(parts, url, key, ca, args.streams))
        after = memory(r)
        applied = int(result["applied"])
        rate = applied / elapsed
        used = (after[0] - before[0]) / applied
        stream = (after[1] - before[1]) / applied
        say(f"applied      {applied:,} (rejected {result['rejected']}) in {elapsed:.1f} s")
        say(f"throughput   {rate:,.0f} records/s   (target >= {TARGET_RATE:,})")
        say(f"redis        {used:.0f} bytes/record all told, of which change stream "
              f"{stream:.0f}; records alone {used - stream:.0f}")  # fmt: skip
        time.sleep(TRIM_WAIT_S)
        trimmed = memory(r)
        settled = (trimmed[0] - before[0]) / applied
        say(f"after trim   {settled:.0f} bytes/record (stream kept "
              f"{int(r.xlen('og:changes')):,} entries)   (target < {TARGET_BYTES})")  # fmt: skip
        audit = sum(f.stat().st_size for f in (home / "var" / "audit").glob("*.jsonl"))
        say(f"audit log    {audit / 1e6:.0f} MB ({audit / applied:.0f} bytes/record)")
        ok = rate >= TARGET_RATE and settled < TARGET_BYTES
        say("targets      " + ("met" if ok else "NOT met"))
        r.close()  # the embedded server stops with the last client: not this one
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        stop_embedded(home)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
        else:
            say(f"kept {home}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
