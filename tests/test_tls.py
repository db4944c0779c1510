"""TLS 1.3 only, both directions (docs/guarantees.md §2.5), and the development certificates.

Every handshake here is real: asyncio servers and clients on 127.0.0.1, port 0.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import tls
from gateway.errors import ConfigError


@dataclass
class Server:
    port: int
    seen: list[tuple[str | None, str | None]] = field(default_factory=list)  # (version, CN)


@pytest.fixture
def dev(tmp_path: Path) -> tls.DevCerts:
    return tls.make_dev_certs(tmp_path / "certs")


async def _serve(ctx: ssl.SSLContext) -> tuple[asyncio.Server, Server]:
    server = Server(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        obj = writer.get_extra_info("ssl_object")
        server.seen.append((obj.version(), tls.peer_common_name(obj)))
        writer.write(b"hello\n")
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    server.port = srv.sockets[0].getsockname()[1]
    return srv, server


@pytest.fixture
async def gateway_server(dev: tls.DevCerts) -> AsyncIterator[Server]:
    srv, server = await _serve(tls.server_context(dev.server_pem, dev.server_key))
    async with srv:
        yield server


async def _connect(port: int, ctx: ssl.SSLContext) -> str | None:
    """Handshake, read the greeting, return the negotiated version."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"), 10
    )
    try:
        assert await reader.readline() == b"hello\n"
        version: str | None = writer.get_extra_info("ssl_object").version()
        return version
    finally:
        writer.close()


