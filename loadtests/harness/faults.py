"""The fault loop's gateway under test and its tally (`loadtests/fault_loop.py`).

`Gateway` runs `optgate serve --workers 2` on a fresh data dir with the outbox upstream (it
keeps every message: no retention), one sender, and every tenth of `RECIPIENTS` opted out;
`Tally` is what one scenario counted.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness.common import free_ports
from harness.tls import make_pki

PASSWORD = "fault-loop-password-0123456789"  # noqa: S105 - a throwaway sender on a throwaway data dir
RECIPIENTS = 200  # r0..r199@example.org; every tenth is opted out
START_TIMEOUT_S = 60.0  # `serve` under a loaded machine: imports, two workers, the store


def opted_out(i: int) -> bool:
    return i % 10 == 0


@dataclass
class Tally:
    sent: int = 0
    acked: dict[str, int] = field(default_factory=dict)  # Message-ID -> recipient index
    four: int = 0
    cut: int = 0
    kills: int = 0
    recovery: list[float] = field(default_factory=list)
    no_worker_s: float = 0.0
    zombies: int = 0
    oks: list[tuple[float, float]] = field(default_factory=list)  # (began, answered) of 250s
    fours: list[tuple[float, float]] = field(default_factory=list)  # the same of 451s
    full: tuple[float, float] | None = None  # (filled, freed) in the disk-full scenario


class Gateway:
    """`optgate serve --workers 2` on a fresh data dir, its log in that dir."""

    def __init__(self, root: Path, audit_dir: Path | None = None) -> None:
        self.root = root
        self.audit_dir = audit_dir or root / "var" / "audit"
        audit = [] if audit_dir is None else ["[audit]", f'dir = "{audit_dir}"']
        self.pki = make_pki(root / "pki")
        self.smtp, smtps, http = free_ports(3)
        self.config = root / "gw.toml"
        self.config.write_text(
            "\n".join(
                [
                    "[gateway]",
                    'instance = "loop"',
                    f'data_dir = "{root / "var"}"',
                    "[tls]",
                    f'cert = "{self.pki.cert_pem}"',
                    f'key = "{self.pki.key_pem}"',
                    "[smtp]",
                    f'listen = "127.0.0.1:{self.smtp}"',
                    f'listen_tls = "127.0.0.1:{smtps}"',
                    "[http]",
                    f'listen = "127.0.0.1:{http}"',
                    # Every accepted message must stay in the outbox to be counted: no
                    # retention (the default keeps the newest 10,000, which a long loop
                    # passes, and the pruned ones would count as LOST).
                    "[upstream.email]",
                    "outbox_keep = 0",
                    "outbox_max_age_s = 0",
                    "[[senders]]",
                    'name = "app"',
                    'password_env = "FAULT_LOOP_PASSWORD"',
                    'default_category = "marketing"',
                    'categories = ["marketing"]',
                    *audit,
                ]
            )
            + "\n"
        )
        self.env = {**os.environ, "FAULT_LOOP_PASSWORD": PASSWORD}
        self.log = root / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "gateway", *args, "--config", str(self.config)]
        return subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, env=self.env, timeout=120, check=False
        )

    def opt_out_recipients(self) -> None:
        lines = [
            json.dumps({"channel": "email", "address": f"r{i}@example.org", "all": True})
            for i in range(RECIPIENTS)
            if opted_out(i)
        ]
        done = self.cli("optout", "import", "--format", "ndjson", "-", stdin="\n".join(lines))
        if done.returncode != 0:
            raise SystemExit(f"optout import failed: {done.stderr.strip()}")

    async def start(self) -> None:
        cmd = [sys.executable, "-m", "gateway", "serve", "--workers", "2"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                [*cmd, "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.log_text().count("event='worker_ready'") < 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"serve did not start:\n{self.log_text()[-3000:]}")
            await asyncio.sleep(0.1)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> dict[int, tuple[str, bool]]:
        """{pid: (state letter, is a worker)} of serve's direct children (the embedded
        server and the spare worker are not workers)."""
        found: dict[int, tuple[str, bool]] = {}
        assert self.proc is not None
        started = {
            int(p)
            for p in re.findall(r"event='worker_started' worker=\d+ pid=(\d+)", self.log_text())
        }
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[1]) == self.proc.pid:
                pid = int(stat.parent.name)
                found[pid] = (fields[0], pid in started)
        return found

    def ready_pids(self) -> set[int]:
        return {
            int(p)
            for p in re.findall(r"event='worker_ready' worker=\d+ pid=(\d+)", self.log_text())
        }

    def store_pid(self) -> int | None:
        try:
            return int((self.root / "var" / "redis" / "server.pid").read_text())
        except (OSError, ValueError):
            return None
