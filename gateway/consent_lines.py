"""Consent lines in a bulk import (docs/consent.md), read by `gateway.optout_lines`
wherever it reads opt-out lines (``POST /v1/optouts:import``, ``optgate optout import``).

A line with ``consent`` (the consent-required category consented to) records that consent
instead of adding opt-outs::

    {"channel": "email", "address": "pat@example.org", "consent": "research",
     "source": "paper", "evidence": "dms:4f2a9c", "terms_version": "v3",
     "given_at": "2026-11-02T10:00:00Z", "expires_at": "2027-11-02T00:00:00Z"}

``source`` is how it was given (form, paper, verbal, api, import; default import), every
member but ``channel``, ``address`` and ``consent`` is optional, and ``categories`` and
``all`` are not taken. In CSV these are columns beside the opt-out ones; a row whose
``consent`` is empty is an opt-out row. A consent line is written on its own, once the
lines before it are, audited first like every change; it never lifts an opt-out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Final, Protocol

from gateway import consents
from gateway.apikeys import ApiKey
from gateway.core import consent
from gateway.core.consent import Consent
from gateway.core.records import pseudonym
from gateway.errors import BadInput, RecordCorrupt
from gateway.optout_fields import canonical, channel_of

FIELDS: Final = frozenset({"consent", "evidence", "terms_version", "given_at", "expires_at"})
ALLOWED: Final = FIELDS | {"channel", "address", "source", "recipient", "updated_at"}
# The CSV cells of opt-out columns a consent row leaves empty (or "all" false).
_NOT_GIVEN: Final[tuple[object, ...]] = ("", [], "false", "0", "no")
DEFAULT_SOURCE: Final = "import"


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsentItem:
    """One consent to record (a consent line)."""

    channel: str
    pseudonym: str
    consent: Consent


def csv_row(doc: dict[str, Any]) -> dict[str, Any]:
    """A CSV row's fields without the columns it leaves empty: a consent row's opt-out
    columns, an opt-out row's consent columns."""
    if doc.get("consent"):
        return {k: v for k, v in doc.items() if v not in _NOT_GIVEN}
    return {k: v for k, v in doc.items() if k not in FIELDS or v}


def item_of(ctx: Any, doc: dict[str, Any]) -> ConsentItem:
    """A consent line's fields as the consent to record; BadInput (safe to show) if
    invalid. `ctx` is the import's `optout_lines.Context`."""
    if "consent" not in doc:
        raise BadInput(
            "evidence, terms_version, given_at and expires_at belong on a consent line "
            "(one naming its category in consent)"
        )
    if set(doc) - ALLOWED:
        listed = ", ".join(sorted(ALLOWED - {"recipient", "updated_at"}))
        raise BadInput(f"unknown member on a consent line (allowed: {listed})")
    nulls = sorted(k for k in FIELDS if k in doc and doc[k] is None)
    if nulls:
        raise BadInput(f"{nulls[0]} must not be null (leave it out to leave it unset)")
    channel = channel_of(doc.get("channel"))
    _, key_form = canonical(channel, doc.get("address"), region=ctx.cfg.sms.default_region)
    name = doc.get("consent")
    if not isinstance(name, str):
        raise BadInput("consent must name a consent-required category")
    category = consents.category_of(ctx.rules(), channel, name, granting=True)
    given = consent.grant_of(
        category, source=doc.get("source"), evidence=doc.get("evidence"),
        terms_version=doc.get("terms_version"), expires_at=doc.get("expires_at"),
        given_at=doc.get("given_at"), default_source=DEFAULT_SOURCE, now=time.time(),
    )  # fmt: skip
    return ConsentItem(
        channel=channel, pseudonym=pseudonym(ctx.keyring(), channel, key_form), consent=given
    )


class Job(Protocol):
    """What `apply` needs of the import job (`optout_lines.ImportJob`)."""

    deps: Any  # optout_lines.Context
    actor: Any  # optout_lines.Actor
    applied: int
    resume_from: int

    def reject(self, line: int, detail: str) -> None: ...
    async def flush(self, next_line: int) -> None: ...
    async def wait(self) -> None: ...


async def apply(job: Job, line: int, item: ConsentItem) -> None:
    """Record the consent of line `line` once every line before it is written (so the
    line to resume from stays exact), audited first, by the job's API key or the command
    line. A line that cannot be applied is rejected; raises StoreUnavailable, AuditError."""
    await job.flush(line)
    await job.wait()
    key: ApiKey | None = job.actor.key
    who = consents.Who(via="import", key_id=key.kid if key else None, by=None if key else "cli")
    try:
        await consents.grant(
            job.deps.store, job.deps.audit, channel=item.channel, pseudonym=item.pseudonym,
            consent=item.consent, who=who,
        )  # fmt: skip
    except RecordCorrupt:
        job.reject(line, "the stored consent record does not authenticate; it was not changed")
        return
    job.applied += 1
    job.resume_from = line + 1
