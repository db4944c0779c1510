"""The decision core: facts in, `Decision` out. No IO, no asyncio (STYLE: h11's shape).

A decision is a value, never an exception. Verdict words are those of the audit log and
CLI (docs/guarantees.md §1): allow, suppress, defer, reject.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from gateway.core import grants
from gateway.core.consent import ConsentState
from gateway.core.records import Corrupt, State
from gateway.core.rules import Category


class Verdict(StrEnum):
    ALLOW = "allow"
    SUPPRESS = "suppress"
    DEFER = "defer"
    REJECT = "reject"


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    verdict: Verdict
    rule: str  # which rule decided: a stable identifier security teams can search for
    reason: str  # short machine-readable reason


NOT_OPT_OUTABLE = Decision(
    verdict=Verdict.ALLOW, rule="category.opt_out=false", reason="no-lookup-needed"
)
NOT_OPTED_OUT = Decision(verdict=Verdict.ALLOW, rule="optout.none", reason="not-opted-out")
OPTED_OUT_ALL = Decision(verdict=Verdict.SUPPRESS, rule="optout.all", reason="opted-out-all")
OPTED_OUT_CATEGORY = Decision(
    verdict=Verdict.SUPPRESS, rule="optout.category", reason="opted-out-category"
)
RECORD_CORRUPT = Decision(verdict=Verdict.DEFER, rule="store.record", reason="record-corrupt")
STORE_UNAVAILABLE = Decision(verdict=Verdict.DEFER, rule="store.lookup", reason="store-unavailable")
# A consent-required category (docs/consent.md): no valid consent (absent, revoked, expired).
NO_CONSENT = Decision(
    verdict=Verdict.SUPPRESS, rule="category.consent=required", reason="no-consent"
)
CONSENTED = Decision(verdict=Verdict.ALLOW, rule="consent.valid", reason="consented")
CONSENT_CORRUPT = Decision(verdict=Verdict.DEFER, rule="store.consent", reason="record-corrupt")
CATEGORY_NOT_PERMITTED = Decision(verdict=Verdict.REJECT, rule=grants.RULE, reason=grants.REASON)
FROM_NOT_PERMITTED = Decision(
    verdict=Verdict.REJECT, rule=grants.FROM_RULE, reason=grants.FROM_REASON
)


def decide(category: Category, states: Sequence[State]) -> Decision:
    """Decide one recipient. `states` holds the records of each of its key forms.

    A corrupt record is doubt about the recipient's wishes: fail closed (defer), unless
    another key form already proves an opt-out (suppressing is then certain and safe).
    """
    if not category.opt_out:
        return NOT_OPT_OUTABLE
    corrupt = False
    for state in states:
        if isinstance(state, Corrupt):
            corrupt = True
        elif state is not None and state.suppresses(category.name):
            return OPTED_OUT_ALL if state.all else OPTED_OUT_CATEGORY
    return RECORD_CORRUPT if corrupt else NOT_OPTED_OUT


def reject(reason: str, rule: str) -> Decision:
    return Decision(verdict=Verdict.REJECT, rule=rule, reason=reason)


def with_consent(
    category: Category, decided: Decision, consent: ConsentState, now: float
) -> Decision:
    """The decision for a consent-required category, from the opt-out decision `decided`
    and the recipient's consents at `now`.

    An opt-out always wins (it suppresses whatever the consent says). Without a valid
    consent the recipient is suppressed, even when an opt-out record was unreadable
    (suppressing is then certain and safe); a consent record that does not open is doubt,
    so the message is deferred, as for an unreadable opt-out record.
    """
    if not category.consent_required or decided.verdict is Verdict.SUPPRESS:
        return decided
    if isinstance(consent, Corrupt):
        return CONSENT_CORRUPT
    if consent is None or not consent.valid(category.name, now):
        return NO_CONSENT
    return CONSENTED if decided.verdict is Verdict.ALLOW else decided
