"""Open connections per client address, capped (Postfix's
``smtpd_client_connection_count_limit``, nginx's ``limit_conn``): the count behind the SMTP
listeners' cap (`gateway.smtp.limiter`) and the HTTPS listener's (`gateway.http.app`)."""

from __future__ import annotations

from collections import Counter


class PerAddress:
    """At most `limit` open connections per client address (0 = no cap). Each `acquire`
    that returns True is paired with one `release` when that connection closes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()

    def acquire(self, host: str) -> bool:
        if self.limit and self._open[host] >= self.limit:
            return False
        self._open[host] += 1
        return True

    def release(self, host: str) -> None:
        self._open[host] -= 1
        if self._open[host] <= 0:
            del self._open[host]
