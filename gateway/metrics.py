"""Prometheus metrics: one registry, the metric objects, and tiny helpers the paths call.

Every label value goes through `_label()`, which accepts only short lower-case names
(decision kinds, channels, category names from the rules, operation names) and turns
anything else into ``"other"``: an address, a phone number, a token or a path can never
become a label, whatever a caller passes (docs/guarantees.md §2.4). Label sets are
therefore small and bounded, and nothing here needs a lock (prometheus-client's own
objects are thread-safe).

One process (``serve``, ``serve --workers 1``, the tests): `exposition()` reads `REGISTRY`.

``serve --workers N``: prometheus-client's multiprocess mode; how each kind of metric adds
up across workers, live and dead, is told in `gateway.metrics_files`.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Collection
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.core.records import CHANNELS
from gateway.metrics_files import fresh_multiprocess_dir as fresh_multiprocess_dir  # noqa: PLC0414 - as below
from gateway.metrics_files import merged
from gateway.metrics_files import process_dead as process_dead  # noqa: PLC0414 - the supervisor and tests name them `metrics.*`

REGISTRY: Final = CollectorRegistry(auto_describe=True)
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

# The variable prometheus-client reads, once, when it is first imported; it must therefore
# be in a worker's environment from the start (the supervisor passes it to the child).
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
_LEGACY_ENV: Final = "prometheus_multiproc_dir"  # the library still honours the old name
MULTIPROC_DIR: Final = os.environ.get(MULTIPROC_ENV) or os.environ.get(_LEGACY_ENV) or None

# Category names follow the rules' grammar; kinds, channels and operations are fixed words.
_LABEL_RE: Final = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
# A long digit run is what a phone number looks like; no honest label needs one.
_DIGIT_RUN: Final = re.compile(r"\d{6,}")
OTHER: Final = "other"

DECISION_KINDS: Final = frozenset({"allow", "suppress", "defer", "reject"})
CHANGE_KINDS: Final = frozenset({"optout", "optin"})
CONSENT_KINDS: Final = frozenset({"grant", "revoke"})
SENTINEL_REASONS: Final = frozenset({"missing", "mismatch"})
# Where an audit append failed: the paths that write entries (one short name per module).
# ("writer" is for the audit writer itself, should it count its own failures.)
AUDIT_WRITE_SITES: Final = frozenset(
    {"smtp", "sms", "sms_inbound", "unsubscribe", "admin", "feedback", "writer"}
)
# The listeners that authenticate: SMTP AUTH, and HTTP Basic or Bearer credentials.
AUTH_CHANNELS: Final = frozenset({"smtp", "http"})

# Store round trips are sub-millisecond on loopback and bounded by redis.timeout_ms (250 ms
# default); upstream calls take tens of milliseconds to the provider's 30 s timeout.
LOOKUP_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
UPSTREAM_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# From an opt-out request (click, keyword, API call) to the moment it is enforced, and
# from a change to its delivery downstream (webhooks retry for minutes).
EFFECT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SYNC_BUCKETS: Final = (0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


def _label(value: str) -> str:
    """`value` if it is a safe, short name; otherwise "other"."""
    if _LABEL_RE.fullmatch(value) and not _DIGIT_RUN.search(value):
        return value
    return OTHER


def _one_of(value: str, allowed: Collection[str]) -> str:
    return value if value in allowed else OTHER


# Webhook names as `[[sync.webhooks]] name` allows them (they may start with a digit).
_WEBHOOK_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def webhook(name: str) -> str:
    """The label value of a configured webhook's name ("other" for anything else)."""
    return name if _WEBHOOK_RE.fullmatch(name) and not _DIGIT_RUN.search(name) else OTHER


