"""TLS contexts (TLS 1.3 only, both directions: docs/guarantees.md §2.5) and their
certificate checks.

- `server_context`: the SMTP and HTTPS listeners. Client certificates are optional and
  verified against `[tls] client_ca` when one is set (the certificate's CN names the sender).
- `client_context`: connections to providers; verified (system trust plus an optional
  CA file), hostname checked.
- `make_dev_certs` / `ensure_dev_certs` / `issue_client_cert` (made in `gateway.devcerts`,
  named here too): a private CA and certificates for one machine, so `optgate serve` works
  with no setup. Never for production: see certs/README.md.

Every problem with certificate files is a `ConfigError` that names the file, raised
before any socket is opened.
"""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.devcerts import DEV_CA_DAYS as DEV_CA_DAYS  # noqa: PLC0414 - re-exported, as below
from gateway.devcerts import DEV_LEAF_DAYS as DEV_LEAF_DAYS  # noqa: PLC0414 - as below
from gateway.devcerts import DevCerts as DevCerts  # noqa: PLC0414 - as below
from gateway.devcerts import ensure_dev_certs as ensure_dev_certs  # noqa: PLC0414 - as below
from gateway.devcerts import issue_client_cert as issue_client_cert  # noqa: PLC0414 - as below
from gateway.devcerts import make_dev_certs as make_dev_certs  # noqa: PLC0414 - the service, the CLI and tests name them `tls.*`
from gateway.errors import ConfigError
from gateway.pem import read_pem, spki

TLS_VERSION = ssl.TLSVersion.TLSv1_3  # docs/guarantees.md §2.5: 1.3 only; not configurable


def _tls13_only(ctx: ssl.SSLContext) -> None:
    # Pinning the maximum too: "1.3 only" is the contract, and a future protocol version
    # should be a deliberate change here, not a library upgrade.
    ctx.minimum_version = TLS_VERSION
    ctx.maximum_version = TLS_VERSION
    # What Python 3.13 sets by default: reject certificates that break RFC 5280 rules.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT


def _check_pair(cert: Path, key: Path) -> None:
    """Raise one ConfigError naming whatever is wrong with a certificate and its key."""
    problems: list[str] = []
    cert_pem = read_pem(cert, "TLS certificate", problems)
    key_pem = read_pem(key, "TLS key", problems)
    leaf = private = None
    if cert_pem is not None:
        try:
            leaf = x509.load_pem_x509_certificates(cert_pem)[0]
        except ValueError:
            problems.append(f"TLS certificate {cert} holds no PEM certificate")
    if key_pem is not None:
        try:
            private = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            problems.append(f"TLS key {key} is encrypted; the gateway needs it unencrypted (0600)")
        except ValueError:
            problems.append(f"TLS key {key} holds no PEM private key")
    if leaf is not None and private is not None:
        if spki(leaf.public_key()) != spki(private.public_key()):
            problems.append(f"TLS key {key} does not match certificate {cert}")
        if leaf.not_valid_after_utc < dt.datetime.now(dt.UTC):
            problems.append(
                f"TLS certificate {cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d}"
                " (development certificates: delete it and its key, then restart)"
            )
    if problems:
        if cert_pem is None and key_pem is None:
            problems.append("run `optgate certs dev`, or set [tls] cert and key")
        raise ConfigError(problems)


def _no_password() -> bytes:
    # Never let OpenSSL prompt on the terminal of a server; _check_pair has refused
    # encrypted keys already, so this only runs if the file changed in between.
    raise ConfigError("TLS key is encrypted; the gateway needs it unencrypted (0600)")


def server_context(cert: Path, key: Path, *, client_ca: Path | None = None) -> ssl.SSLContext:
    """A TLS 1.3-only server context; with `client_ca`, client certificates are optional
    and, when presented, must verify against it."""
    _check_pair(cert, key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _tls13_only(ctx)
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"TLS certificate {cert} and key {key}: {exc}") from exc
    if client_ca is not None:
        _load_ca(ctx, client_ca, "TLS client CA")
        # OPTIONAL: senders may still use AUTH; a certificate that is presented and
        # fails verification aborts the handshake.
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """A verifying TLS 1.3-only client context: system trust plus `ca_file`."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # CERT_REQUIRED, check_hostname
    _tls13_only(ctx)
    if ca_file is not None:
        _load_ca(ctx, ca_file, "CA file")
    return ctx


def _load_ca(ctx: ssl.SSLContext, path: Path, what: str) -> None:
    problems: list[str] = []
    if read_pem(path, what, problems) is None:
        raise ConfigError(problems)
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(f"{what} {path} holds no usable PEM certificate ({exc})") from exc


def peer_common_name(conn: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The CN of the peer's verified certificate, or None when it sent none."""
    cert = conn.getpeercert()
    subject = cert.get("subject", ()) if cert else ()
    for rdn in () if isinstance(subject, str) else subject:
        # Each RDN is a tuple of (attribute, value) pairs, e.g. (("commonName", "app"),).
        for pair in rdn:
            if isinstance(pair, tuple) and pair[0] == "commonName":
                return pair[1]
    return None


# --- development certificates -----------------------------------------------------------
