"""The exception tree. Policy outcomes are values (`core.policy.Decision`), never exceptions.

OptgateError
├── ConfigError            bad config, rules or key file; carries every problem found
├── KeyringError           key file missing, unreadable, or not matching the store
├── StoreError
│   ├── StoreUnavailable   (also ConnectionError) down, slow past its budget, erroring
│   └── RecordCorrupt      a value that does not decrypt under any known key
├── AuditError             (also OSError) the audit log cannot be written durably
│   └── AuditStreamBusy    another process holds this audit stream
└── UpstreamError
    ├── UpstreamUnavailable    (also ConnectionError) connect, TLS policy, timeout
    └── UpstreamRejected       the provider answered with a non-2xx reply
"""

from __future__ import annotations


class OptgateError(Exception):
    """Base of every error raised by optgate itself."""


class ConfigError(OptgateError):
    """Configuration, rules or key material is invalid. `problems` lists each one."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class KeyringError(OptgateError):
    """The key file is missing, unreadable, or does not belong to this store."""


class StoreError(OptgateError):
    """The opt-out store could not answer."""


class StoreUnavailable(StoreError, ConnectionError):
    """The store is down, slow past `redis.timeout_ms`, or erroring: fail closed."""


class RecordCorrupt(StoreError):
    """A stored record does not authenticate under any known record key."""


class AuditError(OptgateError, OSError):
    """An audit entry could not be made durable: fail closed."""


class AuditStreamBusy(AuditError):
    """Another writer holds the stream's lock (each stream has exactly one writer)."""


class UpstreamError(OptgateError):
    """The upstream provider did not accept."""


class UpstreamUnavailable(UpstreamError, ConnectionError):
    """The upstream could not be reached, timed out, or failed the TLS policy."""

    def __init__(self, message: str, *, enhanced: str = "4.4.1") -> None:
        self.enhanced = enhanced
        super().__init__(message)


class UpstreamRejected(UpstreamError):
    """The upstream answered `code message` (4xx or 5xx)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code} {message}")
