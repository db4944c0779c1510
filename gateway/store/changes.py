"""Change-stream entries: how one opt-out or opt-in is written to the Redis Stream (pure).

Every acknowledged change to a record appends one entry to ``og:changes`` (docs/guarantees.md
§6.8). An entry holds the recipient's pseudonym, never a plaintext address: when the writer
knew the address it is carried AES-256-GCM-sealed under the current record key (member
``ad``), with the stream key, channel and pseudonym as associated data, so it cannot be moved
onto another entry. Only the sync worker opens it, and only for a webhook configured with
``include_address = true``.

An entry has two fields, kept short because the stream lives in Redis memory and every
field costs a listpack header:

    e    "v|channel|pseudonym|kind|all|t_ms|categories|added|removed|source"
         v = format version (1); kind = optout | optin | update; all = 1 if opted out of
         everything after the change; t_ms = milliseconds since the epoch; categories,
         added and removed are comma-separated (``*`` in added/removed = all turned on or
         off); source is last, so it may hold any character
    ad   the sealed address, or empty

and, on entries `optgate sync replay` appends, ``only`` (the one webhook it is for) and
``orig`` (the id of the entry it repeats).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.core.keys import Keyring
from gateway.core.records import Record, open_value, seal_value

STREAM_KEY = "og:changes"
DEAD_KEY = "og:sync:dead"  # dead letters of every webhook, each naming its webhook
FORMAT = b"1"
_PARTS = 10  # members of the "e" field

Fields = dict[bytes, bytes]


@dataclass(frozen=True, slots=True, kw_only=True)
class Change:
    """One decoded stream entry."""

    id: str
    channel: str
    pseudonym: str
    kind: str
    all: bool
    categories: tuple[str, ...]
    added: tuple[str, ...]
    removed: tuple[str, ...]
    source: str
    at_ms: int
    sealed_address: bytes = field(default=b"", repr=False)
    only: str = ""  # a replay meant for this webhook alone
    original_id: str = ""  # the entry a replay copies


def _names(values: frozenset[str] | set[str], everything: bool) -> str:
    parts = sorted(values)
    if everything:
        parts.insert(0, "*")
    return ",".join(parts)


def _split(raw: str) -> tuple[str, ...]:
    return tuple(p for p in raw.split(",") if p)


_NONE = Record()  # the state of a recipient with no record


def kind_of(before: Record | None, after: Record | None, intent: str) -> str:
    """optout (only additions), optin (only removals), update (both); `intent` if neither."""
    b = before or _NONE
    a = after or _NONE
    added = bool(a.categories - b.categories) or (a.all and not b.all)
    removed = bool(b.categories - a.categories) or (b.all and not a.all)
    return _kind(added, removed, intent)


def _kind(added: bool, removed: bool, intent: str) -> str:
    if added and removed:
        return "update"
    if added:
        return "optout"
    if removed:
        return "optin"
    return intent


def _address_ad(channel: str, pseudonym: str) -> bytes:
    return f"{STREAM_KEY}\x00{channel}\x00{pseudonym}".encode()


def seal_address(ring: Keyring, channel: str, pseudonym: str, address: str) -> bytes:
    return seal_value(ring, _address_ad(channel, pseudonym), address.encode())


def open_address(ring: Keyring, change: Change) -> str | None:
    """The plaintext address of `change`, or None when absent or not authentic."""
    plain = open_value(
        ring, _address_ad(change.channel, change.pseudonym), change.sealed_address
    )
    return None if plain is None else plain.decode("utf-8", "replace")


def encode(
    ring: Keyring,
    *,
    channel: str,
    pseudonym: str,
    before: Record | None,
    after: Record | None,
    intent: str,
    source: str,
    now: float,
    address: str = "",
) -> tuple[bytes, bytes]:
    """The two field values (``e``, ``ad``) of one entry."""
    b = before or _NONE
    a = after or _NONE
    added, all_on = a.categories - b.categories, a.all and not b.all
    removed, all_off = b.categories - a.categories, b.all and not a.all
    e = "|".join(
        (
            "1",
            channel,
            pseudonym,
            _kind(bool(added) or all_on, bool(removed) or all_off, intent),
            "1" if a.all else "0",
            str(int(now * 1000)),
            _names(a.categories, False),
            _names(added, all_on),
            _names(removed, all_off),
            source,
        )
    )
    sealed = seal_address(ring, channel, pseudonym, address) if address else b""
    return e.encode(), sealed


def entry_fields(entry: tuple[bytes, bytes]) -> list[bytes]:
    """The flat field list of an encoded entry, for XADD."""
    e, sealed = entry
    return [b"e", e, b"ad", sealed] if sealed else [b"e", e]


def decode(entry_id: bytes | str, fields: Fields) -> Change | None:
    """A stream entry as a `Change`; None for an entry this version cannot read."""
    parts = fields.get(b"e", b"").decode("utf-8", "replace").split("|", _PARTS - 1)
    if len(parts) != _PARTS or parts[0] != FORMAT.decode():
        return None
    _, channel, pseud, kind, everything, t_ms, cats, added, removed, source = parts
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return Change(
        id=text,
        channel=channel,
        pseudonym=pseud,
        kind=kind,
        all=everything == "1",
        categories=_split(cats),
        added=_split(added),
        removed=_split(removed),
        source=source,
        at_ms=int(t_ms) if t_ms.isdigit() else 0,
        sealed_address=fields.get(b"ad", b""),
        only=fields.get(b"only", b"").decode(),
        original_id=fields.get(b"orig", b"").decode(),
    )


def as_fields(fields: Fields) -> list[bytes]:
    """A decoded field mapping flattened again (for copying an entry elsewhere)."""
    out: list[bytes] = []
    for k, v in fields.items():
        out += [k, v]
    return out
