"""`optgate serve --workers N`: one supervisor, N worker processes sharing the listeners.

The supervisor does once what must happen once: validates config, rules, keys and
certificates (exit 2 on any problem, before a worker starts), creates missing dev
material, and starts the embedded store (holding it open, so no worker's exit stops it).
Each worker binds the SMTP and HTTPS ports with SO_REUSEPORT (the kernel spreads
connections), writes its own audit stream (`<instance>-w<i>`), and reads the shared store.

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

from gateway import keyfile, metrics, senders, tls
from gateway import rules as rules_io
from gateway.config import Config
from gateway.core import tokens
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
        # Workers inherit stdout/stderr, so their log lines reach the same place.
        w.proc = subprocess.Popen(cmd, env=env)  # noqa: S603 - fixed argv, our own module
        w.started_at = time.monotonic()
        log.info("worker_started", worker=w.index, pid=w.proc.pid)

    def _reaped(self, proc: subprocess.Popen[bytes]) -> None:
        """Bookkeeping for a worker that has exited: its live gauges leave the metrics."""
        if self._metrics_dir is not None:
            metrics.process_dead(proc.pid, self._metrics_dir)

    def _signal_all(self, sig: int) -> None:
        for w in self._workers:
            if w.proc is not None and w.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: self._signal_all(signal.SIGHUP))
        prepare(self.cfg)
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
                self._reaped(w.proc)
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
            self._reaped(w.proc)
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
    rules_io.load_dir(rules_io.choose_dir(cfg.rules.dir, cfg.base_dir))
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
