"""PHI canaries: distinctive addresses and numbers sent through the gateway, then looked for
in everything it keeps or says (logs, audit files, the store, metrics, replies).

`needles()` turns canary texts into the byte strings to look for: each text as UTF-8, JSON-
escaped, percent-encoded, base64 and hex; `find()` looks for them case-insensitively.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

import idna
import redis


def email_forms(address: str) -> set[str]:
    """The ways an address may show: as given, lower and upper case, its local part (and
    without its +tag), and with the domain's IDNA A-label (and that label alone, when the
    domain is an IDN: it names the person's domain as precisely)."""
    local, _, domain = address.rpartition("@")
    forms = {address, address.lower(), address.upper(), local, local.split("+", 1)[0]}
    a_label = idna.encode(domain, uts46=True).decode("ascii")
    if a_label != domain.lower():
        forms |= {f"{local}@{a_label}", a_label}
    return forms


def phone_forms(e164: str) -> set[str]:
    """A number with and without its '+'."""
    return {e164, e164.lstrip("+")}


def needles(texts: Iterable[str]) -> set[bytes]:
    out: set[bytes] = set()
    for text in texts:
        raw = text.encode("utf-8")
        out |= {
            raw,
            json.dumps(text)[1:-1].encode("ascii"),  # \u00df for a non-ASCII letter
            quote(text, safe="").encode("ascii"),  # %40, %2B, %C3%9F
            base64.b64encode(raw),
            raw.hex().encode("ascii"),
        }
    return {n.lower() for n in out}


def find(wanted: set[bytes], blobs: Iterable[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Every (where, needle) such that the blob holds the needle, ignoring ASCII case."""
    hits: list[tuple[str, bytes]] = []
    for where, blob in blobs:
        low = blob.lower()
        hits += [(where, n) for n in sorted(wanted) if n in low]
    return hits


def store_blobs(client: redis.Redis) -> list[tuple[str, bytes]]:
    """Every key of the store with its value: the raw bytes as read (GET, HGETALL, XRANGE...)
    and as DUMP serialises them."""
    out: list[tuple[str, bytes]] = []
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        parts: list[bytes] = [key]
        if kind == b"string":
            parts.append(client.get(key) or b"")
        elif kind == b"hash":
            parts += [b for kv in client.hgetall(key).items() for b in kv]
        elif kind == b"stream":
            for entry_id, fields in client.xrange(key):
                parts += [entry_id, *(b for kv in fields.items() for b in kv)]
        elif kind == b"set":
            parts += list(client.smembers(key))
        elif kind == b"list":
            parts += client.lrange(key, 0, -1)
        elif kind == b"zset":
            parts += [m for m, _ in client.zrange(key, 0, -1, withscores=True)]
        parts.append(client.dump(key) or b"")
        out.append((f"store key {key!r}", b"\0".join(parts)))
    return out


def files_under(root: Path, *, skip: Iterable[str] = ()) -> list[tuple[str, bytes]]:
    """Every regular file under `root` (the audit log, the store's AOF, the key file...),
    except those with a path part in `skip`."""
    skipped = set(skip)
    return [
        (str(path), path.read_bytes())
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_socket() and not skipped & set(path.parts)
    ]
