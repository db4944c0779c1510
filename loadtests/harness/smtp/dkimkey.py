"""The benchmark's DKIM key (RFC 6376): one RSA-2048 key for the From domain of the bench
messages, written as PEM for both signers (the gateway's `[[dkim]] key_file` and
OpenDKIM's `KeyFile`), and the check that a message the sink received carries a valid
signature by it (dkimpy, the public key served by a resolver function instead of DNS)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import dkim  # dkimpy: verification only
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from harness.common import toml_str

DOMAIN = "sender.example"  # the domain of the client's From (client.MAIL_FROM)
SELECTOR = "bench"
RSA_BITS = 2048  # what bulk senders deploy; RFC 8301 §3.2 requires at least 1024


@dataclass(frozen=True)
class DkimKey:
    domain: str
    selector: str
    key_file: Path  # PKCS#1 PEM ("BEGIN RSA PRIVATE KEY"), which OpenDKIM 2.11 reads
    txt: bytes  # the selector's DNS TXT record: v=DKIM1; k=rsa; p=...

    def toml(self) -> str:
        """The gateway config's `[[dkim]]` entry for this key."""
        return (
            f"[[dkim]]\ndomain = {toml_str(self.domain)}\nselector = {toml_str(self.selector)}\n"
            f"key_file = {toml_str(str(self.key_file))}\n"
        )


def make_key(directory: Path) -> DkimKey:
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    path = directory / f"{SELECTOR}.{DOMAIN}.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    # Both signers read it; OpenDKIM runs as root here and is told not to insist on 0600.
    path.chmod(0o644)
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    txt = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    return DkimKey(domain=DOMAIN, selector=SELECTOR, key_file=path, txt=txt)


def verify(message: bytes, key: DkimKey) -> str:
    """'verified' or why not: the message's first DKIM-Signature checked by dkimpy."""
    if b"dkim-signature:" not in message.lower():
        return "no DKIM-Signature"
    name = f"{key.selector}._domainkey.{key.domain}."

    def dnsfunc(qname: bytes | str, timeout: int = 5) -> bytes:
        asked = qname.decode() if isinstance(qname, bytes) else qname
        return key.txt if asked.rstrip(".") == name.rstrip(".") else b""

    try:
        ok = dkim.verify(message, dnsfunc=dnsfunc)
    except dkim.DKIMException as exc:
        return f"not verified ({exc})"
    return "verified" if ok else "NOT verified (signature does not match)"
