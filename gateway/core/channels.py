"""The channels optgate carries, defined once for the core, the store and the adapters."""

from __future__ import annotations

from typing import Final

# In the order lists, exports and command-line choices show them.
CHANNELS: Final = ("email", "sms")
# The same, for membership tests and set arithmetic (category channels, metric labels).
CHANNEL_SET: Final = frozenset(CHANNELS)
