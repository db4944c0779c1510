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
are forwarded and the supervisor waits up to the grace period before killing.

Restarts (as systemd's ``Restart=`` with ``StartLimitBurst``, or supervisord's
``startsecs``): a worker reports ready once it serves (a byte on a pipe it inherits,
`listeners.report_ready`); the supervisor never guesses from uptime.

- A worker that served and then died is restarted at once; only one that keeps dying
  within `QUICK_DEATH_S` of being ready waits a little (`RESTART_BACKOFF_S`), and a
  healthy run resets that.
- A worker that exits before it is ready failed to start (a config or key file made
  invalid since the supervisor checked it, say). After `MAX_START_FAILURES` of those in a
  row the service ends: one line on stderr, exit code 1, the store stopped. A worker
  SIGKILLed from outside before it was ready did not fail: it is restarted, not counted.
- Every child is reaped, the embedded server included: the supervisor is its keeper
  (`store.keeper.Keeper`), restarting it on its own AOF within `TICK_S` of its death
  (with back-off if it keeps dying); workers reconnect by themselves and answer ``451``
  meanwhile. A keeper that gives up makes every worker's ``/healthz`` fail.

Restart-to-ready: a replacement is a spare process that has already imported
everything a worker needs (`gateway.spares`).

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
from dataclasses import dataclass, field, replace
from pathlib import Path

import structlog

from gateway import keyfile, listeners, metrics, rules_files, senders, shared_counts, tls
from gateway.config import Config
from gateway.core import tokens
from gateway.core.peers import Counts
from gateway.http.health import warn_shadow_mode
from gateway.service import GRACE_S, open_store
from gateway.smtp import dkim
from gateway.spares import Spares
from gateway.store.keeper import Keeper

log = structlog.get_logger("optgate.supervisor")

