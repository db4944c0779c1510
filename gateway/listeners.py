"""The listening sockets, bound once per service, and how workers inherit them.

Each listen address (SMTP STARTTLS, SMTP implicit TLS, HTTPS) is bound exactly once, by
the process that starts the service, without SO_REUSEPORT: a second gateway started on an
address already taken fails at once (`ConfigError`, exit 2, one line naming the address)
instead of silently receiving part of the connections, which would reach its own store
(another set of opt-outs). The workers of ``optgate serve --workers N`` inherit the same
sockets and all accept from their one queue; connections made while a worker restarts
wait in that queue rather than being refused.

SO_REUSEADDR is set (as asyncio does): on Linux it lets a restart bind while old
connections sit in TIME_WAIT, and never lets two sockets listen on one address.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from dataclasses import dataclass

from gateway.config import Config, Listen
from gateway.errors import ConfigError

# Connections the kernel queues per listener before a worker accepts them, e.g. while a
# worker restarts (Linux caps it at net.core.somaxconn, 4096 since 5.4).
BACKLOG = 1024
# How a worker learns its inherited descriptors: "smtp=3,4 smtps=5 http=6 counts=7 ready=8".
INHERIT_ENV = "OPTGATE_INHERITED_FDS"
# The write end of the pipe on which a worker tells its supervisor it serves (`report_ready`).
_READY_FD: list[int] = []
_WHY = {
    errno.EACCES: "permission denied (a port under 1024 needs privileges)",
    errno.EADDRNOTAVAIL: "no such local address",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Listeners:
    """The bound, listening sockets of the three services (several per service when its
    host name resolves to several addresses)."""

    smtp: tuple[socket.socket, ...]
    smtps: tuple[socket.socket, ...]
    http: tuple[socket.socket, ...]

    def all(self) -> tuple[socket.socket, ...]:
        return self.smtp + self.smtps + self.http

    def close(self) -> None:
        for sock in self.all():
            sock.close()

    def handoff(self, counts_fd: int, ready_fd: int | None = None) -> tuple[str, tuple[int, ...]]:
        """(value of INHERIT_ENV, descriptors to pass) for a worker process; `ready_fd` is
        the write end of the pipe the worker reports ready on (`report_ready`)."""
        parts = [
            f"{name}={','.join(str(s.fileno()) for s in socks)}"
            for name, socks in (("smtp", self.smtp), ("smtps", self.smtps), ("http", self.http))
        ]
        parts.append(f"counts={counts_fd}")
        extra: tuple[int, ...] = (counts_fd,)
        if ready_fd is not None:
            parts.append(f"ready={ready_fd}")
            extra += (ready_fd,)
        return " ".join(parts), (*(s.fileno() for s in self.all()), *extra)


def inherited() -> tuple[Listeners, int] | None:
    """(sockets, counts descriptor) handed down by the supervisor; None when started alone."""
    value = os.environ.pop(INHERIT_ENV, "")
    if not value:
        return None
    fds: dict[str, list[int]] = {}
    for part in value.split():
        name, _, numbers = part.partition("=")
        fds[name] = [int(n) for n in numbers.split(",") if n]
    if fds.get("ready"):
        _READY_FD[:] = fds["ready"][:1]
        os.set_inheritable(_READY_FD[0], False)  # not for the embedded server or others
    socks = {
        name: tuple(socket.socket(fileno=fd) for fd in fds.get(name, []))
        for name in ("smtp", "smtps", "http")
    }
    listeners = Listeners(smtp=socks["smtp"], smtps=socks["smtps"], http=socks["http"])
    return listeners, fds["counts"][0]


def bind(cfg: Config) -> Listeners:
    """Bind and listen on every configured address, or raise ConfigError naming the first
    that cannot be had (and hold none)."""
    where = (
        ("smtp", cfg.smtp.listen),
        ("smtps", cfg.smtp.listen_tls),
        ("http", cfg.http.listen),
    )
    seen: set[tuple[str, int]] = set()
    for _, listen in where:
        if listen.port and (listen.host, listen.port) in seen:
            raise ConfigError(f"{listen} is configured for two listeners")
        seen.add((listen.host, listen.port))
    bound: dict[str, tuple[socket.socket, ...]] = {}
    try:
        for name, listen in where:
            bound[name] = _bind_one(listen)
    except BaseException:
        for socks in bound.values():
            for sock in socks:
                sock.close()
        raise
    return Listeners(smtp=bound["smtp"], smtps=bound["smtps"], http=bound["http"])


def _bind_one(listen: Listen) -> tuple[socket.socket, ...]:
    try:
        infos = socket.getaddrinfo(
            listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        raise ConfigError(f"cannot listen on {listen}: unknown host") from None
    socks: list[socket.socket] = []
    port = listen.port
    try:
        for family, kind, proto, _, resolved in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # One socket per address family, as asyncio does; else [::] would also
                # take the IPv4 port that the 0.0.0.0 socket binds next.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # A port 0 listener on several addresses: the first picks, the others follow.
            address = (resolved[0], port, *resolved[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ConfigError(f"{listen} is already in use by another process") from None
                why = _WHY.get(exc.errno or 0, exc.strerror or "cannot bind")
                raise ConfigError(f"cannot listen on {listen}: {why}") from None
            port = sock.getsockname()[1]
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
        raise
    return tuple(socks)


def report_ready() -> None:
    """Tell the supervisor this worker serves (one byte on the pipe it handed down; a no-op
    when started alone). The pipe stays open for the life of the worker: the supervisor
    counts a worker that exits before this byte as one that failed to start."""
    while _READY_FD:
        fd = _READY_FD.pop()
        with contextlib.suppress(OSError):  # a supervisor already gone: nobody to tell
            os.write(fd, b"R")
