"""SMS benchmark: the Twilio-compatible send path through optgate beside the harness limit.

One invocation measures, on the same load and side by side:

1. harness limit: the client straight to the stub provider (Twilio's Messages API shape);
2. with --bare-proxy, for context: a minimal aiohttp proxy (one pooled TLS 1.3 client
   session, no auth, lookup, audit or checks) -> the same stub;
3. optgate with each --workers count (default 1 and the CPU count): client ->
   `python -m gateway serve --workers N` (a subprocess with a generated config and its
   embedded Valkey) -> the same stub. The sender's default category is "marketing"
   (opt_out and unsubscribe), so every request costs a Basic-auth check, E.164
   normalisation, one store lookup, a durable audit entry before forwarding, the footer,
   the pooled TLS 1.3 request to the provider and a durable "delivery" audit entry.

The client: `wrk` (C, one thread per --client-threads, Lua script for the form body and
Basic auth, TLS 1.3 because every server here accepts nothing older; wrk does not verify
certificates) when it is installed, else a Python aiohttp client process (TLS 1.3, verifies
the test CA). Both keep N connections alive and send the form a `twilio` SDK sends, as fast
as replies come (closed loop: latency ~ connections / rate). A Python client spends about a
core at 5,000 requests/s on this machine's 2 cores, which the servers then lack: the table
prints which client ran and its CPU, so the figures can be judged.

Every process is separate: client, stub (harness/sms/provider.py: a bare asyncio HTTP/1.1
protocol, TLS 1.3, checks Basic auth, answers 201 with a message resource), gateway (and
its workers) and valkey-server. They share the machine's cores. A share of the recipients
is opted out beforehand (`optgate optout add --channel sms`); those requests are answered
400/21610 and counted as "suppressed".

Per run: requests/s, p50/p99 latency (request written to reply read), status counts, CPU
of each process over the measured window (% of one core, and per request), and what else
the machine did in that window (load average, CPU of processes outside the benchmark, CPU
time the hypervisor took). The header gives the fsync latency of the data directory's
disk, which bounds every durable audit entry.

    .venv/bin/python loadtests/bench_sms.py --connections 10 --seconds 10 --bare-proxy
    .venv/bin/python loadtests/bench_sms.py --workers 1 --client python
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.common import MP, SENDER
from harness.cpu import tree_pids
from harness.host import fsync_latency_ms
from harness.sms.client import CLIENT_START_S, run_client
from harness.sms.gateway import GatewayProcess
from harness.sms.load import ACCOUNT_SID, NUMBERS, ClientSpec
from harness.sms.provider import proxy_main, stub_main
from harness.sms.report import report
from harness.tls import make_pki


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--opted-out", type=int, default=20, help="of the 200 recipients")
    ap.add_argument("--bare-proxy", action="store_true", help="also a bare aiohttp proxy")
    ap.add_argument(
        "--workers",
        default=f"1,{os.cpu_count() or 1}",
        help="comma-separated optgate worker counts, one row each (default: 1 and CPU count)",
    )
    ap.add_argument(
        "--client",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator (auto: wrk when installed, else the Python client)",
    )
    ap.add_argument("--client-threads", type=int, default=1, help="wrk threads")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args(argv)
    try:
        args.workers = sorted({int(n) for n in args.workers.split(",")})
    except ValueError:
        ap.error("--workers takes comma-separated integers")
    if min(args.workers) < 1 or args.seconds <= CLIENT_START_S:
        ap.error(f"--workers must be >= 1 and --seconds > {CLIENT_START_S}")
    if args.client == "auto":
        args.client = "wrk" if shutil.which("wrk") else "python"
    elif args.client == "wrk" and not shutil.which("wrk"):
        ap.error("wrk is not installed (apt-get install wrk), use --client python")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="optgate-bench-sms-"))
    pki = make_pki(root / "pki")
    password, token = secrets.token_urlsafe(16), secrets.token_urlsafe(24)
    ctx = MP
    parent, child = ctx.Pipe(duplex=False)
    stub = ctx.Process(target=stub_main, args=(pki, token, child), daemon=True)
    stub.start()
    gateway: GatewayProcess | None = None
    print(f"client: {args.client}" + (" (wrk not installed)" if args.client == "python" else ""))
    try:
        stub_port = parent.recv()
        path = "/2010-04-01/Accounts/{}/Messages.json"

        def spec(port: int, user: str, secret: str) -> ClientSpec:
            return ClientSpec(
                url=f"https://127.0.0.1:{port}" + path.format(user),
                path=path.format(user),
                user=user,
                password=secret,
                ca_pem=pki.ca_pem,
                connections=args.connections,
                warmup_s=args.warmup,
                seconds=args.seconds,
                threads=args.client_threads,
            )

        def measure(target: ClientSpec, groups: dict[str, Callable[[], list[int]]]) -> Any:
            return run_client(target, args.client, groups, root)

        stub_pids = {"stub": lambda: [stub.pid or 0]}
        limit = measure(spec(stub_port, ACCOUNT_SID, token), stub_pids)
        rows = [("harness limit (client -> stub)", limit)]
        if args.bare_proxy:
            p_parent, p_child = ctx.Pipe(duplex=False)
            proxy = ctx.Process(
                target=proxy_main, args=(pki, stub_port, token, p_child), daemon=True
            )
            proxy.start()
            try:
                groups = {**stub_pids, "proxy": lambda: [proxy.pid or 0]}
                result = measure(spec(p_parent.recv(), ACCOUNT_SID, token), groups)
                rows.append(("bare aiohttp proxy (no checks)", result))
            finally:
                proxy.terminate()
                proxy.join(10)
        gateway = GatewayProcess(root, pki, stub_port=stub_port, password=password, token=token)
        gw = gateway
        before = fsync_latency_ms(gw.dir)
        for n, workers in enumerate(args.workers):
            gw.start(pki.ca_pem, workers)
            if n == 0:
                gw.optout(NUMBERS[: args.opted_out])
            groups = {
                **stub_pids,
                "gateway": lambda: tree_pids(gw.pid, {gw.valkey_pid()}),
                "valkey": lambda: [gw.valkey_pid()],
            }
            result = measure(spec(gw.http_port, SENDER, password), groups)
            plural = "s" if workers > 1 else ""
            rows.append((f"optgate {workers} worker{plural} (-> gw -> stub)", result))
            gw.stop()
        after = fsync_latency_ms(gw.dir)
        fsync_ms = (
            f"p50 {before[0]:.2f} ms, p99 {before[1]:.2f} ms before the optgate runs; "
            f"p50 {after[0]:.2f} ms, p99 {after[1]:.2f} ms after"
        )
        report(rows, args.connections, fsync_ms)
        print(f"opted out beforehand: {args.opted_out} of {len(NUMBERS)} recipients")
    finally:
        if gateway is not None:
            gateway.stop()
        stub.terminate()
        stub.join(10)
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