TICK_S = 0.1  # how often exits are looked for: a dead worker or store waits at most this
# A worker that dies sooner than this after it was ready, again and again, gets a growing
# pause before its restart (the first two deaths are restarted at once); a run this long
# resets it.
QUICK_DEATH_S = 2.0
RESTART_BACKOFF_S = (0.0, 0.0, 0.25, 0.5, 1.0, 2.0)
# Failures to start in a row (a worker that exits before it is ready) before the service
# gives up, and the pauses between them: a config made invalid does not heal itself.
MAX_START_FAILURES = 5
START_BACKOFF_S = (0.25, 0.5, 1.0, 2.0)
# A worker not ready this long after its start is killed and counts as failed to start (a
# start is about a second; the store's own start wait is 10 s).
READY_TIMEOUT_S = 60.0
METRICS_DIR = "metrics"  # under the data dir; one subfolder per instance name


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None  # the read end of its ready pipe, until it reports
    started_at: float = 0.0
    ready_at: float | None = None
    start_failures: int = 0  # in a row
    quick_deaths: int = 0  # in a row, each within QUICK_DEATH_S of being ready
    timed_out: bool = False  # killed for not becoming ready in time
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
    _keeper: Keeper | None = None
    _failed: str = ""  # why the service gives up
    _spares: Spares | None = None

    def _worker_argv(self, index: int) -> list[str]:
        argv = ["serve", "--worker-index", str(index)]
        if self.config_arg:
            argv += ["--config", self.config_arg]
        return argv

    def _popen(
        self, cmd: list[str], extra_env: dict[str, str], extra_fds: tuple[int, ...]
    ) -> tuple[subprocess.Popen[bytes], int]:
        """A child that inherits what a worker inherits; (process, read end of its ready pipe)."""
        env = dict(os.environ)
        if self._metrics_dir is not None:
            # In the child's environment from its first instruction: prometheus-client
            # picks its multiprocess value store when it is imported.
            env.pop("prometheus_multiproc_dir", None)
            env[metrics.MULTIPROC_ENV] = str(self._metrics_dir)
        env.update(extra_env)
        fds: tuple[int, ...] = extra_fds
        ready_r, ready_w = os.pipe()
        if self._listeners is not None and self._counts is not None:
            env[listeners.INHERIT_ENV], handed = self._listeners.handoff(self._counts.fd, ready_w)
            fds += handed
        # A SIGHUP reaching a worker before its handler is in would end it (the default
        # action), as a reload asked for just after start did: each worker starts with
        # SIGHUP blocked and unblocks it once its handler is in (`service.serve`), so such a
        # reload waits and is then applied.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            # Workers inherit stdout/stderr, so their log lines reach the same place.
            proc = subprocess.Popen(cmd, env=env, pass_fds=fds)  # noqa: S603 - fixed argv
        except OSError:
            os.close(ready_r)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(ready_w)  # the worker's copy is the only one: EOF when it exits
        return proc, ready_r

    def _spawn(self, w: _Worker) -> None:
        taken = self._spares.take(self._worker_argv(w.index)) if self._spares else None
        if taken is None:
            cmd = [sys.executable, "-m", "gateway", *self._worker_argv(w.index)]
            w.proc, ready_r = self._popen(cmd, {}, ())
        else:
            w.proc, ready_r = taken
        w.started_at = time.monotonic()
        w.ready_at, w.timed_out, w.ready_fd = None, False, ready_r
        asyncio.get_running_loop().add_reader(ready_r, self._on_ready, w, ready_r)
        pid = w.proc.pid if w.proc is not None else 0
        log.info("worker_started", worker=w.index, pid=pid, spare=taken is not None)

    def _on_ready(self, w: _Worker, fd: int) -> None:
        """The worker's byte (it serves), or EOF (it exited before serving)."""
        try:
            said = os.read(fd, 16)
        except OSError:
            said = b""
        self._close_ready(w)
        if said and w.ready_fd is None and w.proc is not None:
            w.ready_at = time.monotonic()
            log.info(
                "worker_ready",
                worker=w.index,
                pid=w.proc.pid,
                start_s=round(w.ready_at - w.started_at, 3),
            )

    def _close_ready(self, w: _Worker) -> None:
        fd, w.ready_fd = w.ready_fd, None
        if fd is not None:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

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
            if self.cfg.gateway.shadow:
                warn_shadow_mode(log)
            self._counts = shared_counts.create(self.workers, self.cfg.gateway.data_dir)
            self._view = self._counts.view(0)
            self._metrics_dir = metrics.fresh_multiprocess_dir(
                self.cfg.gateway.data_dir / METRICS_DIR / self.cfg.gateway.instance
            )
            cfg = self.cfg
            if not cfg.redis.url:
                # We keep the embedded server: started (or attached to) here, restarted
                # here when it dies, so it is always our child and never a zombie.
                self._keeper = Keeper(cfg.gateway.data_dir)
                embedded = await self._keeper.start()
                cfg = replace(cfg, redis=replace(cfg.redis, url=embedded.url))
            try:
                store, _ = await open_store(cfg, keyfile.load(self.cfg.keys.file))
                try:
                    warning = await store.durability_warning()
                    if warning:
                        log.warning("store_durability", detail=warning)
                    code = await self._supervise()
                finally:
                    await store.close()
            finally:
                if self._keeper is not None:
                    await self._keeper.release()
            if self._failed:
                print(f"optgate: error: {self._failed}", file=sys.stderr, flush=True)
            return code
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
        keeping = asyncio.ensure_future(self._keep_store(stop))
        spares = self._spares = Spares(popen=self._popen, metrics_dir=self._metrics_dir)
        self._workers = [_Worker(index=i) for i in range(self.workers)]
        for w in self._workers:
            self._spawn(w)
        code = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=TICK_S)
            if stop.is_set():
                break
            if not self._reap_and_restart():
                code = 1
                break
            # A spare only while no worker is starting: the first starts come first.
            starting = any(w.proc is not None and w.ready_at is None for w in self._workers)
            spares.keep(may_start=not starting)
            spares.reap()
        self._stopping = True
        spares.drop_waiting()
        stop.set()
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
            self._close_ready(w)
            if w.proc is not None:
                w.proc.wait()
                self._reaped(w, w.proc)
        spares.reap(wait=True)
        with contextlib.suppress(Exception):
            await keeping
        return code

    async def _keep_store(self, stop: asyncio.Event) -> None:
        """Restart the embedded server whenever it dies (`Keeper`), until we stop."""
        keeper = self._keeper
        if keeper is None:
            return
        while not stop.is_set():
            try:
                await keeper.check()
            except Exception:  # keep keeping; the next tick tries again
                log.exception("embedded_store_check_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=TICK_S)

    def _reap_and_restart(self) -> bool:
        """Reap exited workers and schedule their restarts. False: give up (the reason is
        in `_failed`)."""
        now = time.monotonic()
        for w in self._workers:
            if w.proc is None:
                continue
            if w.proc.poll() is None:
                if w.ready_at is None and not w.timed_out and now - w.started_at > READY_TIMEOUT_S:
                    log.error("worker_not_ready", worker=w.index, waited_s=READY_TIMEOUT_S)
                    w.timed_out = True
                    with contextlib.suppress(ProcessLookupError):
                        w.proc.kill()
                continue
            if w.ready_fd is not None:
                self._on_ready(w, w.ready_fd)  # a byte it wrote just before dying counts
            code = w.proc.returncode
            self._reaped(w, w.proc)
            w.proc, w.restarts = None, w.restarts + 1
            if w.ready_at is not None:
                lived = now - w.ready_at
                w.start_failures = 0
                w.quick_deaths = w.quick_deaths + 1 if lived < QUICK_DEATH_S else 0
                delay = RESTART_BACKOFF_S[min(w.quick_deaths, len(RESTART_BACKOFF_S) - 1)]
                log.error("worker_exited", worker=w.index, code=code, lived_s=round(lived, 1))
            elif code == -signal.SIGKILL and not w.timed_out:
                # Killed from outside while starting (an operator, the OOM killer): it did
                # not fail, and a restart is what it needs.
                w.quick_deaths += 1
                delay = RESTART_BACKOFF_S[min(w.quick_deaths, len(RESTART_BACKOFF_S) - 1)]
                log.error("worker_killed_starting", worker=w.index)
            else:
                w.start_failures += 1
                log.error(
                    "worker_start_failed", worker=w.index, code=code, failures=w.start_failures
                )
                if w.start_failures >= MAX_START_FAILURES:
                    self._failed = (
                        f"worker {w.index} failed to start {w.start_failures} times in a row "
                        f"(last exit code {code}); see the log lines above; stopping"
                    )
                    log.error("giving_up", worker=w.index, failures=w.start_failures)
                    return False
                delay = START_BACKOFF_S[min(w.start_failures - 1, len(START_BACKOFF_S) - 1)]
            if delay <= 0:
                self._spawn(w)
            else:
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
