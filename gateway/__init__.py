"""optgate: an asyncio message gateway that enforces recipients' opt-outs."""

__version__ = "0.1.0"
