"""The email upstream's transport types, shared by every upstream (the provider over SMTP,
the file outbox): the `Copy` to deliver, the `Outcome` per recipient, the `Upstream` seam,
and the local address checks (`prevalidate`) that run before anything goes on the wire.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

# Never in an address we send: controls, space, and the specials a Dot-string cannot hold
# (RFC 5321 §4.1.2; the inbound parser already refuses quoted local parts and literals).
UNSENDABLE = re.compile(r'[\x00-\x20\x7f<>()\[\]\\,;:"]')


@dataclass(frozen=True, slots=True, kw_only=True)
class Copy:
    """One upstream transaction: addresses are canonical and sent byte-for-byte."""

    mail_from: str
    rcpts: tuple[str, ...]
    data: bytes
    smtputf8: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """The provider's verdict per recipient of one `Copy`: each in exactly one field."""

    accepted: tuple[str, ...] = ()
    temp_failed: Mapping[str, tuple[int, str]] = field(default_factory=lambda: MappingProxyType({}))
    perm_failed: Mapping[str, tuple[int, str]] = field(default_factory=lambda: MappingProxyType({}))


class Upstream(Protocol):
    async def deliver(self, copy: Copy) -> Outcome: ...
    async def check(self) -> None: ...
    async def close(self) -> None: ...


def address_problem(address: str, *, smtputf8: bool, sender: bool) -> tuple[int, str] | None:
    """Refuse what cannot go on the wire as exactly `<address>` (control characters, parser
    differentials). MAIL and RCPT are written by `gateway.smtp.upstream` (`_envelope`), not
    through aiosmtplib's `mail()`/`rcpt()`, whose address parser could send another string
    than the one that was checked."""
    if UNSENDABLE.search(address) or (not sender and "@" not in address):
        return (553, f"5.1.{7 if sender else 3} Address cannot be sent as given")
    if not smtputf8 and not address.isascii():
        return (553, "5.6.7 Non-ASCII address needs SMTPUTF8")
    return None


class Tally:
    """Verdicts for one delivery attempt, built up command by command."""

    def __init__(self) -> None:
        self.accepted: list[str] = []
        self.temp: dict[str, tuple[int, str]] = {}
        self.perm: dict[str, tuple[int, str]] = {}

    def fail(self, rcpts: Sequence[str], code: int, text: str) -> None:
        target = self.perm if code >= 500 else self.temp
        for r in rcpts:
            target[r] = (code, text)

    def undecided(self, rcpts: Sequence[str]) -> list[str]:
        done = {*self.accepted, *self.temp, *self.perm}
        return [r for r in rcpts if r not in done]

    def outcome(self) -> Outcome:
        return Outcome(
            accepted=tuple(self.accepted),
            temp_failed=MappingProxyType(self.temp),
            perm_failed=MappingProxyType(self.perm),
        )


def prevalidate(copy: Copy, tally: Tally) -> list[str]:
    """Record local refusals in `tally`; return the recipients that may be sent."""
    problem = address_problem(copy.mail_from, smtputf8=copy.smtputf8, sender=True)
    if problem is not None:
        tally.fail(copy.rcpts, *problem)
        return []
    sendable: list[str] = []
    for rcpt in dict.fromkeys(copy.rcpts):  # a duplicate RCPT would be a duplicate delivery
        problem = address_problem(rcpt, smtputf8=copy.smtputf8, sender=False)
        if problem is None:
            sendable.append(rcpt)
        else:
            tally.fail([rcpt], *problem)
    return sendable
