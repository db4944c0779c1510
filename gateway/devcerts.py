"""Development certificates: a private CA and certificates for one machine (a server
certificate for its host names, client certificates by common name), so `optgate serve`
works with no setup. Never for production: see certs/README.md. Every problem with the
files is a `ConfigError` that names the file."""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import ConfigError
from gateway.pem import read_pem, spki

DEV_HOSTNAMES = ("localhost", "127.0.0.1", "::1")
DEV_CA_DAYS = 3650  # 10 years: a development CA is trusted once and kept
DEV_LEAF_DAYS = 825  # Apple's limit for TLS certificates from a private (user-trusted) CA
CLOCK_SKEW = dt.timedelta(hours=1)  # not_before in the past, for peers whose clocks run slow
MAX_COMMON_NAME = 64  # RFC 5280 ub-common-name
KEY_MODE = 0o600
CERT_MODE = 0o644

_DNS_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(?:\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")

@dataclass(frozen=True, slots=True, kw_only=True)
class DevCerts:
    ca_pem: Path  # ca.pem: what clients trust
    ca_key: Path  # ca.key (0600): signs server and client certificates
    server_pem: Path  # server.pem: leaf, then CA
    server_key: Path  # server.key (0600)


def make_dev_certs(
    out_dir: Path, *, hostnames: Sequence[str] = DEV_HOSTNAMES, overwrite: bool = False
) -> DevCerts:
    """Write ca.pem, ca.key, server.pem and server.key into `out_dir`.

    An existing ca.pem + ca.key pair is reused (clients that trust it keep working) unless
    `overwrite`; existing server files are an error unless `overwrite`.
    """
    paths = _beside(out_dir / "server.pem", out_dir / "server.key")
    _make_dev_certs(paths, hostnames, overwrite=overwrite)
    return paths


def ensure_dev_certs(cert: Path, key: Path) -> bool:
    """Make development certificates at `cert`/`key` (CA beside them) when both are missing.

    Returns True when it made them. Exactly one missing is an error: that is a broken
    deployment, not a first start.
    """
    have_cert, have_key = cert.exists(), key.exists()
    if have_cert and have_key:
        return False
    if have_cert or have_key:
        present, missing = (cert, key) if have_cert else (key, cert)
        raise ConfigError(
            f"TLS {missing} is missing but {present} exists: restore it, or remove both"
            " to have development certificates made"
        )
    _make_dev_certs(_beside(cert, key), DEV_HOSTNAMES, overwrite=False)
    return True


def _beside(cert: Path, key: Path) -> DevCerts:
    ca_dir = cert.parent
    return DevCerts(
        ca_pem=ca_dir / "ca.pem", ca_key=ca_dir / "ca.key", server_pem=cert, server_key=key
    )


def issue_client_cert(
    ca_dir: Path, common_name: str, out_dir: Path, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """A client certificate with CN=`common_name`, signed by the CA in `ca_dir`.

    Written to `out_dir` as `<name>.pem` and `<name>.key` (0600); returns both paths.
    """
    if not 0 < len(common_name) <= MAX_COMMON_NAME or not common_name.isprintable():
        raise ConfigError(f"client common name must be 1 to {MAX_COMMON_NAME} printable characters")
    ca_cert, ca_key = _load_ca_pair(ca_dir / "ca.pem", ca_dir / "ca.key")
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", common_name)
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
    if not overwrite:
        _refuse_existing(cert_path, key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    leaf = _leaf(subject, key, ca_cert, ca_key, [ExtendedKeyUsageOID.CLIENT_AUTH], sans=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(key_path, _key_pem(key), KEY_MODE, overwrite=overwrite)
    _write(cert_path, leaf.public_bytes(serialization.Encoding.PEM), CERT_MODE, overwrite=overwrite)
    return cert_path, key_path


def _make_dev_certs(paths: DevCerts, hostnames: Sequence[str], *, overwrite: bool) -> None:
    sans = _sans(hostnames)
    if not overwrite:
        _refuse_existing(paths.server_pem, paths.server_key)
    has_ca = paths.ca_pem.exists(), paths.ca_key.exists()
    if all(has_ca) and not overwrite:
        ca_cert, ca_key = _load_ca_pair(paths.ca_pem, paths.ca_key)
        new_ca = False
    elif any(has_ca) and not overwrite:
        raise ConfigError(
            f"only one of {paths.ca_pem} and {paths.ca_key} exists: restore the other,"
            " or remove it to make a new development CA"
        )
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _ca(ca_key)
        new_ca = True
    server_key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    leaf = _leaf(subject, server_key, ca_cert, ca_key, usages, sans=sans)
    for folder in {p.parent for p in (paths.ca_pem, paths.ca_key, paths.server_pem)}:
        folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    if new_ca:
        _write(paths.ca_key, _key_pem(ca_key), KEY_MODE, overwrite=overwrite)
        _write(paths.ca_pem, ca_cert.public_bytes(pem), CERT_MODE, overwrite=overwrite)
    _write(paths.server_key, _key_pem(server_key), KEY_MODE, overwrite=overwrite)
    chain = leaf.public_bytes(pem) + ca_cert.public_bytes(pem)
    _write(paths.server_pem, chain, CERT_MODE, overwrite=overwrite)


def _sans(hostnames: Sequence[str]) -> list[x509.GeneralName]:
    if not hostnames:
        raise ConfigError("development certificates need at least one host name")
    sans: list[x509.GeneralName] = []
    bad: list[str] = []
    for name in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            if _DNS_NAME.fullmatch(name) and len(name) <= 253:
                sans.append(x509.DNSName(name.rstrip(".").lower()))
            else:
                bad.append(name)
    if bad:
        raise ConfigError([f"{name!r} is neither a DNS name nor an IP address" for name in bad])
    return sans


def _refuse_existing(*paths: Path) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ConfigError([f"{p} already exists; not overwriting" for p in existing])


def _load_ca_pair(
    cert_path: Path, key_path: Path
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    problems: list[str] = []
    cert_pem = read_pem(cert_path, "CA certificate", problems)
    key_pem = read_pem(key_path, "CA key", problems)
    if cert_pem is None or key_pem is None:
        raise ConfigError(problems)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"development CA {cert_path} / {key_path}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"CA key {key_path} is not an ECDSA key made by `optgate certs dev`")
    if spki(cert.public_key()) != spki(key.public_key()):
        raise ConfigError(f"CA key {key_path} does not match {cert_path}")
    return cert, key


def _ca(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    # A random suffix tells apart the development CAs of different machines in a trust store.
    name = x509.Name(
        [
            x509.NameAttribute(
                NameOID.ORGANIZATION_NAME, "optgate development (not for production)"
            ),
            x509.NameAttribute(NameOID.COMMON_NAME, f"optgate dev CA {secrets.token_hex(4)}"),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=DEV_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )


def _leaf(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    usages: list[x509.ObjectIdentifier],
    *,
    sans: list[x509.GeneralName] | None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + dt.timedelta(days=DEV_LEAF_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    unused = ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement")
    return x509.KeyUsage(
        digital_signature=True,  # ECDSA signs the TLS 1.3 handshake
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
        **dict.fromkeys(unused, False),
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write a whole file with `mode` from its first byte (a key is never briefly 0644).

    Without `overwrite`, link() refuses an existing target, so two processes making
    certificates at once cannot mix their files.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed the mode given to open()
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ConfigError(f"{path} already exists; not overwriting") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
