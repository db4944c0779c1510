"""Key names in the store. Every name holds pseudonyms or digests only, checked to be hex.

A record's *logical name* is ``og:e:<pseudonym>`` (``og:s:`` for SMS): the AEAD associated
data of its value, and the name the rest of the gateway uses. Records are not stored under
it, though: one Redis key per record costs about 100 bytes of server overhead on top of the
record itself, so records live in hash buckets. The bucket is the logical prefix plus the
pseudonym's first `BUCKET_HEX` hex digits (``og:e:3fa2``, 65,536 buckets per channel), the
field is the rest of the pseudonym as raw bytes. A million records make about 15 fields per
bucket, which the server keeps as one compact listpack each (the embedded server allows
512 fields of up to 512 bytes; see ``embedded``), about 40 % of the memory of one key per
record. Buckets are keys of their own, so a Cluster spreads them over its slots.

The store's sentinel (``store.sentinel``) is ``og:meta:sentinel`` on a standalone server.
On a Cluster a lookup's pipeline reaches only the nodes holding that message's buckets, so
the sentinel is kept once per hash slot, ``og:meta:sentinel:{<tag>}`` with a hash tag
chosen to land in that slot (16,384 copies, about 2 MB): a lookup reads, on each node it
reaches anyway, the copy in the slot of one of its buckets. Copies move with their slots
when a Cluster is resharded, and a node that lost its data has lost its copies too.
"""

from __future__ import annotations

import functools
import re
from typing import Final

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from gateway.core.channels import CHANNELS
from gateway.core.records import SENTINEL_NAME

RECORD_PREFIX: Final = {"email": "og:e:", "sms": "og:s:"}
BUCKET_HEX: Final = 4
# SCAN pattern of one channel's buckets (older one-key-per-record names are longer).
BUCKET_GLOB: Final = {c: p + "[0-9a-f]" * BUCKET_HEX for c, p in RECORD_PREFIX.items()}
LAYOUT_KEY: Final = "og:meta:layout"
LAYOUT: Final = b"buckets-1"
_HEX: Final = re.compile(r"[0-9a-f]{16,128}")


def check_hex(value: str, what: str) -> str:
    """`value` if it is lowercase hex; ValueError otherwise.

    Also a PHI guard: a caller can never put an address into a key name by mistake.
    """
    if not _HEX.fullmatch(value):
        raise ValueError(f"{what} must be lowercase hex, 16-128 characters")
    return value


def record_key(channel: str, pseudonym: str) -> str:
    """The logical name of one recipient's record (its AEAD associated data)."""
    prefix = RECORD_PREFIX.get(channel)
    if prefix is None:
        raise ValueError(f"channel must be one of {CHANNELS}")
    return prefix + check_hex(pseudonym, "pseudonym")


def record_slot(channel: str, pseudonym: str) -> tuple[str, bytes]:
    """(bucket key, field) where the record of `pseudonym` is stored."""
    name = record_key(channel, pseudonym)
    cut = len(name) - len(pseudonym) + BUCKET_HEX
    return name[:cut], bytes.fromhex(pseudonym[BUCKET_HEX:])


def slot_name(bucket: str, field: bytes) -> str:
    """The logical name of the record in `bucket` under `field` (`record_slot` reversed)."""
    return bucket + field.hex()


SENTINEL_KEY: Final = SENTINEL_NAME


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    """For each hash slot, a short hash tag that lands in it (found by counting up in hex:
    about 315,000 CRC16s, 0.3 s, once per process and only on a Cluster)."""
    tags: list[str] = [""] * REDIS_CLUSTER_HASH_SLOTS
    left, n = REDIS_CLUSTER_HASH_SLOTS, 0
    while left:
        tag = format(n, "x")
        slot = key_slot(tag.encode())
        if not tags[slot]:
            tags[slot] = tag
            left -= 1
        n += 1
    return tuple(tags)


def sentinel_copy(slot: int) -> str:
    """The Cluster sentinel copy that lives in hash slot `slot`."""
    return f"{SENTINEL_KEY}:{{{_slot_tags()[slot]}}}"


def sentinel_copies() -> list[str]:
    """Every Cluster sentinel copy, one per hash slot."""
    return [sentinel_copy(s) for s in range(REDIS_CLUSTER_HASH_SLOTS)]
