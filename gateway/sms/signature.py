"""The provider's webhook signature, `X-Twilio-Signature` (pure: no IO).

Twilio signs each webhook request with HMAC-SHA1, keyed by the account's auth token,
over the full URL it requested followed by every POST parameter name and value, sorted
by name (and, for repeated names, by value), concatenated with no separators; the
header holds the base64 of the digest. The official SDK's `RequestValidator` also
accepts the URL with the port removed or with the default port added, because Twilio
may sign either form; `candidate_urls` does the same. Comparison is constant-time.

The same function signs the texts the gateway forwards to the application's inbound
webhook, so an inbound handler that checks Twilio signatures keeps working unchanged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

HEADER = "X-Twilio-Signature"
MAX_SIGNATURE_CHARS = 256  # a base64 SHA-1 digest is 28; anything far longer is garbage


def sign(token: bytes, url: str, params: Sequence[tuple[str, str]]) -> str:
    """The base64 HMAC-SHA1 of `url` + sorted name/value pairs, keyed by `token`."""
    data = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(token, data.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def candidate_urls(url: str) -> list[str]:
    """`url` as given, without its port, and with the scheme's default port."""
    parts = urlsplit(url)
    out = [url]
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    userinfo = parts.netloc.rpartition("@")[0]
    prefix = f"{userinfo}@" if userinfo else ""
    default = 443 if parts.scheme == "https" else 80
    for port in ("", f":{parts.port or default}"):
        form = urlunsplit(
            (parts.scheme, prefix + host + port, parts.path, parts.query, parts.fragment)
        )
        if form not in out:
            out.append(form)
    return out


def verify(
    token: bytes, urls: Iterable[str], params: Sequence[tuple[str, str]], signature: str
) -> bool:
    """Whether `signature` is the provider's signature of `params` for one of `urls`."""
    if not token or not signature or len(signature) > MAX_SIGNATURE_CHARS:
        return False
    given = signature.encode("ascii", "replace")
    ok = False
    for url in urls:
        # Every candidate is compared (no early exit), so timing says nothing about which.
        ok |= hmac.compare_digest(sign(token, url, params).encode("ascii"), given)
    return ok
