"""Audit entries and their HMAC chain: build one line, check one line. Pure: no IO, no asyncio.

An entry is one JSON object on one line whose last member is ``"mac"``::

    body = orjson.dumps({...fields, "kid": kid, "prev": prev})
    mac  = HMAC-SHA256(key[kid], prev.encode() + b"\\n" + body).hexdigest()
    line = body[:-1] + b',"mac":"' + mac + b'"}\\n'

The mac covers the exact bytes of the entry (so even a whitespace edit breaks it) and the
previous entry's mac (so deletion, insertion and reordering break the chain). ``seq`` counts
the entries of a chain from 1, so a deleted or swapped line is named precisely.

Key ids must never go backwards within a chain: the writer always seals with the newest
audit key, so an entry sealed with a key *newer* than an entry after it was re-sealed by
someone holding that key (the CVE-2023-31439 lesson from journald's sealing).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from gateway.core.keys import KeySet

# An entry is a few hundred bytes. The cap bounds what the verifier reads per line, so a
# garbage file without newlines cannot make it load gigabytes; no honest entry comes close.
MAX_ENTRY_BYTES: Final = 64 * 1024
# A sealed document (the anchors of every stream of an instance: about 200 bytes each) is
# read whole; this bounds it far above any real instance's stream count.
MAX_DOCUMENT_BYTES: Final = 4 * 1024 * 1024

# The names the chain itself owns; callers' fields may not use them.
CHAIN_FIELDS: Final = frozenset({"kid", "prev", "mac"})

_MAC_HEAD: Final = b',"mac":"'
_MAC_TAIL: Final = b'"}\n'
_MAC_HEX_LEN: Final = 64  # SHA-256 as hex
_SUFFIX_LEN: Final = len(_MAC_HEAD) + _MAC_HEX_LEN + len(_MAC_TAIL)
_HEX: Final = frozenset(b"0123456789abcdef")

# Why a line failed, as a machine-readable code beside the human `why` text.
Code = Literal["ok", "torn", "json", "field", "kid_unknown", "kid_back", "seq", "prev", "mac"]


@dataclass(frozen=True, slots=True, kw_only=True)
class LineCheck:
    """The outcome of checking one line. On success `mac`, `seq`, `kid` and `kid_index`
    describe the entry and become the state the next line is checked against."""

    ok: bool
    code: Code
    why: str
    mac: str = ""
    seq: int = 0
    kid: str = ""
    kid_index: int = -1
    entry: dict[str, Any] | None = None


def compute_mac(key: bytes, prev: str, body: bytes) -> str:
    """The chain mac of `body` following the entry whose mac is `prev` ("" at a chain's start)."""
    return hmac.new(key, prev.encode("ascii") + b"\n" + body, hashlib.sha256).hexdigest()


def kid_index(keys: KeySet, kid: str) -> int | None:
    """Position of `kid` in the key set, oldest first; None if unknown."""
    for i, (k, _) in enumerate(keys.keys):
        if k == kid:
            return i
    return None


def seal(fields: Mapping[str, Any], *, prev: str, kid: str, key: bytes) -> tuple[bytes, str]:
    """Build one entry line (with its trailing newline) and return it with its mac.

    Raises ValueError if `fields` is empty, uses a chain field, or the line would exceed
    `MAX_ENTRY_BYTES`; TypeError (orjson.JSONEncodeError) if a value is not serialisable.
    """
    if not fields:
        raise ValueError("an audit entry needs at least one field")
    clash = CHAIN_FIELDS.intersection(fields)
    if clash:
        raise ValueError(f"audit fields may not set {sorted(clash)}")
    body = orjson.dumps({**fields, "kid": kid, "prev": prev})
    mac = compute_mac(key, prev, body)
    line = body[:-1] + _MAC_HEAD + mac.encode("ascii") + _MAC_TAIL
    if len(line) > MAX_ENTRY_BYTES:
        raise ValueError(f"audit entry of {len(line)} bytes exceeds {MAX_ENTRY_BYTES}")
    return line, mac


def _bad(code: Code, why: str) -> LineCheck:
    return LineCheck(ok=False, code=code, why=why)


def _is_mac_hex(value: bytes) -> bool:
    return len(value) == _MAC_HEX_LEN and _HEX.issuperset(value)


def _split(line: bytes) -> tuple[bytes, str] | LineCheck:
    """Separate the body (as sealed) from the mac, or say why the line is malformed."""
    suffix = line[-_SUFFIX_LEN:]
    mac = suffix[len(_MAC_HEAD) : len(_MAC_HEAD) + _MAC_HEX_LEN]
    if (
        len(line) > _SUFFIX_LEN
        and suffix.startswith(_MAC_HEAD)
        and suffix.endswith(_MAC_TAIL)
        and _is_mac_hex(mac)
    ):
        return line[:-_SUFFIX_LEN] + b"}", mac.decode("ascii")
    try:
        orjson.loads(line)
    except orjson.JSONDecodeError:
        return _bad("json", "not JSON")
    return _bad("json", "mac missing or not last")


def check_line(
    line: bytes,
    *,
    prev: str | None,
    expected_seq: int | None,
    keys: KeySet,
    min_kid_index: int,
) -> LineCheck:
    """Check one line against the chain state left by the line before it.

    `prev` and `expected_seq` are None when the line starts a verification run with no
    known predecessor (the oldest file kept): the entry's own `prev` is then trusted and
    only its mac is checked. `min_kid_index` is the newest key position seen so far.
    Checks run in an order that makes `why` name the most telling symptom.
    """
    if len(line) > MAX_ENTRY_BYTES:
        return _bad("json", "line too long")
    if not line.endswith(b"\n"):
        return _bad("torn", "incomplete line")
    split = _split(line)
    if isinstance(split, LineCheck):
        return split
    body, mac = split
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _bad("json", "not JSON")
    if not isinstance(fields, dict):
        return _bad("json", "not a JSON object")
    if "mac" in fields:
        return _bad("field", "duplicate mac")
    seq, kid, entry_prev = fields.get("seq"), fields.get("kid"), fields.get("prev")
    if type(seq) is not int or seq < 1:
        return _bad("field", "missing or bad seq")
    if not isinstance(kid, str) or not kid:
        return _bad("field", "missing or bad kid")
    if not isinstance(entry_prev, str) or not (
        entry_prev == "" or _is_mac_hex(entry_prev.encode("ascii", "replace"))
    ):
        return _bad("field", "missing or bad prev")

    index = kid_index(keys, kid)
    key = keys.get(kid)
    if index is None or key is None:
        return _bad("kid_unknown", f"unknown key id {kid}")
    if index < min_kid_index:
        newest = keys.keys[min_kid_index][0]
        return _bad("kid_back", f"key id goes backwards ({kid} after {newest})")
    if expected_seq is not None and seq != expected_seq:
        return _bad("seq", f"seq {seq} after {expected_seq - 1}")
    if prev is not None and entry_prev != prev:
        return _bad("prev", "prev does not match the previous mac")
    if not hmac.compare_digest(compute_mac(key, entry_prev, body), mac):
        return _bad("mac", "mac mismatch")
    fields["mac"] = mac
    return LineCheck(
        ok=True, code="ok", why="", mac=mac, seq=seq, kid=kid, kid_index=index, entry=fields
    )


def seal_document(fields: Mapping[str, Any], *, kid: str, key: bytes) -> bytes:
    """A standalone sealed JSON object (not a chain entry: no ``seq``, no ``prev``), one line.

    The mac is HMAC-SHA256 over ``"\\n" + body`` as for an entry that starts a chain, but the
    body has no ``prev`` member, so a document can never pass as an entry, nor an entry
    (which always has one) as a document. Used for the audit anchors kept off the host.
    """
    clash = CHAIN_FIELDS.intersection(fields)
    if clash:
        raise ValueError(f"document fields may not set {sorted(clash)}")
    body = orjson.dumps({**fields, "kid": kid})
    mac = compute_mac(key, "", body)
    return body[:-1] + _MAC_HEAD + mac.encode("ascii") + _MAC_TAIL


def open_document(line: bytes, *, keys: KeySet) -> dict[str, Any] | str:
    """The fields of a document made by `seal_document` whose mac verifies, else why not."""
    line = line.strip() + b"\n"
    if len(line) > MAX_DOCUMENT_BYTES:
        return "too long"
    split = _split(line)
    if isinstance(split, LineCheck):
        return split.why
    body, mac = split
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "not JSON"
    if not isinstance(fields, dict) or "prev" in fields or "mac" in fields:
        return "not a sealed document"
    kid = fields.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        return f"unknown key id {kid}"
    if not hmac.compare_digest(compute_mac(key, "", body), mac):
        return "mac mismatch"
    return fields