DECISIONS: Final = Counter(
    "optgate_decisions",
    "Per-recipient policy decisions, by kind, channel and category.",
    ["kind", "channel", "category"],
    registry=REGISTRY,
)
SHADOW_SUPPRESSIONS: Final = Counter(
    "optgate_shadow_suppressions",
    "Suppress decisions not acted on because the gateway runs in shadow mode: the copy was"
    " forwarded anyway (docs/shadow-mode.md). Also counted in optgate_decisions.",
    ["channel", "category"],
    registry=REGISTRY,
)
LOOKUP_SECONDS: Final = Histogram(
    "optgate_lookup_seconds",
    "Opt-out store lookup latency (one round trip per message).",
    ["channel"],
    buckets=LOOKUP_BUCKETS,
    registry=REGISTRY,
)
UPSTREAM_SECONDS: Final = Histogram(
    "optgate_upstream_seconds",
    "Upstream provider call latency (one SMTP transaction or one SMS API call).",
    ["channel"],
    buckets=UPSTREAM_BUCKETS,
    registry=REGISTRY,
)
STORE_ERRORS: Final = Counter(
    "optgate_store_errors",
    "Opt-out store calls that failed (down, slow past the budget, erroring).",
    ["op"],
    registry=REGISTRY,
)
STORE_SENTINEL_MISSING: Final = Counter(
    "optgate_store_sentinel_missing",
    "Store reads refused because the store's sentinel was missing or not the key file's "
    "(an emptied or different store; alert when it grows), by reason (missing, mismatch).",
    ["reason"],
    registry=REGISTRY,
)
UPSTREAM_ERRORS: Final = Counter(
    "optgate_upstream_errors",
    "Upstream calls that failed, by channel and kind (unavailable, rejected, timeout...).",
    ["channel", "kind"],
    registry=REGISTRY,
)
OPTOUT_EFFECT_SECONDS: Final = Histogram(
    "optgate_optout_effect_seconds",
    "From an opt-out request to its acknowledgement (durable in store and audit log).",
    ["source"],
    buckets=EFFECT_BUCKETS,
    registry=REGISTRY,
)
OPTOUT_EFFECT_WORST: Final = Gauge(
    "optgate_optout_effect_worst_seconds",
    "Worst opt-out-to-effect time seen since the service started (max over workers).",
    ["source"],
    registry=REGISTRY,
    multiprocess_mode="max",
)
OPTOUT_CHANGES: Final = Counter(
    "optgate_optout_changes",
    "Opt-out and opt-in changes written, by kind and source.",
    ["kind", "source"],
    registry=REGISTRY,
)
CONSENT_CHANGES: Final = Counter(
    "optgate_consent_changes",
    "Consents granted and revoked (docs/consent.md), by kind (grant, revoke) and source.",
    ["kind", "source"],
    registry=REGISTRY,
)
SYNC_BACKLOG: Final = Gauge(
    "optgate_sync_backlog",
    "Changes not yet delivered to a webhook (unread plus in flight), per webhook.",
    ["webhook"],
    registry=REGISTRY,
    multiprocess_mode="livemostrecent",
)
SYNC_DEAD_LETTERS: Final = Gauge(
    "optgate_sync_dead_letters",
    "Changes waiting in the dead-letter stream, per webhook (alert when above 0).",
    ["webhook"],
    registry=REGISTRY,
    multiprocess_mode="livemostrecent",
)
SYNC_DEAD_LETTERED: Final = Counter(
    "optgate_sync_dead_lettered",
    "Changes this process gave up delivering after the last attempt, per webhook.",
    ["webhook"],
    registry=REGISTRY,
)
SYNC_DELIVERIES: Final = Counter(
    "optgate_sync_deliveries",
    "Webhook delivery attempts, per webhook and outcome (ok, failed).",
    ["webhook", "outcome"],
    registry=REGISTRY,
)
SYNC_LAG_SECONDS: Final = Histogram(
    "optgate_sync_delivery_lag_seconds",
    "From a change being written to its acknowledged delivery, per webhook.",
    ["webhook"],
    buckets=SYNC_BUCKETS,
    registry=REGISTRY,
)
FEEDBACK_PROVIDERS: Final = frozenset({"sendgrid", "ses", "arf", "twilio"})
FEEDBACK_EVENTS: Final = Counter(
    "optgate_feedback_events",
    "Provider feedback events (docs/feedback.md), by provider, kind (the provider's word, "
    "or \"request\" for a refused request) and outcome (optout, undeliverable, duplicate, "
    "ignored, subscribed, forged, stale, malformed).",
    ["provider", "kind", "outcome"],
    registry=REGISTRY,
)
# The worst effect time per source, mirrored in OPTOUT_EFFECT_WORST. Helpers run on the
# event loop thread, so a plain dict is enough.
_worst_effect: dict[str, float] = {}

