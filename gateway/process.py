"""One `optgate serve` process from signal to exit: SIGTERM/SIGINT stop it gracefully,
SIGHUP reloads rules and keys (also one asked for during start-up), and what start-up made
is frozen out of the garbage collector's way.

Start-up failures an operator can fix are one line each, ``<what> — <what to do>``, naming
the path (never an address): `preflight` finds a folder that cannot be written, a key file
that cannot be read and a certificate pair that cannot be made before anything starts, and
`startup_problem` words what only starting finds (a store that does not start)."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import signal
from pathlib import Path
from typing import Final

import structlog

from gateway import keyfile, listeners, senders, shared_counts
from gateway.config import Config
from gateway.errors import AuditError, ConfigError, KeyringError, StoreUnavailable
from gateway.service import Gateway

log = structlog.get_logger("optgate")


async def serve(cfg: Config, *, worker: int | None = None) -> None:
    """Run one gateway process; `worker` is its index under `optgate serve --workers N`."""
    if worker is None:
        gw = Gateway(cfg)
    else:
        gw = Gateway(cfg, stream=f"{cfg.gateway.instance}-w{worker}")
        handed = listeners.inherited()
        if handed is not None:  # started by the supervisor: its sockets and its counts
            gw.listeners, counts_fd = handed
            gw.counts = shared_counts.attach(counts_fd).view(worker)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    started = False
    hup_pending = False
    reloads: set[asyncio.Task[bool]] = set()

    def reload_now() -> None:
        task = asyncio.ensure_future(gw.reload())
        reloads.add(task)  # keep a reference until it finishes
        task.add_done_callback(reloads.discard)

    def on_hup() -> None:
        nonlocal hup_pending
        if started:
            reload_now()
        else:
            hup_pending = True  # a reload asked for during start-up runs right after it

    # Handlers go in before the listeners open: a signal during start-up must neither kill
    # the process (SIGHUP's default action) nor be lost.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # a worker starts with it blocked
    await gw.start()
    started = True
    listeners.report_ready()  # under `serve --workers N`: this worker serves now
    # Everything made at start-up (rules, keys, libraries, pools: ~83,000 objects) lives as
    # long as the process. Left to the collector, each full collection walks it again and
    # stalls the loop ~35 ms under load; frozen, a full collection took ~3 ms instead
    # (measured with a gc.callbacks probe at 700 msg/s; loadtests/README.md).
    gc.collect()
    gc.freeze()
    if hup_pending:
        reload_now()
    if gw.dev_sender_created and worker is None:
        log.info("dev_sender", name=senders.DEV_SENDER, password_file=str(cfg.dev_sender_secret))
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        await gw.stop()


# A valkey log line's prefix: "31025:M 04 Dec 2026 23:33:48.989 # " (pid, role, time, level).
_LOG_PREFIX: Final = re.compile(r"^\d+:[A-Z] \d+ \w+ \d+ [\d:.]+ [#*.-] ")
STORE_HOME: Final = "redis"  # the embedded server's folder under data_dir (store.embedded)
WRITABLE: Final = "a folder this user can write"


def _unwritable(folder: Path) -> str | None:
    """Why `folder` cannot be created or written, or None when it can; creates nothing."""
    here = folder
    while not os.path.lexists(here) and here != here.parent:
        here = here.parent
    if not here.is_dir():
        return f"{here} is not a folder"
    if not os.access(here, os.W_OK | os.X_OK):
        return f"{here}: permission denied"
    return None


def preflight(cfg: Config) -> None:
    """Raise ConfigError (one line: what, then what to do) for the first folder or file
    start-up would fail on, before anything is bound, made or started."""
    data = cfg.gateway.data_dir
    checks = [
        (data, f"data_dir {data}", f"set [gateway] data_dir to {WRITABLE}"),
        (cfg.audit.dir, f"audit dir {cfg.audit.dir}", f"set [audit] dir to {WRITABLE}"),
    ]
    if not cfg.redis.url:
        home = data / STORE_HOME
        checks.append(
            (home, f"the embedded store's folder {home}",
             "move what is there aside, or set [gateway] data_dir elsewhere")
        )  # fmt: skip
    for folder, what, fix in checks:
        why = _unwritable(folder)
        if why:
            raise ConfigError(f"{what} cannot be used ({why}) — {fix}")
    _check_keys(cfg.keys.file)
    cert, key = cfg.tls.cert, cfg.tls.key
    if not cert.exists() and not key.exists():
        why = _unwritable(cert.parent) or _unwritable(key.parent)
        if why:
            raise ConfigError(
                f"TLS certificate {cert} and key {key} are missing and cannot be made ({why})"
                f" — set [tls] cert and key to an existing pair, or to {WRITABLE}"
            )


def _check_keys(path: Path) -> None:
    fix = "restore it from a backup, or set [keys] file to the right one"
    if not os.path.lexists(path):
        why = _unwritable(path.parent)
        if why:
            raise ConfigError(
                f"key file {path} cannot be created ({why}) — set [keys] file to {WRITABLE}"
            )
        return
    try:
        keyfile.load(path)
    except KeyringError as exc:
        raise ConfigError(f"{exc} — {fix}") from None


def _server_log_reason(home: Path) -> str | None:
    """The embedded server's last complaint (its log's last warning), without its prefix."""
    try:
        lines = (home / "server.log").read_text(errors="replace").splitlines()
    except OSError:
        return None
    warned = [ln for ln in lines[-20:] if " # " in ln]
    return _LOG_PREFIX.sub("", warned[-1]).strip() if warned else None


def startup_problem(exc: BaseException, cfg: Config) -> str | None:
    """One line, "<what> — <what to do>", for a failure to start; None for the unforeseen."""
    if isinstance(exc, StoreUnavailable):
        if cfg.redis.url:
            return (
                f"the opt-out store did not answer ({exc}) — check that it runs and that "
                "[redis] url and its credentials are right"
            )
        home = (cfg.gateway.data_dir / STORE_HOME).resolve()
        reason = _server_log_reason(home) or str(exc)
        return (
            f"the embedded store in {home} did not start: {reason} — see "
            f"{home / 'server.log'}, fix what it names, then start again"
        )
    if isinstance(exc, KeyringError):
        return f"{exc} — restore the key file, or set [keys] file to the right one"
    if isinstance(exc, AuditError):
        return (
            f"the audit log in {cfg.audit.dir} cannot be written ({exc}) — set [audit] dir "
            f"to {WRITABLE}"
        )
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror} — make it {WRITABLE}, or configure another path"
    return None
