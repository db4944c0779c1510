"""The audit entries: one frozen record type per event, and their one serialisation.

Every entry the gateway writes is one of these; the audit writer (`gateway.audit.writer`)
takes nothing else, adds its own fields (``ts``, ``seq``, ``instance``, ``stream`` and the
chain fields) and seals what `Entry.fields()` gives. A field left `None` is not written, so
each entry carries exactly the keys its event has always had; a field that is written empty
(``"message_id": ""``) is a plain `str`.

Entries name recipients by pseudonym only (`gateway.core.records.pseudonym`), never an
address or a number, and never hold a body, a password or a token. No IO here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast


class Entry:
    """One audit entry. `EVENT` is its ``event`` field, the first of its fields."""

    __slots__ = ()
    EVENT: ClassVar[str]
    _NAMES: ClassVar[dict[type, tuple[str, ...]]] = {}

    @property
    def event(self) -> str:
        return self.EVENT

    def fields(self) -> dict[str, Any]:
        """The entry as the writer seals it: ``event`` first, then every field set."""
        cls = type(self)
        names = Entry._NAMES.get(cls)
        if names is None:
            names = Entry._NAMES[cls] = tuple(f.name for f in dataclasses.fields(cast(Any, cls)))
        out: dict[str, Any] = {"event": self.EVENT}
        for name in names:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


# -- sending ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision(Entry):
    """The verdict for one recipient of one message, durable before anything is sent."""

    EVENT: ClassVar[str] = "decision"
    channel: str
    sender: str
    txn: str
    decision: str  # allow, suppress, defer, reject
    category: str  # "" when the message named none the rules know
    recipient: str
    message_id: str  # the audit form of the message's id; "" for SMS (not known yet)
    rule: str
    reason: str
    policy: str | None = None  # the digest of the rules that decided (`rules.policy_digest`)
    # A suppress decision not acted on: the gateway runs in shadow mode and forwarded the
    # copy anyway (docs/shadow-mode.md). Written only when true.
    shadow: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery(Entry):
    """What the upstream (SMTP relay, SMS provider) did with one copy."""

    EVENT: ClassVar[str] = "delivery"
    channel: str
    sender: str
    txn: str
    category: str
    recipient: str
    message_id: str
    outcome: str  # accepted, deferred, rejected (email); accepted, rejected, failed, unknown
    code: int
    provider_code: int | None = None  # the SMS provider's own error code, when it gave one


# -- consent changes -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Change(Entry):
    """The fields of an ``optout`` or ``optin``: which are set depends on where it came
    from (an unsubscribe link, a texted keyword, the admin API, the command line, a
    provider's refusal). The opt-out store can be rebuilt from these entries alone."""

    channel: str
    recipient: str
    source: str
    category: str | None = None  # an unsubscribe link: one entry per category
    categories: tuple[str, ...] | None = None
    all: bool | None = None
    message_id: str | None = None  # the inbound text's id
    rule: str | None = None
    change: str | None = None  # the change-stream id ("" when audited before the write)
    kept: tuple[str, ...] | None = None  # a START: the category opt-outs it left in place
    matched: str | None = None  # the keyword that matched
    reason: str | None = None  # "superseded": another writer's opt-out now holds
    txn: str | None = None
    received: str | None = None  # an unsubscribe link: when the request arrived
    effect_ms: float | None = None  # ... and how long until it took effect
    key_id: str | None = None  # made with an API key
    by: str | None = None  # "cli": made on the command line
    via: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class OptOut(_Change):
    EVENT: ClassVar[str] = "optout"


@dataclass(frozen=True, slots=True, kw_only=True)
class OptIn(_Change):
    EVENT: ClassVar[str] = "optin"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsentGranted(Entry):
    """A consent to a consent-required category recorded (docs/consent.md); with its
    fields, so the store can be rebuilt from the log. `evidence` is a document reference,
    checked to hold no address or number."""

    EVENT: ClassVar[str] = "consent_granted"
    channel: str
    recipient: str
    category: str
    source: str  # how it was given: form, paper, verbal, api, import
    given_at: str
    evidence: str | None = None
    terms_version: str | None = None
    expires_at: str | None = None
    key_id: str | None = None  # made with an API key
    by: str | None = None  # "cli": made on the command line
    via: str | None = None  # api, cli, import


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsentRevoked(Entry):
    """A consent withdrawn (the same request also opts out of the category: its own
    ``optout`` entry). `held`: whether a consent was on record to revoke."""

    EVENT: ClassVar[str] = "consent_revoked"
    channel: str
    recipient: str
    category: str
    source: str
    held: bool
    key_id: str | None = None
    by: str | None = None
    via: str | None = None  # api, cli, page, one-click, mailto


@dataclass(frozen=True, slots=True, kw_only=True)
class SmsInbound(Entry):
    """An inbound text that changed no consent: help, forwarded, queued, a duplicate..."""

    EVENT: ClassVar[str] = "sms_inbound"
    channel: str
    recipient: str  # "" for a queue outcome whose item was lost
    message_id: str
    action: str
    rule: str | None = None
    reason: str | None = None
    matched: str | None = None
    attempts: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Feedback(Entry):
    """A provider's report (docs/feedback.md), applied or seen again. An opt-out it causes
    also has its own ``optout`` entry (the log a lost store is rebuilt from)."""

    EVENT: ClassVar[str] = "feedback"
    provider: str  # sendgrid, ses, arf, twilio
    kind: str  # the provider's word: spamreport, Complaint, abuse, 21610, ...
    source: str  # complaint, provider, bounce
    channel: str
    recipient: str  # pseudonym; "" for a subscription confirmation
    event_id: str  # a keyed digest of the provider's event id, never the id itself
    outcome: str  # optout, undeliverable, duplicate, subscribed, unsubscribed
    until: str | None = None  # undeliverable: until when (ISO 8601)
    topic: str | None = None  # SES: the SNS topic


# -- access ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthFailure(Entry):
    """A refused login or API key, on any interface (one event name everywhere)."""

    EVENT: ClassVar[str] = "auth_failure"
    channel: str | None = None  # email (SMTP AUTH), sms (the SMS API)
    interface: str | None = None  # admin (the admin API)
    route: str | None = None
    method: str | None = None
    reason: str
    sender: str | None = None  # a configured sender's name, else "unknown" or ""
    mechanism: str | None = None  # the SASL mechanism
    blocks: bool | None = None  # this failure reached the client's limit
    key_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminAccess(Entry):
    """A call to the admin API (`key_id`, `role`) or a bulk command line job (`by`)."""

    EVENT: ClassVar[str] = "admin_access"
    action: str
    key_id: str | None = None
    role: str | None = None
    by: str | None = None
    filters: Mapping[str, str] | None = None  # an audit search: the filters given
    channel: str | None = None
    recipient: str | None = None
    channels: tuple[str, ...] | None = None  # an export
    applied: int | None = None  # an import's summary
    rejected: int | None = None
    lines: int | None = None
    records: int | None = None  # an export's summary
    unreadable: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKeyCreated(Entry):
    EVENT: ClassVar[str] = "api_key_created"
    key_id: str
    role: str
    by: str  # the key id that made it, or "cli"


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiKeyRevoked(Entry):
    EVENT: ClassVar[str] = "api_key_revoked"
    key_id: str
    by: str


# -- the gateway itself ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Start(Entry):
    EVENT: ClassVar[str] = "start"
    rules_version: str
    keys: str  # the id of the current audit key
    policy: str | None = None  # the digest of the rules in force
    mode: str | None = None  # "shadow" when opt-outs are decided but not enforced


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigReload(Entry):
    EVENT: ClassVar[str] = "config_reload"
    ok: bool
    why: str
    rules_version: str
    policy_before: str | None = None  # the policy digest in force before the reload
    policy: str | None = None  # ... and after it (the same when the reload failed)


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncDeadLetter(Entry):
    EVENT: ClassVar[str] = "sync_dead_letter"
    webhook: str
    change: str
    dead_letter: str
    channel: str
    recipient: str
    attempts: int
    last_error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncReplay(Entry):
    EVENT: ClassVar[str] = "sync_replay"
    webhook: str
    count: int
    by: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreInit(Entry):
    """The store's sentinel written; `before`: none, ok, missing or mismatch."""

    EVENT: ClassVar[str] = "store_init"
    forced: bool
    before: str
    sentinel: str
    by: str


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreRebuild(Entry):
    EVENT: ClassVar[str] = "store_rebuild"
    changes: int
    chain_ok: bool
    by: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecovered(Entry):
    """The writer is back after an IO failure; `error` is an errno name, never a path."""

    EVENT: ClassVar[str] = "audit_recovered"
    failed_at: str
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditPruned(Entry):
    """Whole files removed by retention, recorded before they go."""

    EVENT: ClassVar[str] = "audit_pruned"
    files: tuple[str, ...]
    kept_file: str
    kept_seq: int
    retention_days: int


# -- the review console ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsoleAccess(Entry):
    """A person's use of the review console (login, logout, a page, a search, an export)
    or a change to a console user from the command line (``by="cli"``). A searched
    recipient is named by pseudonym only."""

    EVENT: ClassVar[str] = "console_access"
    user: str  # the console user ("" when the name given is not a user's)
    action: str  # login, lockout, logout, overview, search, transaction, history, export...
    result: str  # ok, refused (a login), denied (a role or CSRF check), started
    reason: str | None = None  # why refused: password, totp, totp-reused, locked, disabled...
    role: str | None = None
    by: str | None = None  # "cli": a user changed on the command line
    filters: Mapping[str, str] | None = None  # a search or export: the filters given
    channel: str | None = None
    recipient: str | None = None  # a pseudonym
    # A transaction page opened (not `txn`: the entry is no part of that transaction).
    transaction: str | None = None
    rows: int | None = None  # an export: the rows written
    format: str | None = None  # an export: csv or ndjson
