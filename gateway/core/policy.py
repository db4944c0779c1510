"""The decision core: facts in, `Decision` out. No IO, no asyncio (STYLE: h11's shape).

A decision is a value, never an exception. Verdict words are those of the audit log and
CLI (docs/guarantees.md §1): allow, suppress, defer, reject.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from gateway.core import grants
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
