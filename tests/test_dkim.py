"""DKIM signing: dkimpy verifies what the gateway signs (DNS stubbed), h= covers the list
headers, any change breaks it, and signing runs in a process that survives being killed."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.config import DkimKey
from gateway.errors import ConfigError
from gateway.smtp import dkim as gdkim
from tests.conftest import GatewayFactory

PEM = serialization.Encoding.PEM
NO_PASSWORD = serialization.NoEncryption()
MESSAGE = (
    b"From: Clinic <app@sender.example>\r\n"
    b"To: pat@example.org\r\n"
    b"Subject: Flu shots are here\r\n"
    b"Date: Mon, 02 Mar 2026 09:00:00 +0000\r\n"
    b"Message-ID: <m1@sender.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"List-Unsubscribe: <https://gw.example/u/abc>,\r\n"
    b" <mailto:unsubscribe@u.example?subject=abc>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"\r\n"
    b"Book your flu shot today.\r\n"
)


def write_rsa(path: Path, bits: int = 2048, fmt: str = "pkcs8") -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pf = serialization.PrivateFormat
    form = pf.PKCS8 if fmt == "pkcs8" else pf.TraditionalOpenSSL
    path.write_bytes(key.private_bytes(PEM, form, NO_PASSWORD))
    return key


def write_ed25519(path: Path) -> ed25519.Ed25519PrivateKey:
    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, NO_PASSWORD))
    return key


def txt_record(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    """What an operator publishes, computed here independently of the code under test."""
    pub = serialization.PublicFormat
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER, pub.SubjectPublicKeyInfo)
        return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, pub.Raw)
    return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)


def dns_stub(records: dict[str, bytes]) -> Callable[..., bytes | None]:
    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return records.get(name.decode().rstrip(".").lower())

    return dnsfunc


def signatures(data: bytes) -> list[dict[str, str]]:
    """The tags of each DKIM-Signature field, unfolded."""
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    fields = re.findall(
        r"^DKIM-Signature:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.MULTILINE | re.IGNORECASE
    )
    out = []
    for f in fields:
        value = re.sub(r"\s+", "", f)
        out.append(dict(t.split("=", 1) for t in value.split(";") if t))
    return out


def verify_all(data: bytes, dnsfunc: Callable[..., bytes | None]) -> list[bool]:
    """dkimpy's verdict on each signature (a body hash mismatch raises: that is a False)."""
    results = []
    for i in range(len(signatures(data))):
        try:
            results.append(bool(dkim.DKIM(data).verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:
            results.append(False)
    return results


@pytest.fixture
def rsa_key(tmp_path: Path) -> tuple[DkimKey, rsa.RSAPrivateKey]:
    key = write_rsa(tmp_path / "rsa.pem")
    return DkimKey(domain="Sender.Example", selector="s1", key_file=tmp_path / "rsa.pem"), key


@pytest.mark.parametrize("mode", ["inline", "thread", "process"])
async def test_rsa_signature_verifies_and_covers_both_list_headers(
    rsa_key: tuple[DkimKey, rsa.RSAPrivateKey], mode: gdkim.Mode
) -> None:
    entry, key = rsa_key
    signer = gdkim.Signer(gdkim.load_keys([entry]), mode=mode)
    await signer.start()
    try:
        signed = await signer.sign(MESSAGE, "sender.example")
    finally:
        await signer.close()
    assert signed.endswith(MESSAGE)
    (sig,) = signatures(signed)
    assert (sig["d"], sig["s"], sig["a"], sig["c"]) == (
        "sender.example",
        "s1",
        "rsa-sha256",
        "relaxed/relaxed",
    )
    h = sig["h"].lower().split(":")
    for name in ("from", "to", "subject", "date", "message-id"):
        assert name in h
    # RFC 8058 §4: both list headers in h=, and oversigned so no second one can be added.
    assert h.count("list-unsubscribe") == 2 and h.count("list-unsubscribe-post") == 2
    dns = dns_stub({"s1._domainkey.sender.example": txt_record(key)})
    assert verify_all(signed, dns) == [True]


async def test_any_change_to_a_signed_header_fails_verification(
    rsa_key: tuple[DkimKey, rsa.RSAPrivateKey],
) -> None:
    entry, key = rsa_key
    signer = gdkim.Signer(gdkim.load_keys([entry]), mode="inline")
    signed = await signer.sign(MESSAGE, "sender.example")
    dns = dns_stub({"s1._domainkey.sender.example": txt_record(key)})
    tampered = [
        signed.replace(b"Subject: Flu shots are here", b"Subject: Flu shots are free"),
        signed.replace(b"u/abc>", b"u/xyz>"),
        signed.replace(b"One-Click", b"One-Clicks"),
        signed.replace(b"\r\n\r\n", b"\r\nList-Unsubscribe: <https://evil.example/u/1>\r\n\r\n"),
        signed.replace(
            b"\r\n\r\n", b"\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n\r\n"
        ),
        signed.replace(b"Book your", b"Buy your"),
    ]
    for data in tampered:
        assert data != signed
        assert verify_all(data, dns) == [False]


async def test_ed25519_and_rsa_both_sign_the_same_domain(tmp_path: Path) -> None:
    rsa_k = write_rsa(tmp_path / "rsa.pem", fmt="pkcs1")
    ed_k = write_ed25519(tmp_path / "ed.pem")
    keys = gdkim.load_keys(
        [
            DkimKey(domain="sender.example", selector="r", key_file=tmp_path / "rsa.pem"),
            DkimKey(domain="sender.example", selector="e", key_file=tmp_path / "ed.pem"),
            DkimKey(domain="other.example", selector="o", key_file=tmp_path / "ed.pem"),
        ]
    )
    signer = gdkim.Signer(keys, mode="inline")
    signed = await signer.sign(MESSAGE, "sender.example")
    assert sorted(s["a"] for s in signatures(signed)) == ["ed25519-sha256", "rsa-sha256"]
    dns = dns_stub(
        {
            "r._domainkey.sender.example": txt_record(rsa_k),
            "e._domainkey.sender.example": txt_record(ed_k),
        }
    )
    assert verify_all(signed, dns) == [True, True]
    assert keys[1].dns_txt.encode() == txt_record(ed_k)


async def test_no_matching_key_leaves_the_message_unchanged(
    rsa_key: tuple[DkimKey, rsa.RSAPrivateKey],
) -> None:
    signer = gdkim.Signer(gdkim.load_keys([rsa_key[0]]), mode="inline")
    assert await signer.sign(MESSAGE, "elsewhere.example") == MESSAGE
    assert await signer.sign(MESSAGE, None) == MESSAGE


def test_from_domain() -> None:
    assert gdkim.from_domain(["Clinic <App@Sender.Example>"]) == "sender.example"
    assert gdkim.from_domain(["app@bücher.example"]) == "xn--bcher-kva.example"
    assert gdkim.from_domain(["a@x.example, b@y.example"]) is None
    assert gdkim.from_domain(["a@x.example", "b@x.example"]) is None
    assert gdkim.from_domain([]) is None
    assert gdkim.from_domain(["no address here"]) is None
    # Forms a reader may take apart differently are never signed (email.utils.getaddresses
    # read each of these as one mailbox at sender.example).
    assert gdkim.from_domain(["<@relay.example:app@sender.example>"]) is None
    assert gdkim.from_domain(['"a@evil.example"@sender.example']) is None
    assert gdkim.from_domain(["app@sender.example (x)"]) is None
    assert gdkim.from_domain(["app%evil.example@sender.example"]) is None


def test_bad_keys_stop_the_start_with_every_problem_named(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_bytes(
        b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"
    )
    ec_key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pem").write_bytes(
        ec_key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, NO_PASSWORD)
    )
    entries = [
        DkimKey(domain="a.example", selector="s", key_file=tmp_path / "missing.pem"),
        DkimKey(domain="b.example", selector="s", key_file=tmp_path / "junk.pem"),
        DkimKey(domain="c.example", selector="s", key_file=tmp_path / "ec.pem"),
    ]
    with pytest.raises(ConfigError) as info:
        gdkim.load_keys(entries)
    text = str(info.value)
    assert "a.example/s: cannot read" in text
    assert "b.example/s" in text and "not an unencrypted PEM key" in text
    assert "c.example/s: only RSA and Ed25519" in text


async def test_signing_process_killed_is_replaced(
    rsa_key: tuple[DkimKey, rsa.RSAPrivateKey],
) -> None:
    entry, key = rsa_key
    signer = gdkim.Signer(gdkim.load_keys([entry]), mode="process")
    await signer.start()
    try:
        pool = signer._executor
        procs = list(getattr(pool, "_processes", {}).values())
        assert len(procs) == gdkim.SIGNING_PROCESSES
        os.kill(procs[0].pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        signed = await signer.sign(MESSAGE, "sender.example")
        dns = dns_stub({"s1._domainkey.sender.example": txt_record(key)})
        assert verify_all(signed, dns) == [True]
    finally:
        await signer.close()


async def test_gateway_signs_each_copy_after_adding_its_headers(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    key = write_rsa(tmp_path / "dkim.pem")
    r = await make_gateway(
        dkim=[
            {"domain": "sender.example", "selector": "s1", "key_file": str(tmp_path / "dkim.pem")}
        ]
    )
    code, text = await r.send(["a@example.org", "b@example.org"], category="marketing")
    assert code == 250, text
    dns = dns_stub({"s1._domainkey.sender.example": txt_record(key)})
    assert len(r.sink.messages) == 2
    for m in r.sink.messages:
        assert m.data.startswith(b"DKIM-Signature:")
        assert verify_all(m.data, dns) == [True]
        (sig,) = signatures(m.data)
        h = sig["h"].lower().split(":")
        assert "list-unsubscribe" in h and "list-unsubscribe-post" in h
        assert b"X-Optgate-Category" not in m.data
    # A category without one-click is signed too, and nobody can add a List-Unsubscribe to it.
    code, _ = await r.send(["a@example.org"], category="appointment-reminder")
    assert code == 250
    last = r.sink.messages[-1].data
    assert b"List-Unsubscribe" not in last
    assert verify_all(last, dns) == [True]
    injected = last.replace(
        b"\r\n\r\n", b"\r\nList-Unsubscribe: <https://evil.example/>\r\n\r\n", 1
    )
    assert verify_all(injected, dns) == [False]


async def test_mail_from_another_domain_is_sent_unsigned(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    write_ed25519(tmp_path / "ed.pem")
    r = await make_gateway(
        dkim=[
            {"domain": "elsewhere.example", "selector": "e", "key_file": str(tmp_path / "ed.pem")}
        ]
    )
    code, _ = await r.send(["a@example.org"], category="billing")
    assert code == 250
    assert b"DKIM-Signature" not in r.sink.messages[0].data


async def test_gateway_refuses_to_start_with_a_bad_key(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="dkim"):
        await make_gateway(
            dkim=[
                {"domain": "sender.example", "selector": "s", "key_file": str(tmp_path / "bad.pem")}
            ]
        )


async def test_dkim_signs_only_for_a_from_domain_its_sender_may_use(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """A sender bound to sender.example cannot get other.example's signature on its mail
    (553, nothing sent); an unbound sender may use any configured domain."""
    keys = {d: write_ed25519(tmp_path / f"{d}.pem") for d in ("sender.example", "other.example")}
    r = await make_gateway(
        dkim=[
            {"domain": d, "selector": "s1", "key_file": str(tmp_path / f"{d}.pem")} for d in keys
        ],
        senders=[
            {"name": "app", "password_env": "OPTGATE_TEST_APP"},
            {
                "name": "bound",
                "password_env": "OPTGATE_TEST_APP",
                "from_domains": ["sender.example"],
            },
        ],
    )
    dns = dns_stub({f"s1._domainkey.{d}": txt_record(k) for d, k in keys.items()})

    async def send(user: str, domain: str) -> tuple[int, str]:
        data = MESSAGE.replace(b"@sender.example>\r\nTo", f"@{domain}>\r\nTo".encode(), 1)
        smtp = await r.client(user=user)
        try:
            await smtp.mail("app@sender.example")
            await smtp.rcpt("a@example.org")
            return await smtp.data(data)
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        finally:
            smtp.close()

    assert await send("bound", "other.example") == (
        553,
        "5.7.1 From domain not permitted for this sender",
    )
    assert r.sink.messages == []
    assert (await send("bound", "sender.example"))[0] == 250
    [sig] = signatures(r.sink.messages[-1].data)
    assert sig["d"] == "sender.example" and verify_all(r.sink.messages[-1].data, dns) == [True]
    assert (await send("app", "other.example"))[0] == 250
    [sig] = signatures(r.sink.messages[-1].data)
    assert sig["d"] == "other.example" and verify_all(r.sink.messages[-1].data, dns) == [True]
    rejects = [e for e in r.audit_entries() if e.get("decision") == "reject"]
    assert [(e["sender"], e["rule"]) for e in rejects] == [("bound", "sender.from_domains")]
