"""Running `optgate` as real processes in tests: config files, `serve` subprocesses, the CLI."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiosmtplib

from tests.conftest import APP_PASSWORD, message
from tests.support.ports import free_port
from tests.support.smtp_sink import Sink, TestPki

START_TIMEOUT_S = 20.0


def toml_value(v: Any) -> str:
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return str(v)


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    lines: list[str] = []
    for section, values in doc.items():
        if isinstance(values, list):
            for item in values:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def optgate(
    *args: str, config: Path | None = None, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "gateway", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    env = {**os.environ, "OPTGATE_TEST_APP": APP_PASSWORD}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, env=env, input=input, check=False
    )


class ServeProcess:
    def __init__(self, config: Path, port: int, log: Path, *, workers: int = 1) -> None:
        self.config, self.port, self.log, self.workers = config, port, log, workers
        env = {**os.environ, "OPTGATE_TEST_APP": APP_PASSWORD}
        self.fh = log.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--workers",
                str(workers),
                "--config",
                str(config),
            ],
            stdout=self.fh,
            stderr=subprocess.STDOUT,
            env=env,
        )

    async def wait_ready(self) -> None:
        """Until every worker serves. The port accepts as soon as `serve` has bound it
        (connections queue until a worker takes them), so wait for each worker's
        `listening` line, then for a greeting."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            text = self.log.read_text()
            listening = text.count("event='listening'") + text.count('"event": "listening"')
            if listening < self.workers:  # [log] format console or json
                await asyncio.sleep(0.1)
                continue
            try:
                r, w = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    greeting = await r.readline()
            finally:
                w.close()
            if greeting.startswith(b"220"):
                return
        raise AssertionError(f"gateway did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.fh.close()


def base_doc(tmp_path: Path, pki: TestPki, sink: Sink, instance: str, smtp: int) -> dict[str, Any]:
    return {
        "gateway": {"instance": instance, "data_dir": str(tmp_path / "var")},
        "tls": {"cert": str(pki.cert_pem), "key": str(pki.key_pem)},
        "smtp": {"listen": f"127.0.0.1:{smtp}", "listen_tls": f"127.0.0.1:{free_port()}"},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "upstream": {},
        "senders": [
            {
                "name": "app",
                "password_env": "OPTGATE_TEST_APP",
                "default_category": "marketing",
                # emergency-alert (opt_out = false) by name; newsletter: the reload test adds it
                "categories": ["marketing", "emergency-alert", "newsletter"],
            }
        ],
    }


def with_upstream(doc: dict[str, Any], sink: Sink, pki: TestPki) -> dict[str, Any]:
    doc = dict(doc)
    del doc["upstream"]
    doc["upstream.email"] = {"url": f"smtp://127.0.0.1:{sink.port}", "ca_file": str(pki.ca_pem)}
    return doc


def opt_out(config: Path, address: str, channel: str = "email") -> None:
    """`optgate optout add --channel CHANNEL --all ADDRESS`, which must succeed."""
    out = optgate("optout", "add", "--channel", channel, "--all", address, config=config)
    assert out.returncode == 0, out.stderr


async def serve_gateway(
    tmp_path: Path,
    pki: TestPki,
    sink: Sink | None,
    served: list[ServeProcess],
    *,
    workers: int = 1,
    instance: str = "gw",
    **sections: dict[str, Any],
) -> tuple[ServeProcess, dict[str, Any]]:
    """`optgate serve --workers N` on a free port, relaying to `sink` (no upstream when it
    is None), each of `sections` merged into its config section of that name; config and
    log are ``<instance>.toml`` and ``<instance>.log`` in `tmp_path`. It joins `served`
    (the conftest fixture that stops it) and every worker serves when this returns (with
    its config)."""
    port = free_port()
    doc = base_doc(tmp_path, pki, sink, instance, port)  # type: ignore[arg-type]
    if sink is not None:
        doc = with_upstream(doc, sink, pki)
    for name, values in sections.items():
        doc.setdefault(name, {}).update(values)
    gw = ServeProcess(
        write_config(tmp_path / f"{instance}.toml", doc),
        port,
        tmp_path / f"{instance}.log",
        workers=workers,
    )
    served.append(gw)
    await gw.wait_ready()
    return gw, doc


async def send(
    pki: TestPki,
    port: int,
    rcpts: list[str],
    category: str = "marketing",
    message_id: str = "<test-1@sender.example>",
) -> tuple[int, str]:

    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=True, tls_context=ctx, timeout=10
    )
    await smtp.connect()
    try:
        await smtp.login("app", APP_PASSWORD)
        await smtp.mail("app@sender.example")
        for r in rcpts:
            await smtp.rcpt(r)
        return await smtp.data(message(rcpts, category=category, message_id=message_id))
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message
    finally:
        smtp.close()


# -- fault tests: the process tree of `serve`, the embedded server, probes ------------------


def children(pid: int) -> dict[int, str]:
    """{child pid: state letter} of `pid`'s direct children, from /proc ("Z": a zombie)."""
    found: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text.rpartition(")")[2].split()
        if int(fields[1]) == pid:
            found[int(stat.parent.name)] = fields[0]
    return found


def worker_pids(serve_pid: int, log: Path) -> list[int]:
    """The live workers of `optgate serve --workers N` (not the embedded server, not the
    spare waiting to replace one): children that its log names in ``worker_started``."""
    started = {
        int(p) for p in re.findall(r"event='worker_started' worker=\d+ pid=(\d+)", log.read_text())
    }
    return sorted(p for p, state in children(serve_pid).items() if state != "Z" and p in started)


def store_pid(data_dir: Path) -> int | None:
    """The embedded server's pid as its pid file names it (None: not running)."""
    try:
        pid = int((data_dir / "redis" / "server.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


async def https_get(port: int, path: str, ca: Path) -> int:
    """The status code of GET `path` on the gateway's HTTPS listener."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False
    r, w = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 5
    )
    try:
        w.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        status = await asyncio.wait_for(r.readline(), 5)
        return int(status.split()[1])
    finally:
        w.close()
