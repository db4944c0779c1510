"""`python -m gateway serve` as the SMS benchmark runs it: a config written here (the stub
as its SMS provider, one sender for the sms channel), started with a given number of
workers (its store persists between starts), `optgate optout add --channel sms`."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from harness.common import PASSWORD_ENV, REPO, SENDER, free_port, toml_str
from harness.sms.load import ACCOUNT_SID
from harness.tls import Pki, tls13

TOKEN_ENV = "OPTGATE_BENCH_SMS_TOKEN"  # noqa: S105 - a variable name, not a secret
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 25.0
CLI_TIMEOUT_S = 60.0


class GatewayProcess:
    """`python -m gateway serve --config FILE` with a config written here."""

    def __init__(self, root: Path, pki: Pki, *, stub_port: int, password: str, token: str):
        self.dir = root / "gateway"
        self.dir.mkdir(parents=True)
        self.config = self.dir / "optgate.toml"
        self.log_path = self.dir / "gateway.log"
        self.http_port = free_port()
        self.env = {**os.environ, PASSWORD_ENV: password, TOKEN_ENV: token}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p
        )
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            "[gateway]",
            f"data_dir = {toml_str(str(self.dir / 'var'))}",
            'instance = "bench-sms"',
            "[tls]",
            f"cert = {toml_str(str(pki.cert_pem))}",
            f"key = {toml_str(str(pki.key_pem))}",
            "[smtp]",
            f'listen = "127.0.0.1:{free_port()}"',
            f'listen_tls = "127.0.0.1:{free_port()}"',
            "[http]",
            f'listen = "127.0.0.1:{self.http_port}"',
            "[upstream.sms]",
            f'url = "https://127.0.0.1:{stub_port}"',
            f"account_sid = {toml_str(ACCOUNT_SID)}",
            f"auth_token_env = {toml_str(TOKEN_ENV)}",
            f"ca_file = {toml_str(str(pki.ca_pem))}",
            "[[senders]]",
            f"name = {toml_str(SENDER)}",
            f"password_env = {toml_str(PASSWORD_ENV)}",
            'channels = ["sms"]',
            'default_category = "marketing"',
            "",
        ]
        self.config.write_text("\n".join(lines))

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "gateway", *args]

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def valkey_pid(self) -> int:
        return int((self.dir / "var" / "redis" / "server.pid").read_text().split()[0])

    def start(self, ca_pem: Path, workers: int) -> None:
        """Start with `workers` workers (the store's data persists from an earlier start)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.command("serve", "--workers", str(workers), "--config", str(self.config)),
                cwd=self.dir, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        ctx = tls13(ssl.create_default_context(cafile=str(ca_pem)))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{self.log_path.read_text()[-2000:]}")
            try:
                with (
                    socket.create_connection(("127.0.0.1", self.http_port), timeout=2) as raw,
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
                ):
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if s.recv(64).startswith(b"HTTP/1.1 200") and self._workers_up(workers):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError("gateway not ready in time")

    def _workers_up(self, workers: int) -> bool:
        if workers == 1:
            return True
        kids = psutil.Process(self.pid).children()
        return sum("--worker-index" in " ".join(k.cmdline()) for k in kids) >= workers

    def optout(self, numbers: list[str]) -> None:
        def one(number: str) -> None:
            done = subprocess.run(
                self.command("optout", "add", "--config", str(self.config),
                             "--channel", "sms", "--all", number),
                cwd=self.dir, env=self.env, capture_output=True, timeout=CLI_TIMEOUT_S,
                check=False,
            )  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"optout add failed: {done.stderr.decode()[-500:]}")

        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(one, numbers))

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
