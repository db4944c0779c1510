"""Lifecycle of one gateway process: start everything, serve, reload on SIGHUP, stop.

Start order binds the listen addresses first (`gateway.listeners`: one taken by another
process ends the start before anything is made or started) and puts every other check
that can fail before any connection is accepted, so a bad config, rules folder or key
file ends the process with one clear error (exit 2) and a working gateway never
half-starts; a start that fails later releases what it started (the embedded store).
Stop order follows uvicorn: close listeners, let SMTP transactions and HTTP requests in
flight finish up to a grace period (a session between transactions gets ``421 4.3.2`` at
once), then close the upstream pool, the audit log and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import structlog

from gateway import keyfile, listeners, rules_files, senders, tls
from gateway.audit import disk
from gateway.audit.writer import AuditWriter
from gateway.config import Config
from gateway.core import tokens
from gateway.core.entries import ConfigReload, Start
from gateway.core.keys import Keyring
from gateway.core.peers import HTTPS, SMTP, Counts, PerAddress
from gateway.core.rules import Rules
from gateway.errors import ConfigError, KeyringError, OptgateError
from gateway.feedback.apply import Applier
from gateway.http import admin as admin_routes
from gateway.http import app as http_app
from gateway.http import consents as consent_routes
from gateway.http import feedback as feedback_routes
from gateway.http import health as health_routes
from gateway.http import openapi as openapi_routes
from gateway.http import sms as sms_routes
from gateway.http import unsubscribe as unsubscribe_routes
from gateway.listeners import Listeners
from gateway.review import pages as review_pages
from gateway.smtp import choose as upstream_choice
from gateway.smtp import dkim
from gateway.smtp import listen as smtp_listen
from gateway.smtp.flow import EmailFlow
from gateway.smtp.handler import GatewayHandler
from gateway.smtp.limiter import ConnectionLimiter
from gateway.smtp.server import Limits
from gateway.store.opening import open_store as open_store  # noqa: PLC0414 - re-exported: `optgate serve`'s supervisor and the CLI open the store through here
from gateway.store.redis_store import OptOutStore
from gateway.unsubscribe import Unsubscriber

log = structlog.get_logger("optgate")

GRACE_S = 10.0  # how long open sessions may finish after SIGTERM
KEY_REFRESH_S = 1.0  # at most one key-file re-read per second, whatever the traffic


@dataclass(slots=True)
class Ports:
    smtp: int = 0
    smtps: int = 0
    http: int = 0


# The route modules mounted on the HTTPS listener, in this order; each has setup(app, deps).
HTTP_ROUTES: Final = (
    sms_routes,
    feedback_routes,  # /feedback/sendgrid, /feedback/ses, /sms/status
    unsubscribe_routes,
    health_routes,  # /readyz, /metrics
    admin_routes,  # /v1 admin API
    consent_routes,  # /v1/consents (docs/consent.md)
    openapi_routes,  # /openapi.json
)
HTTP_MODULES: Final = [module.__name__ for module in HTTP_ROUTES]
# Pages for people on the same listener, after the API: HTML, not part of what
# /openapi.json describes. /review/: the console for security teams (docs/review.md).
HTML_PAGES: Final = (review_pages,)


@dataclass
class Gateway:
    cfg: Config
    stream: str = ""
    # Sockets bound by `optgate serve`'s supervisor and inherited (None: bind them here),
    # and this process's column of the per-address counts every worker shares (None: a
    # private one-column table).
    listeners: Listeners | None = None
    counts: Counts | None = None
    ports: Ports = field(default_factory=Ports)
    _rules: Rules | None = None
    _ring: Keyring | None = None
    _last_key_refresh: float = -KEY_REFRESH_S
    _limiter: ConnectionLimiter | None = None
    _http_runner: Any = None  # aiohttp.web.AppRunner
    _servers: list[asyncio.Server] = field(default_factory=list)
    _closers: list[Any] = field(default_factory=list)
    store: OptOutStore | None = None
    audit: AuditWriter | None = None
    dev_sender_created: bool = False

    @property
    def rules(self) -> Rules:
        if self._rules is None:
            raise RuntimeError("gateway not started")
        return self._rules

    @property
    def keyring(self) -> Keyring:
        if self._ring is None:
            raise RuntimeError("gateway not started")
        return self._ring

    def rules_dir(self) -> Path:
        return rules_files.choose_dir(self.cfg.rules.dir, self.cfg.base_dir)

    async def start(self) -> None:
        """Start everything, or, when any step fails, release what was started (the
        embedded store above all: it would outlive this process) and raise."""
        try:
            await self._start()
        except BaseException:
            await self.stop(grace_s=0)
            raise

    async def _start(self) -> None:
        cfg = self.cfg
        self._rules = rules_files.load_dir(self.rules_dir())
        rules_files.check_senders(self._rules, cfg.senders)  # grants and default categories
        # Bound before anything is made or started (keys, certificates, the store): an
        # address another process holds ends the start here (exit 2), leaving nothing.
        if self.listeners is None:
            self.listeners = listeners.bind(cfg)
        socks = self.listeners
        self._closers.append(socks.close)  # the servers close them first; a no-op then
        self._ring, created = keyfile.load_or_create(cfg.keys.file)
        if created:
            log.info("keys_created", path=str(cfg.keys.file))
        counts = self.counts = self.counts if self.counts is not None else Counts.private()
        auth, self.dev_sender_created = senders.build(cfg, counts=counts)
        self._closers.append(auth.close)
        if tls.ensure_dev_certs(cfg.tls.cert, cfg.tls.key):
            log.info(
                "dev_certificates_created",
                cert=str(cfg.tls.cert),
                ca=str(cfg.tls.cert.parent / "ca.pem"),
            )
        ctx = tls.server_context(cfg.tls.cert, cfg.tls.key, client_ca=cfg.tls.client_ca)
        links = tokens.Links(
            public_url=cfg.gateway.public_url, domain=cfg.gateway.unsubscribe_domain
        )
        dkim_keys = dkim.load_keys(cfg.dkim)  # read once; a key that cannot sign stops here

        store, audit = await self._open_backends(self._ring)
        await self._start_smtp(
            store=store, audit=audit, ctx=ctx, auth=auth, socks=socks, counts=counts,
            links=links, dkim_keys=dkim_keys,
        )  # fmt: skip
        await self._start_http(ctx, auth, socks, counts)
        self.ports.smtp = socks.smtp[0].getsockname()[1]
        self.ports.smtps = socks.smtps[0].getsockname()[1]
        await audit.append([Start(rules_version=self.rules.version, policy=self.rules.policy,
                                  keys=self._ring.audit.current[0],
                                  mode="shadow" if cfg.gateway.shadow else None)])  # fmt: skip
        await self._start_background()
        if cfg.gateway.shadow:
            health_routes.warn_shadow_mode(log)
        log.info(
            "listening",
            smtp=self.ports.smtp,
            smtps=self.ports.smtps,
            https=self.ports.http,
            rules=self.rules.version[:12],
            policy=self.rules.policy,
        )

    async def _open_backends(self, ring: Keyring) -> tuple[OptOutStore, AuditWriter]:
        """The opt-out store (and the embedded server it may need), then the audit log."""
        cfg = self.cfg
        self.store, embedded = await open_store(cfg, ring)
        self.store.unknown_key_hook = lambda: self._key_file_changed("a record under a new key")
        if embedded is not None:
            self._closers.append(embedded.release)  # runs last: after the store is closed
        self._closers.append(self.store.close)
        warning = await self.store.durability_warning()
        if warning:
            log.warning("store_durability", detail=warning)
        hint = await self.store.memory_hint()
        if hint:
            log.info("store_memory", detail=hint)

        self.audit = AuditWriter(
            cfg.audit.dir,
            instance=cfg.gateway.instance,
            stream=self.stream or cfg.gateway.instance,
            keyring=ring,
            fsync=disk.timed_fsync,
            anchor_client=self.store.client,  # the stream's head is anchored in the store
        )
        await self.audit.open()
        self._closers.append(self.audit.close)
        return self.store, self.audit

    async def _start_smtp(
        self,
        *,
        store: OptOutStore,
        audit: AuditWriter,
        ctx: Any,
        auth: Any,
        socks: Listeners,
        counts: Counts,
        links: tokens.Links,
        dkim_keys: tuple[dkim.KeyMaterial, ...],
    ) -> None:
        """The SMTP side: the upstream, the DKIM signer, the email flow and the unsubscribe
        mailbox behind one handler, served on the bound SMTP and SMTPS sockets."""
        cfg = self.cfg
        upstream = upstream_choice.from_config(cfg)
        self._closers.append(upstream.close)
        signer = dkim.Signer(dkim_keys) if dkim_keys else None
        if signer is not None:
            await signer.start()
            self._closers.append(signer.close)

        flow = EmailFlow(
            store=store,
            upstream=upstream,
            audit=audit,
            rules=lambda: self.rules,
            keyring=lambda: self.keyring,
            suppressed_reply=cfg.smtp.suppressed_reply,
            links=links,
            signer=signer,
            shadow=cfg.gateway.shadow,
        )
        unsubscribe = Unsubscriber(
            store=store,
            audit=audit,
            keyring=lambda: self.keyring,
            rules=lambda: self.rules,
            refresh_keys=self._token_key_unknown,
        )
        complaints = Applier(  # ARF reports mailed to complaints@ (docs/feedback.md)
            store=store, audit=audit, keyring=lambda: self.keyring, settings=cfg.feedback,
            region=cfg.sms.default_region,
        )  # fmt: skip
        handler = GatewayHandler(
            flow=flow,
            auth=auth,
            limits=Limits(
                max_recipients=cfg.smtp.max_recipients, session_timeout_s=cfg.smtp.session_timeout_s
            ),
            unsubscribe=unsubscribe,
            links=links,
            complaints=complaints,
        )
        self._limiter = ConnectionLimiter(
            PerAddress(cfg.smtp.max_connections_per_client, counts, SMTP)
        )
        await smtp_listen.serve(handler, self._limiter, cfg, ctx, socks, servers=self._servers)

    async def _start_background(self) -> None:
        """Audit rotation by size and retention pruning, and the sync worker that
        delivers the change stream to [[sync.webhooks]]. Stopped first (closers run in
        reverse), while the audit log and the store are still open."""
        from gateway.audit.retention import RetentionTask
        from gateway.sync.worker import SyncWorker

        if self.audit is None or self.store is None:
            return
        self.audit.max_file_bytes = self.cfg.audit.max_file_bytes
        self.store.writes.stream_addresses = any(h.include_address for h in self.cfg.sync.webhooks)
        retention = RetentionTask(
            self.audit, retention_days=self.cfg.audit.retention_days, keyring=lambda: self.keyring
        )
        retention.start()
        self._closers.append(retention.stop)
        worker = SyncWorker(
            settings=self.cfg.sync,
            store=self.store,
            audit=self.audit,
            keyring=lambda: self.keyring,
            consumer=self.audit.stream,
        )
        worker.start()
        self._closers.append(worker.stop)

    async def _start_http(self, ctx: Any, auth: Any, socks: Listeners, counts: Counts) -> None:
        deps = http_app.HttpDeps(
            cfg=self.cfg,
            store=self.store,
            audit=self.audit,
            rules=lambda: self.rules,
            keyring=lambda: self.keyring,
            senders=auth,
            refresh_keys=self._token_key_unknown,
            email_probe=upstream_choice.from_config,
        )
        app = http_app.build_app(deps, [m.setup for m in (*HTTP_ROUTES, *HTML_PAGES)])
        runner, self.ports.http = await http_app.start_site(
            app,
            socks=socks.http,
            ssl_context=ctx,
            shutdown_timeout=GRACE_S,
            cap=PerAddress(self.cfg.http.max_connections_per_client, counts, HTTPS),
        )
        self._http_runner = runner  # stopped by stop(), beside the SMTP drain

    async def reload(self) -> bool:
        """Re-read rules and keys (SIGHUP). On any problem keep the old ones and say why."""
        try:
            new_rules = rules_files.load_dir(self.rules_dir())
            new_ring = self._reloaded_keyring()
        except (ConfigError, KeyringError) as exc:
            log.error("reload_failed", why=str(exc))
            await self._audit_reload(ok=False, why=str(exc)[:500])
            return False
        before = self.rules.policy
        self._rules, self._ring = new_rules, new_ring
        log.info("reloaded", rules=new_rules.version[:12], policy=new_rules.policy, before=before)
        await self._audit_reload(ok=True, why="", policy_before=before)
        return True

    def _reloaded_keyring(self) -> Keyring:
        ring = keyfile.load(self.cfg.keys.file)
        if ring.fingerprint != self.keyring.fingerprint:
            raise KeyringError("the pseudonym key changed; refusing (it would orphan every record)")
        if self.audit is not None:
            self.audit.set_keyring(ring)  # refuses a ring that cannot continue the chain
        if self.store is not None:
            self.store.set_keyring(ring)
        return ring

    async def _token_key_unknown(self) -> bool:
        return await self._key_file_changed("a token under a new key")

    async def _key_file_changed(self, why: str) -> bool:
        """The store met a record, or a recipient brought a token, under a key we lack:
        `optgate keys rotate` ran and another instance used the new key before this process
        got SIGHUP. Take the new key file now (keys only; rules wait for SIGHUP) rather than
        fail closed on that record, or refuse that unsubscribe link, until an operator
        signals every instance. At most once per KEY_REFRESH_S, whatever the traffic (a
        forged token names an unknown key too). True when the keyring changed."""
        now = time.monotonic()
        if now - self._last_key_refresh < KEY_REFRESH_S:
            return False
        self._last_key_refresh = now
        try:
            ring = self._reloaded_keyring()
        except (ConfigError, KeyringError) as exc:
            log.error("key_refresh_failed", why=str(exc))
            return False
        if ring == self._ring:
            return False
        self._ring = ring
        log.info("keys_refreshed", why=why)
        await self._audit_reload(ok=True, why=f"key file re-read: {why}")
        return True

    async def _audit_reload(self, *, ok: bool, why: str, policy_before: str = "") -> None:
        """`policy_before`: the policy digest the reload replaced ("": it did not change)."""
        if self.audit is None:
            return
        entry = ConfigReload(ok=ok, why=why, rules_version=self.rules.version,
                             policy_before=policy_before or self.rules.policy,
                             policy=self.rules.policy)  # fmt: skip
        with contextlib.suppress(OptgateError):
            await self.audit.append([entry])

    async def stop(self, grace_s: float = GRACE_S) -> None:
        """Stop accepting; let SMTP transactions in flight finish (up to `grace_s`) while
        every session between transactions gets ``421 4.3.2``; then close what is left
        and release the upstream pool, the HTTPS app, the audit log and the store."""
        for server in self._servers:
            server.close()  # no new connections; open ones stay (asyncio closes none)
        draining = []
        if self._limiter is not None and self._servers:
            draining.append(self._limiter.drain(grace_s))
        if self._http_runner is not None:
            # aiohttp: stop listening, let requests in flight finish (shutdown_timeout), then
            # the app's cleanup (the SMS provider client, the inbound queue worker).
            draining.append(self._http_runner.cleanup())
        self._servers, self._http_runner = [], None
        await asyncio.gather(*draining, return_exceptions=True)
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                await close()
        self._closers = []