async def _refused_after_handshake(port: int, ctx: ssl.SSLContext) -> bool:
    """TLS 1.3 clients finish their side of the handshake before the server checks their
    certificate; a refusal then arrives as an alert (or EOF) instead of the greeting."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1"
    )
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except (ssl.SSLError, ConnectionError):
        return True
    finally:
        writer.close()


# --- server_context ----------------------------------------------------------------------


async def test_tls13_client_verifying_the_dev_ca_connects(
    gateway_server: Server, dev: tls.DevCerts
) -> None:
    ctx = ssl.create_default_context(cafile=str(dev.ca_pem))  # a stock client, not ours
    assert await _connect(gateway_server.port, ctx) == "TLSv1.3"
    assert gateway_server.seen == [("TLSv1.3", None)]


async def test_tls12_only_client_is_refused(gateway_server: Server, dev: tls.DevCerts) -> None:
    ctx = ssl.create_default_context(cafile=str(dev.ca_pem))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await _connect(gateway_server.port, ctx)
    assert gateway_server.seen == []  # the handler never ran: nothing served over TLS 1.2


def test_server_context_is_pinned_to_tls13(dev: tls.DevCerts) -> None:
    ctx = tls.server_context(dev.server_pem, dev.server_key)
    assert ctx.minimum_version == ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_NONE


async def test_client_certificate_cn_is_visible_when_client_ca_is_set(
    dev: tls.DevCerts, tmp_path: Path
) -> None:
    cert, key = tls.issue_client_cert(dev.ca_pem.parent, "reminders-app", tmp_path / "clients")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    server_ctx = tls.server_context(dev.server_pem, dev.server_key, client_ca=dev.ca_pem)
    assert server_ctx.verify_mode == ssl.CERT_OPTIONAL
    srv, server = await _serve(server_ctx)
    async with srv:
        with_cert = tls.client_context(dev.ca_pem)
        with_cert.load_cert_chain(cert, key)
        assert await _connect(server.port, with_cert) == "TLSv1.3"
        # Optional: a sender without a certificate still connects (and must AUTH).
        assert await _connect(server.port, tls.client_context(dev.ca_pem)) == "TLSv1.3"
        # A certificate from a CA the gateway does not trust is refused outright.
        stranger = trustme.CA().issue_cert("reminders-app")
        foreign = tls.client_context(dev.ca_pem)
        stranger.configure_cert(foreign)
        assert await _refused_after_handshake(server.port, foreign)
    assert server.seen == [("TLSv1.3", "reminders-app"), ("TLSv1.3", None)]


def test_server_context_reports_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        tls.server_context(tmp_path / "server.pem", tmp_path / "server.key")
    text = str(info.value)
    assert f"TLS certificate {tmp_path / 'server.pem'} does not exist" in text
    assert f"TLS key {tmp_path / 'server.key'} does not exist" in text
    assert "optgate certs dev" in text


def test_server_context_reports_mismatched_key(dev: tls.DevCerts) -> None:
    with pytest.raises(ConfigError, match="does not match certificate"):
        tls.server_context(dev.server_pem, dev.ca_key)


def test_server_context_reports_garbage_and_encrypted_keys(
    dev: tls.DevCerts, tmp_path: Path
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        tls.server_context(junk, dev.server_key)
    key = serialization.load_pem_private_key(dev.server_key.read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(ConfigError, match="is encrypted"):
        tls.server_context(dev.server_pem, locked)


def test_server_context_reports_unreadable_client_ca(dev: tls.DevCerts, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"client CA .* does not exist"):
        tls.server_context(dev.server_pem, dev.server_key, client_ca=tmp_path / "nope.pem")


# --- client_context ----------------------------------------------------------------------


async def test_client_context_refuses_a_tls12_server(dev: tls.DevCerts) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    old.load_cert_chain(dev.server_pem, dev.server_key)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    srv, server = await _serve(old)
    async with srv:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _connect(server.port, tls.client_context(dev.ca_pem))
    assert server.seen == []


async def test_client_context_refuses_an_unknown_ca(tmp_path: Path, dev: tls.DevCerts) -> None:
    other = trustme.CA()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.issue_cert("127.0.0.1").configure_cert(ctx)
    srv, server = await _serve(ctx)
    async with srv:
        with pytest.raises(ssl.SSLCertVerificationError):
            await _connect(server.port, tls.client_context(dev.ca_pem))
        other.cert_pem.write_to_path(
            str(tmp_path / "other-ca.pem")
        )  # the control: trusted, it works
        assert (
            await _connect(server.port, tls.client_context(tmp_path / "other-ca.pem")) == "TLSv1.3"
        )


async def test_client_context_checks_the_host_name(
    gateway_server: Server, dev: tls.DevCerts
) -> None:
    reader_writer = asyncio.open_connection(
        "127.0.0.1",
        gateway_server.port,
        ssl=tls.client_context(dev.ca_pem),
        server_hostname="mail.example.org",
    )
    with pytest.raises(ssl.SSLCertVerificationError, match="match"):
        await asyncio.wait_for(reader_writer, 10)


def test_client_context_settings_and_missing_ca_file(tmp_path: Path) -> None:
    ctx = tls.client_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    with pytest.raises(ConfigError, match=r"CA file .* does not exist"):
        tls.client_context(tmp_path / "missing.pem")


# --- development certificates --------------------------------------------------------------


def test_make_dev_certs_writes_a_working_chain(dev: tls.DevCerts) -> None:
    for key in (dev.ca_key, dev.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    chain = x509.load_pem_x509_certificates(dev.server_pem.read_bytes())
    ca = x509.load_pem_x509_certificate(dev.ca_pem.read_bytes())
    assert len(chain) == 2
    assert chain[1] == ca
    leaf = chain[0]
    leaf.verify_directly_issued_by(ca)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("::1") in sans.get_values_for_type(x509.IPAddress)
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert isinstance(leaf.public_key(), ec.EllipticCurvePublicKey)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    leaf_days = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days
    ca_days = (ca.not_valid_after_utc - ca.not_valid_before_utc).days
    assert leaf_days == tls.DEV_LEAF_DAYS
    assert ca_days == tls.DEV_CA_DAYS


def test_make_dev_certs_never_overwrites_unless_asked(dev: tls.DevCerts) -> None:
    before = {p: p.read_bytes() for p in (dev.ca_pem, dev.ca_key, dev.server_pem, dev.server_key)}
    with pytest.raises(ConfigError, match="already exists"):
        tls.make_dev_certs(dev.ca_pem.parent)
    assert {p: p.read_bytes() for p in before} == before
    tls.make_dev_certs(dev.ca_pem.parent, overwrite=True)
    assert all(p.read_bytes() != data for p, data in before.items())
    assert stat.S_IMODE(dev.server_key.stat().st_mode) == 0o600


def test_make_dev_certs_reuses_an_existing_ca(dev: tls.DevCerts) -> None:
    ca_before = dev.ca_pem.read_bytes()
    dev.server_pem.unlink()
    dev.server_key.unlink()
    tls.make_dev_certs(dev.ca_pem.parent)
    assert dev.ca_pem.read_bytes() == ca_before  # clients that trust it keep working
    tls.server_context(dev.server_pem, dev.server_key)


def test_make_dev_certs_rejects_bad_host_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a DNS name nor an IP address"):
        tls.make_dev_certs(tmp_path, hostnames=("bad host",))
    assert list(tmp_path.iterdir()) == []


def test_ensure_dev_certs(tmp_path: Path) -> None:
    cert, key = tmp_path / "certs" / "server.pem", tmp_path / "certs" / "server.key"
    assert tls.ensure_dev_certs(cert, key) is True
    assert (tmp_path / "certs" / "ca.pem").exists()
    assert tls.ensure_dev_certs(cert, key) is False
    tls.server_context(cert, key)
    key.unlink()
    with pytest.raises(ConfigError, match="is missing but"):
        tls.ensure_dev_certs(cert, key)
    assert not key.exists()  # nothing was made behind the operator's back
