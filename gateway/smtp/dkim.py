"""DKIM signing (RFC 6376) after every change to a message: OpenSSL signs, this module
writes the canonical form and the tag list.

- Keys: the `[[dkim]]` entries, read and checked once at start (`load_keys`): RSA of at
  least 1024 bits (RFC 8301 §3.2; use 2048) signing rsa-sha256 (PKCS#1 v1.5), or Ed25519
  signing ed25519-sha256 (RFC 8463), PEM in PKCS#1 or PKCS#8. Each key signs a probe
  message at load, so a key that cannot sign stops the start with a `ConfigError` instead
  of failing the first message.
- Which keys: every key whose domain is the domain of the message's one From mailbox
  (IDNs as A-labels), and only a domain its sender may use (`[[senders]] from_domains`;
  none set: any configured domain). Two keys for a domain (RSA and Ed25519, RFC 8463 §3) add
  two signatures.
- `h=`: each of `SIGNED` as often as it is present, then `OVERSIGNED` once more, present
  or not (RFC 6376 §5.4.2, §8.15): nobody can add a second From or Subject, nor a
  List-Unsubscribe or List-Unsubscribe-Post of their own, without breaking the signature.
  RFC 8058 §4 requires both list headers in `h=`; Postal and SendGrid shipped without it.
- `c=relaxed/relaxed` (RFC 6376 §3.4.2, §3.4.4): survives the header refolding and
  trailing-space changes that providers make; the body is passed through byte for byte.
- The body hash (`bh=`) depends on the body alone, so a message sent as one copy per
  recipient (each with its own List-Unsubscribe) hashes its body once: `body_hash()`, then
  `sign(..., body_hash=...)` for each copy.

Inline, on the event loop: the signature is one call into OpenSSL through `cryptography`.
CPU per signed copy of a 10 KB message, body hash shared by 5 copies, on this project's
2-core machine while shared (`tests/test_dkim.py::test_cpu_per_signed_copy_...`, `-s`):

                 dkimpy    OpenSSL inline   in a thread   the bare signature
    RSA-2048     8.8 ms    0.84 ms          0.98 ms       0.71 ms (`openssl speed`: 0.71)
    Ed25519      1.0 ms    0.11 ms          0.23 ms       0.04 ms

A copy costs its signature plus ~0.07 ms (its header fields read and canonicalised, the
hashes, the tags). Handing the call to a thread adds ~0.1 ms of wake-ups per copy and no
core (`serve --workers N` already runs one gateway per core), and the loop stalls less for
one signature than for one TLS record; the signing process dkimpy needed is gone.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils

from gateway.config import DkimKey
from gateway.core import message as msg
from gateway.core.addresses import domain_a_label, header_from_domain
from gateway.errors import ConfigError
from gateway.errors import SigningFailed as SigningFailed  # noqa: PLC0414 - re-exported: gateway.smtp.flow imports it from here

SIGNED = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
    "in-reply-to", "references", "mime-version", "content-type",
    "content-transfer-encoding", "list-unsubscribe", "list-unsubscribe-post",
)  # fmt: skip
OVERSIGNED = (
    "from", "reply-to", "to", "cc", "subject", "date", "message-id",
    "list-unsubscribe", "list-unsubscribe-post",
)  # fmt: skip
MIN_RSA_BITS = 1024  # RFC 8301 §3.2: signers MUST use at least 1024 bits (SHOULD 2048)
# Folding of the DKIM-Signature field: RFC 5322 §2.1.1 asks for lines of at most 78
# characters; h= folds after a colon and b= anywhere (RFC 6376 §3.5, FWS in both).
LINE_CHARS = 76
B64_CHUNK = 72
_PROBE = b"From: probe@example.invalid\r\nSubject: probe\r\n\r\nprobe\r\n"
# RFC 6376 §3.1: a selector is dot-separated sub-domains (letters, digits, hyphens).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyMaterial:
    """One loaded key."""

    domain: str  # lower-case A-label
    selector: str
    algorithm: str  # "rsa-sha256" or "ed25519-sha256"
    private: PrivateKey
    dns_txt: str  # the TXT record to publish at <selector>._domainkey.<domain>


# -- canonicalisation (RFC 6376 §3.4) ------------------------------------------------------


def _squeeze(data: bytes) -> bytes:
    """Every run of WSP (SP / HTAB, RFC 5234) as one SP. `bytes.replace` rather than a
    regular expression: a 10 KB body takes 10 µs instead of 100 (re scans byte by byte)."""
    data = data.replace(b"\t", b" ")
    while b"  " in data:
        data = data.replace(b"  ", b" ")
    return data


def relaxed_header(raw: bytes) -> bytes:
    """One header field (`name:value` with its continuation lines and CRLF), relaxed
    (§3.4.2): name lower-cased, value unfolded, WSP runs to one SP, none around the colon
    nor at the end."""
    name, _, value = raw.partition(b":")
    value = _squeeze(value.replace(b"\r\n", b"")).strip(b" ")
    return name.rstrip(b" \t").lower() + b":" + value + b"\r\n"


def relaxed_body(body: bytes) -> bytes:
    """The body, relaxed (§3.4.4): WSP runs to one SP, none at the end of a line, no empty
    lines at the end, and a non-empty body ends with CRLF."""
    body = _squeeze(body).replace(b" \r\n", b"\r\n")
    end = len(body)
    while end >= 2 and body[end - 2 : end] == b"\r\n":
        end -= 2
    return body[:end] + b"\r\n" if end else b""


def body_hash(section: bytes) -> str:
    """`bh=` for a message whose header fields are followed by `section` (the empty line
    and the body, as `core.message.Head.body` holds it; empty when there is no body)."""
    body = section[2:] if section.startswith(b"\r\n") else b""
    return base64.b64encode(hashlib.sha256(relaxed_body(body)).digest()).decode()


def header_list(names: Sequence[str]) -> list[bytes]:
    """The `h=` list for a message whose header fields are `names` (in order)."""
    present = [n.lower() for n in names if n.lower() in SIGNED]
    return [n.encode() for n in (*present, *OVERSIGNED)]


@functools.lru_cache(maxsize=256)  # a message's copies, and most messages, share a list
def _h_tag(names: tuple[bytes, ...]) -> str:
    """`h=` with the names joined by colons, folded after a colon before a name that would
    take the line past `LINE_CHARS` (the line starts with a folding tab)."""
    out, width = ["h="], 3
    for i, name in enumerate(names):
        piece = name.decode() + (":" if i < len(names) - 1 else "")
        if width + len(piece) > LINE_CHARS:
            out.append("\r\n\t")
            width = 1
        out.append(piece)
        width += len(piece)
    return "".join(out)


def _signature(key: KeyMaterial, data: bytes, bh: str | None, now: int) -> bytes:
    """One complete DKIM-Signature field (with CRLF) for `data` (§5: h= from the bottom
    up, a name not present signs as the empty string, the field itself last with b=
    empty and no CRLF)."""
    try:
        head = msg.parse_head(data)
    except msg.MalformedHeader:
        raise SigningFailed("the header section cannot be read") from None
    if bh is None:
        bh = body_hash(head.body)
    instances: dict[bytes, list[bytes]] = {}
    for f in head.fields:
        instances.setdefault(f.name.lower().encode(), []).append(f.raw)
    names = header_list([f.name for f in head.fields])
    hashed = [relaxed_header(found.pop()) for n in names if (found := instances.get(n))]
    tags = (
        f"DKIM-Signature: v=1; a={key.algorithm}; c=relaxed/relaxed;\r\n"
        f"\td={key.domain}; s={key.selector}; t={now};\r\n\t"
        + _h_tag(tuple(names))
        + f";\r\n\tbh={bh};\r\n\tb="
    ).encode()
    hashed.append(relaxed_header(tags)[:-2])  # RFC 6376 §3.7: no CRLF after this one
    digest = hashlib.sha256(b"".join(hashed)).digest()
    if isinstance(key.private, rsa.RSAPrivateKey):
        sig = key.private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    else:
        sig = key.private.sign(digest)  # RFC 8463 §3: PureEdDSA over the SHA-256 hash
    b64 = base64.b64encode(sig).decode()
    chunks = [b64[i : i + B64_CHUNK] for i in range(0, len(b64), B64_CHUNK)]
    return tags + "\r\n\t".join(chunks).encode() + b"\r\n"


# -- keys ----------------------------------------------------------------------------------


def _a_label(domain: str) -> str:
    """IDNA 2008 A-label (the one canonicaliser, `core.addresses`); UnicodeError if invalid."""
    a_label = domain_a_label(domain.strip().rstrip("."))
    if a_label is None:
        raise UnicodeError("not a valid IDNA 2008 domain")
    return a_label


def load_key(entry: DkimKey) -> KeyMaterial:
    """Read and check one `[[dkim]]` key (raises ConfigError naming the entry)."""
    where = f"[[dkim]] {entry.domain}/{entry.selector}"
    try:
        pem = entry.key_file.read_bytes()
        key = serialization.load_pem_private_key(pem, password=None)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {entry.key_file}: {exc.strerror}") from exc
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{where}: {entry.key_file} is not an unencrypted PEM key") from exc
    public = serialization.PublicFormat
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ConfigError(f"{where}: RSA keys need at least {MIN_RSA_BITS} bits")
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, public.SubjectPublicKeyInfo
        )
        algorithm, k, p = "rsa-sha256", "rsa", base64.b64encode(spki).decode()
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        raw_public = key.public_key().public_bytes(serialization.Encoding.Raw, public.Raw)
        algorithm, k, p = "ed25519-sha256", "ed25519", base64.b64encode(raw_public).decode()
    else:
        raise ConfigError(f"{where}: only RSA and Ed25519 keys can sign DKIM")
    if not _SELECTOR.fullmatch(entry.selector):
        raise ConfigError(f"{where}: the selector is not letters, digits, hyphens and dots")
    try:
        domain = _a_label(entry.domain)
    except UnicodeError:
        raise ConfigError(f"{where}: domain is not a valid IDNA 2008 domain") from None
    material = KeyMaterial(
        domain=domain,
        selector=entry.selector,
        algorithm=algorithm,
        private=key,
        dns_txt=f"v=DKIM1; k={k}; p={p}",
    )
    try:
        _signature(material, _PROBE, None, int(time.time()))
    except (SigningFailed, ValueError) as exc:
        raise ConfigError(f"{where}: the key cannot sign ({type(exc).__name__})") from exc
    return material


def load_keys(entries: Sequence[DkimKey]) -> tuple[KeyMaterial, ...]:
    """Every configured key, checked; every problem in one ConfigError."""
    keys, problems = [], []
    for entry in entries:
        try:
            keys.append(load_key(entry))
        except ConfigError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ConfigError(problems)
    return tuple(keys)


def from_domain(values: Sequence[str]) -> str | None:
    """The A-label domain of a message's single From mailbox, or None (no key applies).

    The From binding's own reading (`core.addresses.header_from_domain`), so a message is
    signed only for the domain that was checked, and a From in a form that readers may take
    apart differently (lists, groups, routes, quoted local parts) is never signed.
    """
    return header_from_domain(values)


# -- the gateway's side --------------------------------------------------------------------


class Signer:
    """Signs outgoing copies with the keys that match their From domain."""

    def __init__(self, keys: tuple[KeyMaterial, ...]) -> None:
        self.keys = keys

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(k.domain for k in self.keys)

    async def start(self) -> None:
        """Nothing to start: signing runs inline."""

    async def close(self) -> None:
        """Nothing to stop."""

    def body_hash(self, section: bytes, domain: str | None) -> str | None:
        """The `bh=` every copy of one message shares (see `body_hash()`), or None when no
        key signs for `domain`."""
        if not any(k.domain == domain for k in self.keys):
            return None
        return body_hash(section)

    async def sign(self, data: bytes, domain: str | None, *, body_hash: str | None = None) -> bytes:
        """`data` with a DKIM-Signature per matching key prepended (unchanged if none).
        `body_hash`: `Signer.body_hash()` of `data`'s body, when the caller has it."""
        which = [k for k in self.keys if k.domain == domain]
        if not which:
            return data
        now = int(time.time())
        return b"".join(_signature(k, data, body_hash, now) for k in which) + data
