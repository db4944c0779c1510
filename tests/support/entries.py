"""A bare audit entry for the writer's own tests: only the fields those tests look at."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gateway.core.entries import Entry


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample(Entry):
    """An entry named "decision" with any of a few fields (None: not written)."""

    EVENT: ClassVar[str] = "decision"
    decision: str | None = None
    recipient: str | None = None
    txn: str | int | None = None
    part: int | None = None
    what: object = None
