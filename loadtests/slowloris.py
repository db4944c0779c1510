"""Slow-header clients against the HTTPS listener, beside legitimate requests. The goal:
with 1,000 slow connections from one address, at least 99.9 % of legitimate requests
still succeed, their p99 stays within twice the baseline's, and the per-address cap holds.

    .venv/bin/python loadtests/slowloris.py                    # about 40 s
    .venv/bin/python loadtests/slowloris.py --attackers 1000 --seconds 25

Starts `python -m gateway serve --workers 1` (generated config, embedded Valkey; the
bench_sms.py gateway). The attackers connect from 127.0.0.2 (every 127/8 address is this
machine), finish the TLS 1.3 handshake, send a request line and then one more header line
every `--trickle` seconds, never the blank line that ends the headers. The legitimate
client, from 127.0.0.1, sends `GET /healthz` on a keep-alive connection as fast as it is
answered: first alone (the baseline), then while the attackers run.

Printed: the legitimate requests' rate, success share and p50/p99 in both windows; how many
attackers were refused at once (the `[http] max_connections_per_client` cap, default 256),
how many the gateway closed at the header deadline (10 s), and the most attacker
connections it held at one time.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.common import free_port, percentile_pct, run_async
from harness.sms.gateway import GatewayProcess
from harness.tls import make_pki, tls13

ATTACKER = "127.0.0.2"
LEGIT_TIMEOUT_S = 5.0


@dataclass
class Attack:
    refused: int = 0  # answered 503 at once (over the per-address cap)
    closed: list[float] = field(default_factory=list)  # seconds until the gateway closed it
    failed: int = 0  # could not connect or handshake
    held: int = 0
    most_held: int = 0


async def attacker(
    port: int, ctx: ssl.SSLContext, trickle_s: float, until: float, a: Attack
) -> None:
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, local_addr=(ATTACKER, 0)
        )
    except (OSError, ssl.SSLError):
        a.failed += 1
        return
    started = time.monotonic()
    a.held += 1
    a.most_held = max(a.most_held, a.held)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
        n = 0
        while time.monotonic() < until:
            try:
                data = await asyncio.wait_for(reader.read(64), trickle_s)
            except TimeoutError:
                writer.write(f"X-Slow-{n}: x\r\n".encode())
                n += 1
                continue
            if data.startswith(b"HTTP/1.1 503"):
                a.refused += 1
            else:
                a.closed.append(time.monotonic() - started)
            return
    except (OSError, ssl.SSLError):
        a.closed.append(time.monotonic() - started)
    finally:
        a.held -= 1
        writer.close()


async def legit(port: int, ctx: ssl.SSLContext, until: float) -> tuple[int, int, list[float]]:
    """(answered 200, failed, latencies in ms) of GET /healthz until `until`."""
    ok, failed, took = 0, 0, []
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while time.monotonic() < until:
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, ssl=ctx), LEGIT_TIMEOUT_S
                )
            reader, writer = conn
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), LEGIT_TIMEOUT_S)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await asyncio.wait_for(reader.readexactly(length), LEGIT_TIMEOUT_S)
            if head.startswith(b"HTTP/1.1 200"):
                ok += 1
                took.append((time.perf_counter() - t0) * 1000)
            else:
                failed += 1
        except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError, IndexError):
            failed += 1
            if conn is not None:
                conn[1].close()
            conn = None
            await asyncio.sleep(0.01)
    if conn is not None:
        conn[1].close()
    return ok, failed, took


def summary(label: str, result: tuple[int, int, list[float]], seconds: float) -> str:
    ok, failed, took = result
    took.sort()
    share = 100.0 * ok / max(ok + failed, 1)
    return (
        f"{label:<28} {ok / seconds:7.0f} req/s  {share:6.2f} % ok  "
        f"p50 {percentile_pct(took, 50):6.2f} ms  p99 {percentile_pct(took, 99):6.2f} ms"
    )


async def run(port: int, ca: Path, args: argparse.Namespace) -> None:
    ctx = tls13(ssl.create_default_context(cafile=str(ca)))
    base_until = time.monotonic() + args.baseline
    baseline = await legit(port, ctx, base_until)
    a = Attack()
    until = time.monotonic() + args.seconds
    attackers = []
    for _ in range(args.attackers):  # ramp up over about a second, as a real attack would
        attackers.append(asyncio.create_task(attacker(port, ctx, args.trickle, until, a)))
        await asyncio.sleep(1.0 / args.attackers)
    under = await legit(port, ctx, until)
    await asyncio.gather(*attackers)
    print(summary("legitimate, alone", baseline, args.baseline))
    print(summary(f"legitimate, {args.attackers} attackers", under, args.seconds))
    closed = sorted(a.closed)
    print(
        f"attackers: {a.refused} refused at once (503, per-address cap), {len(closed)} closed by "
        f"the gateway (median after {percentile_pct(closed, 50):.1f} s), {a.failed} could not "
        f"connect; at most {a.most_held} held at once"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--attackers", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=25.0, help="the attack window")
    ap.add_argument("--baseline", type=float, default=5.0)
    ap.add_argument("--trickle", type=float, default=4.0, help="seconds between header lines")
    args = ap.parse_args(argv)
    try:
        with socket.socket() as probe:
            probe.bind((ATTACKER, 0))
    except OSError:
        ap.error(f"cannot bind {ATTACKER}: this needs the whole 127/8 loopback range")
    root = Path(tempfile.mkdtemp(prefix="optgate-slowloris-"))
    pki = make_pki(root / "pki")
    gw = GatewayProcess(
        root, pki, stub_port=free_port(), password=secrets.token_urlsafe(16),
        token=secrets.token_urlsafe(24),
    )  # fmt: skip
    try:
        gw.start(pki.ca_pem, 1)
        run_async(run(gw.http_port, pki.ca_pem, args))
    finally:
        gw.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
