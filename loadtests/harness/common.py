"""What both benchmarks share: names, the event loop, free ports, percentiles, and the
spawned server children that send back the ports they listen on."""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing as mp
import random
import signal
import socket
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
    uvloop = None  # type: ignore[assignment]

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]  # the checkout whose gateway is measured
SENDER = "bench"
PASSWORD_ENV = "OPTGATE_BENCH_PASSWORD"  # noqa: S105 - a variable name, not a secret
CHILD_START_S = 30.0  # a spawned server child imports its libraries and binds its ports

MP = mp.get_context("spawn")  # every child a fresh interpreter: no state shared by fork


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is importable (as the gateway does), else asyncio."""
    if uvloop is not None:
        return uvloop.run(main)
    return asyncio.run(main)


def quiet_child() -> None:
    """In spawned children: leave Ctrl-C to the parent, which stops them in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # aiosmtpd logs every command at INFO and "Session.login_data is deprecated" at WARNING
    # on every successful AUTH (aiosmtpd 1.4.6, smtp.py:994): keep only errors.
    logging.getLogger("mail.log").setLevel(logging.ERROR)


# Ports for the servers a harness starts, chosen below the kernel's ephemeral range (from
# 32768 on Linux) so that no outgoing connection takes one between the choice and the
# server's bind; tests/support/ports.py chooses from 20000 up, so the two never meet.
PORT_RANGE: Final = range(10_000, 20_000)


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held together while chosen, then released)."""
    socks: list[socket.socket] = []
    first = random.randrange(len(PORT_RANGE))
    try:
        for i in range(len(PORT_RANGE)):
            if len(socks) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", PORT_RANGE[(first + i) % len(PORT_RANGE)]))
            except OSError:
                s.close()  # taken: the next
                continue
            socks.append(s)
        if len(socks) < n:
            raise OSError(f"fewer than {n} free loopback ports in {PORT_RANGE}")
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest rank: p in 0..1 of values sorted ascending (the SMTP benchmark's)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p * len(sorted_values)))
    return sorted_values[rank - 1]


def percentile_pct(values: Sequence[float], p: float) -> float:
    """p in 0..100 of values sorted ascending, the rank rounded (the SMS benchmark's and
    slowloris.py's; kept so their figures compare with earlier runs)."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(p / 100 * len(values)) - 1))]


def toml_str(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


@dataclass
class Child:
    role: str
    process: Any  # multiprocessing SpawnProcess

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()  # SIGTERM: the servers stop their listeners and exit
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


def start_child(
    role: str, target: Callable[..., None], *args: Any
) -> tuple[Child, tuple[int, ...]]:
    """Start a server process that sends back its ports (STARTTLS, implicit TLS[, plain])."""
    receive, send = MP.Pipe(duplex=False)
    process = MP.Process(target=target, args=(*args, send), name=f"bench-{role}", daemon=True)
    process.start()
    send.close()
    child = Child(role, process)
    if not receive.poll(CHILD_START_S):
        child.stop()
        raise RuntimeError(f"{role} did not start within {CHILD_START_S:.0f} s")
    return child, tuple(int(port) for port in receive.recv())