# An audit fsync is ~0.2 ms on a quiet SSD, but virtual disks stall single fsyncs for
# hundreds of ms (200-650 ms on the development VM), and every send waits for its decision
# entry's fsync (docs/guarantees.md §8.3): the buckets reach far enough to show that.
AUDIT_FSYNC_BUCKETS: Final = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip
AUDIT_FSYNC_SECONDS: Final = Histogram(
    "optgate_audit_fsync_seconds",
    "Duration of each audit log fsync (a group commit): the floor under every send's latency.",
    buckets=AUDIT_FSYNC_BUCKETS,
    registry=REGISTRY,
)
AUDIT_WRITE_FAILURES: Final = Counter(
    "optgate_audit_write_failures",
    "Audit appends that failed (write or fsync), by where: what they were for is refused "
    "(451 / 503) until the audit log can be written again.",
    ["where"],
    registry=REGISTRY,
)
AUTH_FAILURES: Final = Counter(
    "optgate_auth_failures",
    "Failed authentications (a wrong or missing credential, a role that may not call the "
    "route), by channel (smtp, http).",
    ["channel"],
    registry=REGISTRY,
)
# Every series exists from the start at 0: Prometheus' increase() cannot see the first
# increment of a series that appears with it, and the alerts count from the first failure.
for _where in sorted(AUDIT_WRITE_SITES):
    AUDIT_WRITE_FAILURES.labels(where=_where)
for _channel in sorted(AUTH_CHANNELS):
    AUTH_FAILURES.labels(channel=_channel)
for _reason in sorted(SENTINEL_REASONS):
    STORE_SENTINEL_MISSING.labels(reason=_reason)
AUDIT_PRUNED_FILES: Final = Counter(
    "optgate_audit_pruned_files",
    "Audit files removed by retention (audit.retention_days).",
    registry=REGISTRY,
)


# Children of the per-message metrics, by their (already bounded) label values: `labels()`
# takes a lock and builds its key on every call, a few µs each on the hot path.
_children: dict[tuple[object, ...], Any] = {}


def _child(metric: Any, *values: str) -> Any:
    key = (metric, *values)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


class _Timer:
    """Observes the time spent inside the ``with`` block on one histogram child."""

    __slots__ = ("_child", "_start")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._child.observe(time.perf_counter() - self._start)


def decision(kind: str, channel: str, category: str, count: int = 1) -> None:
    """Count `count` decisions of `kind` (allow/suppress/defer/reject)."""
    _child(
        DECISIONS,
        _one_of(kind, DECISION_KINDS),
        _one_of(channel, CHANNELS),
        _label(category),
    ).inc(count)


def shadow_suppression(channel: str, category: str) -> None:
    """Count one suppress decision forwarded anyway (shadow mode)."""
    _child(SHADOW_SUPPRESSIONS, _one_of(channel, CHANNELS), _label(category)).inc()


def lookup_latency(channel: str) -> AbstractContextManager[None]:
    """Time one store lookup: ``with metrics.lookup_latency("email"): ...``."""
    return _Timer(_child(LOOKUP_SECONDS, _one_of(channel, CHANNELS)))


