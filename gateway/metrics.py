"""Prometheus metrics: one registry, the metric objects, and tiny helpers the paths call.

Every label value goes through `_label()`, which accepts only short lower-case names
(decision kinds, channels, category names from the rules, operation names) and turns
anything else into ``"other"``: an address, a phone number, a token or a path can never
become a label, whatever a caller passes (SPEC §2.4, threats.md G10). Label sets are
therefore small and bounded, and nothing here needs a lock (prometheus-client's own
objects are thread-safe).

With ``serve --workers N`` each worker process has its own registry: a scrape reads the
worker that answered. Counters are per process, as Prometheus expects of restarts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY: Final = CollectorRegistry(auto_describe=True)
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

# Category names follow the rules' grammar; kinds, channels and operations are fixed words.
_LABEL_RE: Final = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
# A long digit run is what a phone number looks like; no honest label needs one.
_DIGIT_RUN: Final = re.compile(r"\d{6,}")
OTHER: Final = "other"

DECISION_KINDS: Final = frozenset({"allow", "suppress", "defer", "reject"})
CHANNELS: Final = frozenset({"email", "sms"})
CHANGE_KINDS: Final = frozenset({"optout", "optin"})

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


def _one_of(value: str, allowed: frozenset[str]) -> str:
    return value if value in allowed else OTHER


DECISIONS: Final = Counter(
    "optgate_decisions",
    "Per-recipient policy decisions, by kind, channel and category.",
    ["kind", "channel", "category"],
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
    "Worst opt-out-to-effect time seen by this process since it started.",
    ["source"],
    registry=REGISTRY,
)
OPTOUT_CHANGES: Final = Counter(
    "optgate_optout_changes",
    "Opt-out and opt-in changes written, by kind and source.",
    ["kind", "source"],
    registry=REGISTRY,
)
SYNC_BACKLOG: Final = Gauge(
    "optgate_sync_backlog",
    "Changes not yet delivered to a webhook (unread plus in flight), per webhook.",
    ["webhook"],
    registry=REGISTRY,
)
SYNC_DEAD_LETTERS: Final = Gauge(
    "optgate_sync_dead_letters",
    "Changes waiting in the dead-letter stream, per webhook (alert when above 0).",
    ["webhook"],
    registry=REGISTRY,
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
# The worst effect time per source, mirrored in OPTOUT_EFFECT_WORST. Helpers run on the
# event loop thread, so a plain dict is enough.
_worst_effect: dict[str, float] = {}

AUDIT_PRUNED_FILES: Final = Counter(
    "optgate_audit_pruned_files",
    "Audit files removed by retention (audit.retention_days).",
    registry=REGISTRY,
)


def decision(kind: str, channel: str, category: str, count: int = 1) -> None:
    """Count `count` decisions of `kind` (allow/suppress/defer/reject)."""
    DECISIONS.labels(
        kind=_one_of(kind, DECISION_KINDS),
        channel=_one_of(channel, CHANNELS),
        category=_label(category),
    ).inc(count)


@contextmanager
def lookup_latency(channel: str) -> Iterator[None]:
    """Time one store lookup: ``with metrics.lookup_latency("email"): ...``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        LOOKUP_SECONDS.labels(channel=_one_of(channel, CHANNELS)).observe(
            time.perf_counter() - start
        )


@contextmanager
def upstream_latency(channel: str) -> Iterator[None]:
    """Time one upstream call: ``with metrics.upstream_latency("sms"): ...``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        UPSTREAM_SECONDS.labels(channel=_one_of(channel, CHANNELS)).observe(
            time.perf_counter() - start
        )


def store_error(op: str) -> None:
    """Count one failed store call; `op` names the operation ("lookup", "write"...)."""
    STORE_ERRORS.labels(op=_label(op)).inc()


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


def exposition() -> bytes:
    """The registry in the Prometheus text format."""
    return generate_latest(REGISTRY)


__all__ = [
    "CONTENT_TYPE",
    "REGISTRY",
    "decision",
    "exposition",
    "lookup_latency",
    "optout_change",
    "optout_effect_seconds",
    "store_error",
    "upstream_error",
    "upstream_latency",
]
