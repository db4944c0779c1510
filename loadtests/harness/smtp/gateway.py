"""`python -m gateway serve` as a subprocess, as the benchmark measures it: a config written
here (embedded Valkey, the sink as its upstream), its workers and valkey-server found for
the CPU accounting, `optgate optout add` through its CLI, its audit fsync metric, and a
shutdown that checks the embedded valkey-server went away too.

`source` is the checkout whose `gateway` package runs (PYTHONPATH), so that another
checkout (a baseline revision) can run beside this one with the same interpreter."""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from harness.common import PASSWORD_ENV, REPO, SENDER, free_ports, toml_str
from harness.smtp.dkimkey import DkimKey
from harness.tls import Pki, client_context

CATEGORY = "marketing"
GATEWAY_START_TIMEOUT_S = 60.0
GATEWAY_STOP_TIMEOUT_S = 25.0  # the gateway gives open sessions 10 s, then closes its pool
VALKEY_EXIT_TIMEOUT_S = 10.0
CLI_TIMEOUT_S = 60.0


class GatewayProcess:
    """`python -m gateway serve --config FILE` with a config written here, and its CLI."""

    def __init__(
        self, root: Path, pki: Pki, *, sink_port: int, pool_size: int, password: str, workers: int,
        name: str = "gateway", source: Path = REPO, dkim: DkimKey | None = None,
    ) -> None:  # fmt: skip
        self.workers = workers
        self.source = source
        self.ca_pem = pki.ca_pem
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = self.dir / "optgate.toml"
        self.data_dir = self.dir / "var"
        self.log_path = self.dir / "gateway.log"
        self.smtp_port, self.smtps_port, self.http_port = free_ports(3)
        self.env = {**os.environ, PASSWORD_ENV: password}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(source), os.environ.get("PYTHONPATH")) if p
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.valkey: psutil.Process | None = None
        self.config.write_text(
            "\n".join(
                [
                    "[gateway]",
                    f"data_dir = {toml_str(str(self.data_dir))}",
                    'instance = "bench"',
                    "[tls]",
                    f"cert = {toml_str(str(pki.cert_pem))}",
                    f"key = {toml_str(str(pki.key_pem))}",
                    "[smtp]",
                    f'listen = "127.0.0.1:{self.smtp_port}"',
                    f'listen_tls = "127.0.0.1:{self.smtps_port}"',
                    "max_recipients = 100",
                    *per_client_cap(pool_size),
                    "[http]",
                    f'listen = "127.0.0.1:{self.http_port}"',
                    "[redis]",
                    'url = ""',
                    "[upstream.email]",
                    f'url = "smtp://127.0.0.1:{sink_port}"',
                    f"ca_file = {toml_str(str(pki.ca_pem))}",
                    f"pool_size = {pool_size}",
                    "[[senders]]",
                    f"name = {toml_str(SENDER)}",
                    f"password_env = {toml_str(PASSWORD_ENV)}",
                    f"default_category = {toml_str(CATEGORY)}",
                    "",
                ]
            )
            + (dkim.toml() if dkim is not None else "")  # signs the From domain's copies
        )

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "gateway", *args]

    def origin(self) -> Path:
        """The folder the `gateway` package is imported from with this process's environment
        (PYTHONPATH comes before the editable install, so it should be `source`/gateway)."""
        done = subprocess.run(
            [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
            cwd=self.dir, env=self.env, capture_output=True, timeout=CLI_TIMEOUT_S, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"cannot import gateway: {done.stderr.decode(errors='replace')}")
        return Path(done.stdout.decode().strip()).resolve().parent

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        """Start and wait (bounded) until the STARTTLS listener sends its 220 banner."""
        started = time.monotonic()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command("serve", "--workers", str(self.workers), "--config", str(self.config)),
                cwd=self.dir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = started + GATEWAY_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with code {self.proc.returncode}:\n{self.log_tail()}"
                )
            if self._banner():
                self.valkey = self._valkey()
                if len(self.worker_pids()) >= self.workers:
                    return time.monotonic() - started
            time.sleep(0.1)
        raise RuntimeError(
            f"gateway not ready after {GATEWAY_START_TIMEOUT_S:.0f} s:\n{self.log_tail()}"
        )

    def worker_pids(self) -> list[int]:
        """The processes serving SMTP: the gateway itself, or its workers (not valkey)."""
        assert self.proc is not None
        if self.workers == 1:
            return [self.proc.pid]
        valkey = self.valkey.pid if self.valkey else -1
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        return [c.pid for c in children if c.pid != valkey]

    def _banner(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.smtp_port), timeout=2) as s:
                return s.recv(512).startswith(b"220")
        except OSError:
            return False

    def _valkey(self) -> psutil.Process | None:
        try:
            pid = int((self.data_dir / "redis" / "server.pid").read_text().split()[0])
            return psutil.Process(pid)
        except (OSError, ValueError, IndexError, psutil.Error):
            return None

    def optout(self, addresses: Sequence[str], parallel: int = 2) -> float:
        """`optgate optout add` for each address (bounded parallelism); seconds taken."""
        started = time.monotonic()

        def one(address: str) -> None:
            done = subprocess.run(
                self.command(
                    "optout",
                    "add",
                    "--config",
                    str(self.config),
                    "--channel",
                    "email",
                    "--category",
                    CATEGORY,
                    address,
                ),
                cwd=self.dir,
                env=self.env,
                capture_output=True,
                timeout=CLI_TIMEOUT_S,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"optgate optout add {address} exited {done.returncode}: "
                    f"{done.stderr.decode(errors='replace').strip()}"
                )

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            list(pool.map(one, addresses))
        return time.monotonic() - started

    def stop(self) -> list[str]:
        """SIGTERM (then SIGKILL); check that the embedded valkey-server went away too."""
        notes: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(GATEWAY_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                notes.append(
                    f"gateway still running {GATEWAY_STOP_TIMEOUT_S:.0f} s after SIGTERM: SIGKILL"
                )
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None and self.proc.returncode not in (0, -signal.SIGTERM):
            notes.append(f"gateway exit code {self.proc.returncode}")
        valkey = self.valkey or self._valkey()
        if valkey is not None:
            notes.extend(self._reap_valkey(valkey))
        return notes

    def _reap_valkey(self, valkey: psutil.Process) -> list[str]:
        try:
            valkey.wait(VALKEY_EXIT_TIMEOUT_S)
        except psutil.TimeoutExpired:
            pass
        except psutil.Error:
            return []
        else:
            return []
        notes = [
            f"embedded valkey-server pid {valkey.pid} still running {VALKEY_EXIT_TIMEOUT_S:.0f} s "
            "after the gateway exited: SIGTERM by pid"
        ]
        with contextlib.suppress(psutil.Error):
            valkey.terminate()
            try:
                valkey.wait(5)
            except psutil.TimeoutExpired:
                notes.append("valkey-server ignored SIGTERM: SIGKILL")
                valkey.kill()
        return notes


def per_client_cap(sessions: int) -> list[str]:
    """The client's sessions all come from 127.0.0.1: above the gateway's default cap of 50
    connections per client address (as Postfix's smtpd_client_connection_count_limit), the
    cap is raised to the session count; at or below it the config does not name the key."""
    return [f"max_connections_per_client = {sessions}"] if sessions > 50 else []


def audit_fsyncs(gw: GatewayProcess) -> dict[str, float]:
    """The gateway's optgate_audit_fsync_seconds histogram buckets (le -> count), all
    workers summed, from its /metrics over HTTPS; {} when it cannot be read."""
    url = f"https://127.0.0.1:{gw.http_port}/metrics"
    ctx = client_context(gw.ca_pem)
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for m in re.finditer(r'^optgate_audit_fsync_seconds_bucket\{le="([^"]+)"\} (\S+)$', text, re.M):
        out[m.group(1)] = float(m.group(2))
    return out


def fsync_summary(before: dict[str, float], after: dict[str, float]) -> str:
    if not before or not after:
        return ""
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    total = delta.get("+Inf", 0.0)
    slow = total - delta.get("0.025", total)
    worst = next((le for le in sorted(delta, key=_le) if delta[le] >= total), "+Inf")
    return f"audit fsyncs {total:.0f}, {slow:.0f} over 25 ms, slowest <= {worst} s"


def _le(bound: str) -> float:
    return math.inf if bound == "+Inf" else float(bound)
