"""The supervisor's keeper of the embedded server: restart it whenever it dies.

`optgate serve --workers N`'s supervisor holds ``<data_dir>/redis/keeper`` shared while it
keeps the server (``store.embedded`` reads that lock: while a keeper holds it, nobody else
starts the server, so the server is always the keeper's child, reaped, and never two servers
share one AOF). The server is restarted on the same config and the same AOF, so nothing
acknowledged is lost; a crash loop is slowed down, and after repeated failed starts the
keeper gives up, which ``/healthz`` then reports.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import structlog

from gateway.errors import StoreUnavailable
from gateway.store.embedded import KEEPER_NAME, EmbeddedRedis, home_of
from gateway.store.locks import lock_shared
from gateway.store.server_process import CHILDREN, pid_running, reap

log = structlog.get_logger("optgate.store.embedded")

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
        self.home = home_of(data_dir)
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
        self._users_fd = probe.take_users_lock()
        self._keeper_fd = lock_shared(self.home / KEEPER_NAME)
        self.embedded = probe
        self._started_at = time.monotonic()
        return probe

    def _alive(self) -> bool:
        reap()  # our own children: no zombie, and poll() below sees the exit
        emb = self.embedded
        if emb is None:
            return False
        proc = CHILDREN.get(emb.pid)
        if proc is not None:
            return proc.poll() is None
        return pid_running(emb.pid)  # started by another process: watch by pid

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
            fresh = await EmbeddedRedis.attach_as_keeper(self.home)
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
        await old.drop_presence()
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
            emb.give_users_lock(self._users_fd)
            self._users_fd = None
            await emb.release()
        elif self._users_fd is not None:
            os.close(self._users_fd)
            self._users_fd = None
        reap()
