"""`optgate serve --workers N`: one supervisor, N worker processes sharing the listeners.

The supervisor does once what must happen once: validates config, rules, keys and
certificates (exit 2 on any problem, before a worker starts), creates missing dev
material, binds every listen address (`gateway.listeners`: exit 2, one line naming the
address, when another process holds one; nothing else has started then), makes the
per-address counts every worker shares (`gateway.shared_counts`), and starts the embedded
store (holding it open, so no worker's exit stops it). Each worker inherits the listening
sockets and accepts from them, writes its own audit stream (`<instance>-w<i>`), counts
its connections and failed logins in its own column of the shared counts, and reads the
shared store. A worker that is replaced has its connection counts cleared (its
connections died with it).

Signals: SIGHUP is forwarded to every worker (each reloads rules and keys); SIGTERM/SIGINT
are forwarded and the supervisor waits up to the grace period before killing. A worker that
dies is restarted with backoff and logged; one that keeps failing at start ends the service.

Metrics: each start empties ``<data_dir>/metrics/<instance>`` (mode 0700) and hands it to
every worker as ``PROMETHEUS_MULTIPROC_DIR``, so any worker's ``/metrics`` reports the
whole service (`gateway.metrics`). Each reaped worker is marked dead there, which drops its
"live" gauges and keeps its counts in the totals.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from gateway import keyfile, listeners, metrics, rules_files, senders, shared_counts, tls
from gateway.config import Config
from gateway.core import tokens
from gateway.core.peers import Counts
from gateway.service import GRACE_S, open_store
from gateway.smtp import dkim

log = structlog.get_logger("optgate.supervisor")

RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
QUICK_EXIT_S = 5.0  # a worker dying sooner than this after start counts as a start failure
MAX_QUICK_FAILURES = 5  # consecutive start failures before the service gives up
METRICS_DIR = "metrics"  # under the data dir; one subfolder per instance name


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_failures: int = 0
    restarts: int = 0


@dataclass
class Supervisor:
    cfg: Config
    workers: int
    config_arg: str | None
    _workers: list[_Worker] = field(default_factory=list)
    _stopping: bool = False
    _metrics_dir: Path | None = None
    _listeners: listeners.Listeners | None = None
    _counts: shared_counts.SharedCounts | None = None
    _view: Counts | None = None  # the supervisor's own view: it clears a dead worker's column

    def _spawn(self, w: _Worker) -> None:
        cmd = [sys.executable, "-m", "gateway", "serve", "--worker-index", str(w.index)]
        if self.config_arg:
            cmd += ["--config", self.config_arg]
        env = dict(os.environ)
        if self._metrics_dir is not None:
            # In the child's environment from its first instruction: prometheus-client
            # picks its multiprocess value store when it is imported.
            env.pop("prometheus_multiproc_dir", None)
            env[metrics.MULTIPROC_ENV] = str(self._metrics_dir)
        fds: tuple[int, ...] = ()
        if self._listeners is not None and self._counts is not None:
            env[listeners.INHERIT_ENV], fds = self._listeners.handoff(self._counts.fd)
        # A SIGHUP reaching a worker before its handler is in would end it (the default
        # action), as a reload asked for just after start did: each worker starts with
        # SIGHUP blocked and unblocks it once its handler is in (`service.serve`), so such a
        # reload waits and is then applied.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            # Workers inherit stdout/stderr, so their log lines reach the same place.
            w.proc = subprocess.Popen(cmd, env=env, pass_fds=fds)  # noqa: S603 - fixed argv
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        w.started_at = time.monotonic()
        log.info("worker_started", worker=w.index, pid=w.proc.pid)

    def _reaped(self, w: _Worker, proc: subprocess.Popen[bytes]) -> None:
        """Bookkeeping for a worker that has exited: its live gauges leave the metrics, and
        its connections (gone with it) leave the per-address counts."""
        if self._metrics_dir is not None:
            metrics.process_dead(proc.pid, self._metrics_dir)
        if self._view is not None:
            self._view.clear_connections(w.index)

    def _signal_all(self, sig: int) -> None:
        for w in self._workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: self._signal_all(signal.SIGHUP))
        # First: an address in use ends the start here, before anything is made or started.
        self._listeners = listeners.bind(self.cfg)
        try:
            prepare(self.cfg)
            self._counts = shared_counts.create(self.workers, self.cfg.gateway.data_dir)
            self._view = self._counts.view(0)
            self._metrics_dir = metrics.fresh_multiprocess_dir(
                self.cfg.gateway.data_dir / METRICS_DIR / self.cfg.gateway.instance
            )
            store, embedded = await open_store(self.cfg, keyfile.load(self.cfg.keys.file))
            try:
                warning = await store.durability_warning()
                if warning:
                    log.warning("store_durability", detail=warning)
                return await self._supervise()
            finally:
                await store.close()
                if embedded is not None:
                    await embedded.release()
        finally:
            self._close_listeners()
            if self._counts is not None:
                self._counts.close()

    def _close_listeners(self) -> None:
        """Stop holding the listen addresses: once the workers close theirs too, new
        connections are refused rather than queued for nobody."""
        if self._listeners is not None:
            self._listeners.close()
            self._listeners = None

    async def _supervise(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        self._workers = [_Worker(index=i) for i in range(self.workers)]
        for w in self._workers:
            self._spawn(w)
        code = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            if stop.is_set():
                break
            if not self._reap_and_restart():
                code = 1
                break
        self._stopping = True
        log.info("stopping", workers=self.workers)
        self._close_listeners()
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S + 5
        for w in self._workers:
            if w.proc is not None:
                remaining = max(0.0, deadline - time.monotonic())
                with contextlib.suppress(subprocess.TimeoutExpired):
                    await asyncio.to_thread(w.proc.wait, remaining)
        self._signal_all(signal.SIGKILL)
        for w in self._workers:
            if w.proc is not None:
                w.proc.wait()
                self._reaped(w, w.proc)
        return code

    def _reap_and_restart(self) -> bool:
        """Restart dead workers. False when one keeps failing at start (give up)."""
        now = time.monotonic()
        for w in self._workers:
            if w.proc is None or w.proc.poll() is None:
                continue
            lived = now - w.started_at
            log.error(
                "worker_exited", worker=w.index, code=w.proc.returncode, lived_s=round(lived, 1)
            )
            self._reaped(w, w.proc)
            w.quick_failures = w.quick_failures + 1 if lived < QUICK_EXIT_S else 0
            if w.quick_failures >= MAX_QUICK_FAILURES:
                log.error("worker_failing", worker=w.index, failures=w.quick_failures)
                return False
            delay = RESTART_BACKOFF_S[min(w.restarts, len(RESTART_BACKOFF_S) - 1)]
            w.restarts += 1
            w.proc = None
            asyncio.get_running_loop().call_later(delay, self._respawn, w)
        return True

    def _respawn(self, w: _Worker) -> None:
        if not self._stopping and w.proc is None:
            self._spawn(w)


def prepare(cfg: Config) -> None:
    """Everything that must be valid or exist before any worker starts (raises ConfigError)."""
    rules = rules_files.load_dir(rules_files.choose_dir(cfg.rules.dir, cfg.base_dir))
    rules_files.check_senders(rules, cfg.senders)  # a default category outside its grant
    keyfile.load_or_create(cfg.keys.file)
    _, dev = senders.build(cfg)
    if dev:
        log.info("dev_sender", name=senders.DEV_SENDER, password_file=str(cfg.dev_sender_secret))
    tls.ensure_dev_certs(cfg.tls.cert, cfg.tls.key)
    tls.server_context(cfg.tls.cert, cfg.tls.key, client_ca=cfg.tls.client_ca)
    tokens.Links(public_url=cfg.gateway.public_url, domain=cfg.gateway.unsubscribe_domain)
    dkim.load_keys(cfg.dkim)  # a key that cannot sign stops the service before any worker


def default_workers() -> int:
    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
