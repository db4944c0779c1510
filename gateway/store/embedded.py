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
  which restarts the server when it dies (``store.keeper``). While a keeper holds it, nobody else
  starts the server: `ensure()` waits for the keeper's restart instead, so the server is
  always the keeper's child (reaped, no zombie) and never two servers share one AOF.
  `store_recoverable()` reads it for ``/healthz``: a server that is down with no keeper
  will not come back by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import redis.asyncio as aioredis
import structlog
from redis.exceptions import RedisError

from gateway.errors import ConfigError, StoreUnavailable
from gateway.store.connection import client_name
from gateway.store.locks import held_by_others, lock_shared, locked
from gateway.store.server_process import (
    COMMAND_TIMEOUT_S,
    PID_NAME,
    POLL_S,
    SOCKET_NAME,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    admin_client,
    is_our_server,
    pid_running,
    ping,
    read_pid,
    reap,
    start_server,
    wait_up,
)

log = structlog.get_logger("optgate.store.embedded")

LOCK_NAME = "lock"
USERS_NAME = "users"
KEEPER_NAME = "keeper"

# A server that is busy (an fsync stalled by a loaded disk) may miss one COMMAND_TIMEOUT_S;
# the last process to leave asks this often before it leaves the server running.
LEAVE_ATTEMPTS = 3
# Another process may be starting or stopping the server while we wait for the lock.
LOCK_TIMEOUT_S = START_TIMEOUT_S + STOP_TIMEOUT_S + 5.0
# sockaddr_un.sun_path is 108 bytes on Linux (104 on macOS), including the final NUL.
MAX_SOCKET_PATH = 103

__all__ = [
    "COMMAND_TIMEOUT_S",
    "KEEPER_NAME",
    "PID_NAME",
    "SOCKET_NAME",
    "EmbeddedRedis",
    "home_of",
    "store_recoverable",
]


def home_of(data_dir: Path) -> Path:
    """The embedded server's home: its socket, AOF, config, pid file, log and locks."""
    return (data_dir / "redis").resolve()


def _keeper_present(home: Path) -> bool:
    return (home / KEEPER_NAME).exists() and held_by_others(home / KEEPER_NAME)


async def store_recoverable(data_dir: Path) -> bool:
    """False when the data dir's server is down and no keeper will restart it (``/healthz``:
    the process cannot recover by itself). A server that is slow, loading or merely being
    restarted counts as recoverable."""
    home = home_of(data_dir)
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
        home = home_of(data_dir)
        sock = home / SOCKET_NAME
        if len(os.fsencode(sock)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"gateway.data_dir is too deep for a unix socket ({sock} is longer than "
                f"{MAX_SOCKET_PATH} bytes): choose a shorter path"
            )
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        home.chmod(0o700)  # mkdir's mode is filtered by the umask and ignored when it exists
        reap()
        users_fd = lock_shared(home / USERS_NAME)  # held from before we may start it
        try:
            return await cls._attach(home, users_fd, keeper=False)
        except BaseException:
            os.close(users_fd)
            raise

    @classmethod
    async def attach_as_keeper(cls, home: Path) -> EmbeddedRedis:
        """Attach for the keeper (``store.keeper``), starting the server if it is down: the
        keeper waits for no keeper. Holds no users lock (the keeper holds its own)."""
        return await cls._attach(home, None, keeper=True)

    def take_users_lock(self) -> int | None:
        """Hand this attachment's users lock (its descriptor) to the caller."""
        users_fd, self._users_fd = self._users_fd, None
        return users_fd

    def give_users_lock(self, users_fd: int | None) -> None:
        """Let this attachment hold `users_fd` (closed when it leaves)."""
        self._users_fd = users_fd

    async def drop_presence(self) -> None:
        """Close the presence connection without leaving (its server died: the keeper
        attached afresh to the new one)."""
        if self._presence is not None:
            with contextlib.suppress(Exception):
                await self._presence.aclose()

    @classmethod
    async def _attach(cls, home: Path, users_fd: int | None, *, keeper: bool) -> EmbeddedRedis:
        sock = home / SOCKET_NAME
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            async with locked(home / LOCK_NAME, timeout_s=LOCK_TIMEOUT_S, poll_s=POLL_S):
                started = False
                state = await ping(sock)
                pid = read_pid(home)
                if pid is not None and is_our_server(pid, home):
                    if state != "up":
                        # Alive but not answering yet (loading its AOF, or started by a
                        # process that died before it answered): never start a second
                        # server on one AOF.
                        state = await wait_up(sock, home, pid, None)
                elif state != "down":
                    raise StoreUnavailable(
                        f"a server answers on {sock} but {home / PID_NAME} does not name it; "
                        "stop that server or remove the socket"
                    )
                waiting = state == "down" and not keeper and _keeper_present(home)
                if not waiting:
                    if pid is None or state == "down":
                        pid = await start_server(home)
                        started = True
                    presence = admin_client(sock)
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

    async def release(self) -> None:
        """Leave; the last process to leave stops the server. Idempotent."""
        presence, self._presence = self._presence, None
        if presence is None:
            return
        users_fd, self._users_fd = self._users_fd, None
        try:
            async with locked(self.home / LOCK_NAME, timeout_s=LOCK_TIMEOUT_S, poll_s=POLL_S):
                # Another process attached (a gateway whose connections are not back yet
                # after a restart of the server, say): not ours to stop.
                if users_fd is None or not held_by_others(self.home / USERS_NAME, users_fd):
                    await self._stop_if_last(presence)
        finally:
            if users_fd is not None:
                os.close(users_fd)
            await presence.aclose()
            reap()

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
                        pid=read_pid(self.home) or self.pid,
                        reason=f"no answer in {LEAVE_ATTEMPTS} x {COMMAND_TIMEOUT_S:.0f} s",
                    )
                    return
            except (RedisError, OSError):
                return  # no server answers: nothing to stop
        pid = read_pid(self.home) or self.pid
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            reap()
            if not pid_running(pid):
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
                    client = admin_client(self.socket_path)
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
