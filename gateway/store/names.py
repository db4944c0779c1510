"""Key names in the store. Every name holds pseudonyms or digests only, checked to be hex."""

from __future__ import annotations

import re
from typing import Final

from gateway.core.records import CHANNELS

RECORD_PREFIX: Final = {"email": "og:e:", "sms": "og:s:"}
_HEX: Final = re.compile(r"[0-9a-f]{16,128}")


def check_hex(value: str, what: str) -> str:
    """`value` if it is lowercase hex; ValueError otherwise.

    Also a PHI guard: a caller can never put an address into a key name by mistake.
    """
    if not _HEX.fullmatch(value):
        raise ValueError(f"{what} must be lowercase hex, 16-128 characters")
    return value


def record_key(channel: str, pseudonym: str) -> str:
    """The Redis key (and AEAD associated data) of one recipient's record."""
    prefix = RECORD_PREFIX.get(channel)
    if prefix is None:
        raise ValueError(f"channel must be one of {CHANNELS}")
    return prefix + check_hex(pseudonym, "pseudonym")