def upstream_latency(channel: str) -> AbstractContextManager[None]:
    """Time one upstream call: ``with metrics.upstream_latency("sms"): ...``."""
    return _Timer(_child(UPSTREAM_SECONDS, _one_of(channel, CHANNELS)))


def store_error(op: str) -> None:
    """Count one failed store call; `op` names the operation ("lookup", "write"...)."""
    STORE_ERRORS.labels(op=_label(op)).inc()


def store_sentinel_missing(reason: str) -> None:
    """Count one store read refused for its sentinel; `reason` is "missing" or "mismatch"."""
    STORE_SENTINEL_MISSING.labels(reason=_one_of(reason, SENTINEL_REASONS)).inc()


def upstream_error(channel: str, kind: str) -> None:
    """Count one failed upstream call; `kind` is a short word ("unavailable", "rejected")."""
    UPSTREAM_ERRORS.labels(channel=_one_of(channel, CHANNELS), kind=_label(kind)).inc()


def optout_effect_seconds(source: str, seconds: float) -> None:
    """Record how long one opt-out took from request to enforcement; tracks the worst."""
    src = _label(source)
    OPTOUT_EFFECT_SECONDS.labels(source=src).observe(seconds)
    if seconds > _worst_effect.get(src, -1.0):
        _worst_effect[src] = seconds
        OPTOUT_EFFECT_WORST.labels(source=src).set(seconds)


def optout_change(kind: str, source: str, count: int = 1) -> None:
    """Count written changes; `kind` is "optout" or "optin"."""
    OPTOUT_CHANGES.labels(kind=_one_of(kind, CHANGE_KINDS), source=_label(source)).inc(count)


def consent_change(kind: str, source: str, count: int = 1) -> None:
    """Count consents written; `kind` is "grant" or "revoke"."""
    CONSENT_CHANGES.labels(kind=_one_of(kind, CONSENT_KINDS), source=_label(source)).inc(count)


def audit_fsync(seconds: float) -> None:
    """One audit fsync took `seconds` (called on the audit writer's thread)."""
    AUDIT_FSYNC_SECONDS.observe(seconds)


def audit_write_failure(where: str) -> None:
    """Count one audit append that raised AuditError; `where` is one of AUDIT_WRITE_SITES."""
    AUDIT_WRITE_FAILURES.labels(where=_one_of(where, AUDIT_WRITE_SITES)).inc()


def auth_failure(channel: str) -> None:
    """Count one failed authentication on `channel` ("smtp" or "http")."""
    AUTH_FAILURES.labels(channel=_one_of(channel, AUTH_CHANNELS)).inc()


def feedback_event(provider: str, kind: str, outcome: str) -> None:
    """Count one provider feedback event (or one refused feedback request)."""
    kind = kind.lower()
    FEEDBACK_EVENTS.labels(
        provider=_one_of(provider, FEEDBACK_PROVIDERS),
        kind=kind if kind.isdigit() and len(kind) == 5 else _label(kind),  # Twilio's codes
        outcome=_label(outcome),
    ).inc()


def exposition() -> bytes:
    """This process's registry, or under ``--workers`` every worker's, in the text format."""
    if MULTIPROC_DIR is None:
        return generate_latest(REGISTRY)
    return merged(Path(MULTIPROC_DIR))


__all__ = [
    "CONTENT_TYPE",
    "MULTIPROC_DIR",
    "MULTIPROC_ENV",
    "REGISTRY",
    "audit_write_failure",
    "auth_failure",
    "consent_change",
    "decision",
    "exposition",
    "feedback_event",
    "fresh_multiprocess_dir",
    "lookup_latency",
    "merged",
    "optout_change",
    "optout_effect_seconds",
    "process_dead",
    "shadow_suppression",
    "store_error",
    "store_sentinel_missing",
    "upstream_error",
    "upstream_latency",
]
