"""Container health check: ``GET /healthz`` on the HTTPS listener the gateway's config names.

Run by the image's ``HEALTHCHECK`` with the gateway's own Python, so it reads the same
config as ``optgate serve`` ($OPTGATE_CONFIG) and probes its ``[http] listen`` port instead
of assuming 8443. Exit 0 when the listener answers 200, 1 otherwise (Docker's contract).

The probe speaks TLS 1.3 like every client of the gateway, but does not verify the
certificate: it never leaves the container and must not depend on which CA the operator
mounted. A wildcard listen address (``0.0.0.0``, ``::``) is probed on loopback.
"""

from __future__ import annotations

import ssl
import sys
import urllib.request

from gateway.config import Listen, load
from gateway.errors import OptgateError

TIMEOUT_S = 2.0  # inside the HEALTHCHECK's own --timeout=3s, Python's start-up included
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 - matched, not bound


def healthz_url(listen: Listen) -> str:
    """The ``/healthz`` URL for a listener (a wildcard address becomes loopback)."""
    host = _WILDCARDS.get(listen.host, listen.host)
    if ":" in host:
        host = f"[{host}]"  # RFC 3986 §3.2.2: an IPv6 literal goes in brackets
    return f"https://{host}:{listen.port}/healthz"


def main() -> int:
    try:
        url = healthz_url(load().http.listen)
    except OptgateError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=TIMEOUT_S) as reply:  # noqa: S310 - https only
            status = int(reply.status)
    except OSError as exc:  # refused, timed out, TLS failure, or an HTTP error status
        why = getattr(exc, "reason", None) or exc  # URLError wraps the socket or TLS error
        print(f"healthcheck: {url}: {why}", file=sys.stderr)
        return 1
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
