"""The SMS benchmark's load: the Twilio-compatible request every client sends (a `twilio`
SDK's form to one of 200 numbers), what a client is told, and what it hands back."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ACCOUNT_SID = "AC" + "b" * 32
NUMBERS = [f"+1202555{n:04d}" for n in range(200)]
FROM = "+12025550100"
BODY = "Your flu shot is due. Book at the front desk."
SUPPRESSED = "suppressed (400/21610)"
REQUEST_TIMEOUT_S = 30.0


@dataclass
class ClientSpec:
    url: str
    path: str
    user: str
    password: str
    ca_pem: Path
    connections: int
    warmup_s: float
    seconds: float
    threads: int  # wrk only


@dataclass
class ClientResult:
    client: str = ""
    done: int = 0
    window_s: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    errors: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    cpu_s: dict[str, float] = field(default_factory=dict)  # per process, over the window
    cpu_parts: dict[str, list[float]] = field(default_factory=dict)  # a group's processes
    cpu_window_s: float = 0.0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    outside_s: float = 0.0  # CPU of everything else on the machine over the window
    outside_top: list[tuple[str, float]] = field(default_factory=list)
    steal_s: float = 0.0  # all cores: time the hypervisor ran something else
    conn_split: list[int] = field(default_factory=list)  # client connections per process
