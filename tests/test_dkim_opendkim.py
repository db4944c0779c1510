"""A second, independent DKIM verifier: OpenDKIM (libopendkim 2.11, Debian `opendkim`).

OpenDKIM's `opendkim-testmsg` (Debian `opendkim-tools`) verifies only against keys it looks
up in DNS; it has no option to read a public key from a file. The `opendkim` filter's test
mode (`opendkim -t FILE`) runs the same library and takes `TestPublicKeys` (a file of
"<selector>._domainkey.<domain> <TXT record>" lines), so it verifies offline; its verdict
is the `dkim=` result of the Authentication-Results field it would add (printed with -vv).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.config import DkimKey
from gateway.smtp import dkim as gdkim
from tests.conftest import GatewayFactory
from tests.test_dkim import CORPUS, KEY_TYPES, signatures, txt_record, write_key

OPENDKIM = shutil.which("opendkim") or shutil.which("opendkim", path="/usr/sbin:/usr/local/sbin")
pytestmark = pytest.mark.skipif(
    OPENDKIM is None,
    reason="OpenDKIM is not installed (Debian package `opendkim`; .ci/run installs it)",
)


def opendkim_verdicts(tmp_path: Path, data: bytes, records: dict[str, bytes]) -> list[str]:
    """OpenDKIM's result for each DKIM-Signature of `data` ("pass", "fail", ...)."""
    assert OPENDKIM is not None
    keys = tmp_path / "opendkim-keys"
    keys.write_bytes(b"".join(name.encode() + b" " + txt + b"\n" for name, txt in records.items()))
    conf = tmp_path / "opendkim.conf"
    conf.write_text(f"Mode v\nSyslog no\nTestPublicKeys {keys}\n")
    message = tmp_path / "message.eml"
    message.write_bytes(data)
    run = subprocess.run(
        [OPENDKIM, "-x", str(conf), "-t", str(message), "-vv"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    out = run.stderr.decode(errors="replace") + run.stdout.decode(errors="replace")
    field = re.search(r"hname='Authentication-Results' hvalue='([^']*)'", out)
    assert field is not None, out[-2000:]
    return re.findall(r"\bdkim=(\w+)", field.group(1))


@pytest.mark.parametrize("kind", KEY_TYPES)
@pytest.mark.parametrize("case", list(CORPUS), ids=list(CORPUS))
async def test_corpus_signature_verifies_with_opendkim(
    tmp_path: Path, case: str, kind: str
) -> None:
    key = write_key(tmp_path / "k.pem", kind)
    entry = DkimKey(domain="sender.example", selector="s1", key_file=tmp_path / "k.pem")
    data = CORPUS[case]
    signed = await gdkim.Signer(gdkim.load_keys([entry])).sign(data, "sender.example")
    records = {"s1._domainkey.sender.example": txt_record(key)}
    assert opendkim_verdicts(tmp_path, signed, records) == ["pass"]
    # A From added above the original one (From is oversigned) breaks it for OpenDKIM too.
    sigs = signed[: len(signed) - len(data)]
    injected = sigs + b"From: other@evil.example\r\n" + data
    assert opendkim_verdicts(tmp_path, injected, records) == ["fail"]


async def test_gateway_one_click_copies_verify_with_opendkim_and_share_the_body_hash(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """Five recipients of a one-click category: five copies, each with its own
    List-Unsubscribe, each signed with RSA-2048 and Ed25519 over one body hash."""
    rsa_key = write_key(tmp_path / "rsa.pem", "rsa-2048")
    ed_key = write_key(tmp_path / "ed.pem", "ed25519")
    r = await make_gateway(
        dkim=[
            {"domain": "sender.example", "selector": "r", "key_file": str(tmp_path / "rsa.pem")},
            {"domain": "sender.example", "selector": "e", "key_file": str(tmp_path / "ed.pem")},
        ]
    )
    rcpts = [f"p{i}@example.org" for i in range(5)]
    code, text = await r.send(rcpts, category="marketing", body="Gr\u00fc\u00dfe  \r\n\r\n")
    assert code == 250, text
    records = {
        "r._domainkey.sender.example": txt_record(rsa_key),
        "e._domainkey.sender.example": txt_record(ed_key),
    }
    assert len(r.sink.messages) == 5
    body_hashes, unsubscribes = set(), set()
    for m in r.sink.messages:
        assert opendkim_verdicts(tmp_path, m.data, records) == ["pass", "pass"]
        sigs = signatures(m.data)
        assert sorted(s["a"] for s in sigs) == ["ed25519-sha256", "rsa-sha256"]
        body_hashes |= {s["bh"] for s in sigs}
        unsubscribes.add(re.search(rb"List-Unsubscribe: ([^\r\n]*)", m.data).group(1))  # type: ignore[union-attr]
    assert len(body_hashes) == 1 and len(unsubscribes) == 5
    assert [d["decision"] for d in r.decisions()] == ["allow"] * 5
    deliveries = [e for e in r.audit_entries() if e["event"] == "delivery"]
    assert deliveries and all(e["outcome"] == "accepted" for e in deliveries)
