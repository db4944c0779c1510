"""Where an SMS send's CPU goes: optgate with one part of the path left out at a time.

    .venv/bin/python loadtests/sms_breakdown.py                 # about 2 minutes
    .venv/bin/python loadtests/sms_breakdown.py --rounds 8 --seconds 5

One stub provider and, side by side, one single-worker gateway per variant
(`ablated_gateway.py`: the part is patched out in the gateway's own process):

    full          the real send path, as bench_sms.py measures it
    no-audit      no audit entry is sealed, written or waited for
    no-lookup     the store lookup answers "no record" without a round trip
    no-provider   the provider is not called; a canned 201 message resource
    http-only     the Twilio route answers 201 after auth and reading the body

wrk (10 connections, the bench_sms.py request) then runs against each gateway in turn for
--seconds, --rounds times, reversing the order every round: this VM's speed drifts by a
third within minutes, and alternating short windows shares the drift between variants
where back-to-back runs would hand it to one. Per variant: the median requests/s, p99, and
CPU per request of the gateway process (user + system, both its threads, not Valkey's),
and what "full" costs more: that part's CPU per request.

The header measures what a hand-off costs on this machine, because every part of the path
is one: a round trip to a thread (the audit writer's) and a ping-pong with another process
over a pipe (Valkey, the provider, the client), each unpinned and with both ends on one CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import resource
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ablated_gateway import VARIANTS
from harness.common import SENDER, run_async
from harness.cpu import total_cpu_seconds, tree_pids
from harness.sms.client import run_wrk, wrk_script
from harness.sms.gateway import GatewayProcess
from harness.sms.load import NUMBERS, ClientSpec
from harness.sms.provider import stub_main
from harness.tls import make_pki

HERE = Path(__file__).resolve().parent
ROUND_TRIPS = 3000


class AblatedGateway(GatewayProcess):
    def __init__(self, variant: str, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.variant = variant

    def command(self, *args: str) -> list[str]:
        if args and args[0] == "serve":
            return [sys.executable, str(HERE / "ablated_gateway.py"), self.variant, *args]
        return super().command(*args)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _thread_round_trips(n: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1) as pool:
        await loop.run_in_executor(pool, int)
        c, t = _cpu(), time.perf_counter()
        for _ in range(n):
            await loop.run_in_executor(pool, int)
        return (time.perf_counter() - t) * 1e6 / n, (_cpu() - c) * 1e6 / n


def thread_hop_us() -> tuple[float, float]:
    """(wall, CPU) µs of one loop -> thread -> loop round trip (an audit batch's hand-off)."""
    wall, cpu = run_async(_thread_round_trips(ROUND_TRIPS))
    return float(wall), float(cpu)


def _echo(r: int, w: int) -> None:
    while data := os.read(r, 1):
        os.write(w, data)


def process_hop_us() -> tuple[float, float]:
    """(wall, CPU of both processes) µs of one byte to another process and back."""
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()
    child = mp.get_context("fork").Process(target=_echo, args=(a_r, b_w), daemon=True)
    child.start()
    start_child = total_cpu_seconds([child.pid or 0])
    c, t = _cpu(), time.perf_counter()
    for _ in range(ROUND_TRIPS):
        os.write(a_w, b"x")
        os.read(b_r, 1)
    wall = (time.perf_counter() - t) * 1e6 / ROUND_TRIPS
    cpu = _cpu() - c + total_cpu_seconds([child.pid or 0]) - start_child
    os.close(a_w)
    child.join(5)
    for fd in (a_r, b_r, b_w):
        os.close(fd)
    return wall, cpu * 1e6 / ROUND_TRIPS


def hop_probe() -> str:
    lines = []
    for label, fn in (("thread round trip", thread_hop_us), ("process ping-pong", process_hop_us)):
        free = fn()
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        try:
            pinned = fn()
        finally:
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
        lines.append(
            f"{label}: {free[1]:.0f} µs CPU ({free[0]:.0f} µs wall) across CPUs, "
            f"{pinned[1]:.0f} µs CPU ({pinned[0]:.0f} µs wall) on one CPU"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated, from: " + ", ".join(VARIANTS),
    )
    args = ap.parse_args(argv)
    variants = args.variants.split(",")
    if "full" not in variants or not set(variants) <= set(VARIANTS) or args.rounds < 1:
        ap.error(f"--variants must include full and name only {', '.join(VARIANTS)}")
    if not shutil.which("wrk"):
        ap.error("needs wrk (apt-get install wrk)")
    print("hand-offs on this machine (each part of the send path is one or more):")
    print(hop_probe())

    root = Path(tempfile.mkdtemp(prefix="optgate-sms-breakdown-"))
    pki = make_pki(root / "pki")
    password, token = secrets.token_urlsafe(16), secrets.token_urlsafe(24)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    stub = ctx.Process(target=stub_main, args=(pki, token, child), daemon=True)
    stub.start()
    gateways: list[AblatedGateway] = []
    try:
        stub_port = parent.recv()
        for variant in variants:
            (root / variant).mkdir()
            gw = AblatedGateway(
                variant, root / variant, pki, stub_port=stub_port, password=password, token=token
            )
            gw.start(pki.ca_pem, 1)
            gw.optout(NUMBERS[:20])
            gateways.append(gw)
        path = f"/2010-04-01/Accounts/{SENDER}/Messages.json"
        samples: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
        pairs = list(zip(variants, gateways, strict=True))
        for rnd in range(args.rounds):
            for variant, gw in pairs if rnd % 2 == 0 else pairs[::-1]:
                spec = ClientSpec(
                    url=f"https://127.0.0.1:{gw.http_port}{path}", path=path, user=SENDER,
                    password=password, ca_pem=pki.ca_pem, connections=args.connections,
                    warmup_s=0.0, seconds=args.seconds, threads=1,
                )  # fmt: skip
                script = wrk_script(spec, root)
                pids = tree_pids(gw.pid, {gw.valkey_pid()})
                before = total_cpu_seconds(pids)
                out, _ = run_wrk(spec, script, args.seconds)
                used = total_cpu_seconds(pids) - before
                done = max(int(out["requests"]), 1)
                rate = done / (out["duration_us"] / 1e6)
                samples[variant].append((rate, used * 1e6 / done, out["p99_us"] / 1000))
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
        report(samples, args)
    finally:
        for gw in gateways:
            gw.stop()
        stub.terminate()
        stub.join(10)
        shutil.rmtree(root, ignore_errors=True)
    return 0


def report(samples: dict[str, list[tuple[float, float, float]]], args: argparse.Namespace) -> None:
    print(
        f"\nSMS send, 1 worker, {args.connections} connections, {args.rounds} alternating "
        f"rounds of {args.seconds:g} s, medians (min-max)"
    )
    print(f"{'variant':<12} {'req/s':>16} {'p99 ms':>7} {'CPU µs/req':>18} {'full costs more':>16}")
    full_cpu = statistics.median(c for _, c, _ in samples["full"])
    for variant, rows in samples.items():
        rates, cpus, p99s = zip(*rows, strict=True)
        cpu = statistics.median(cpus)
        more = "" if variant == "full" else f"{full_cpu - cpu:+.0f} µs"
        print(
            f"{variant:<12} {statistics.median(rates):>6.0f} ({min(rates):.0f}-{max(rates):.0f})"
            f" {statistics.median(p99s):>7.1f} {cpu:>6.0f} ({min(cpus):.0f}-{max(cpus):.0f})"
            f" {more:>16}"
        )
    print("\n" + "\n".join(f"  {k:<12} {v}" for k, v in VARIANTS.items() if k in samples))


if __name__ == "__main__":
    sys.exit(main())
