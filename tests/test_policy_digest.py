"""The policy digest (docs/guarantees.md, "Rules"): every decision entry names `policy`, the
digest of the rules that decided it; `optgate rules check` prints the same digest; it
depends on what the rules mean, not on how the files spell it (file names and order,
list order, whitespace, comments, case of header globs), and any rule change changes it;
a reload's audit entry names the policy before and after.

Decisions go through the real listeners (SMTP, the SMS API through the Twilio SDK and the
native route), reloads through `Gateway.reload` (what SIGHUP runs) and a real SIGHUP to
`optgate serve`; `rules check` runs as a CLI process.
"""

from __future__ import annotations

import asyncio
import copy
import email
import re
import shutil
import signal
import time
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway import rules_files
from gateway.core.addresses import EmailAddress, parse_email
from gateway.core.records import pseudonym
from tests.conftest import APP_PASSWORD, GatewayFactory, Running
from tests.support import processes
from tests.support.sms_provider import SmsGateway, sms_gateway
from tests.support.smtp_sink import Sink, TestPki

SHIPPED = Path(__file__).resolve().parent.parent / "rules"
PAT = "pat@example.org"
KIM = "kim@example.org"
NUMBER = "+15550100000"
DIGEST = re.compile(r"; policy ([0-9a-f]{32})$")

Docs = dict[str, dict[str, Any]]  # file name -> its TOML document


def shipped_docs() -> Docs:
    return {f.name: tomllib.loads(f.read_text()) for f in sorted(SHIPPED.glob("*.toml"))}


def write_docs(folder: Path, docs: Docs, *, comments: bool = False) -> Path:
    """Write `docs` as TOML files in `folder` (emptied first)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, doc in docs.items():
        lines: list[str] = ["# a comment at the top", ""] if comments else []
        for table, value in doc.items():
            items = value if isinstance(value, list) else [value]
            for item in items:
                lines.append(f"[[{table}]]" if isinstance(value, list) else f"[{table}]")
                for k, v in item.items():
                    lines.append(f"{k}   =   {processes.toml_value(v)}" if comments
                                 else f"{k} = {processes.toml_value(v)}")  # fmt: skip
                    if comments:
                        lines.append("# between keys")
                lines.append("")
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def copy_shipped(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in SHIPPED.glob("*.toml"):
        shutil.copyfile(f, folder / f.name)
    return folder


def rules_check(folder: Path) -> str:
    """The digest `optgate rules check DIR` prints (its whole line is kept as it was)."""
    out = processes.optgate("rules", "check", str(folder))
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith(f"ok: {folder}: ") and "; version " in line, line
    found = DIGEST.search(line)
    assert found, line
    return found.group(1)


def policy_of(folder: Path) -> str:
    return rules_files.load_dir(folder).policy


def pseud(r: Running, address: str) -> str:
    parsed = parse_email(address, smtputf8=True)
    assert isinstance(parsed, EmailAddress)
    return pseudonym(r.gw.keyring, "email", parsed.key_form)


# -- every decision entry names the policy -----------------------------------------------------


@pytest.fixture
async def sg(
    make_gateway: GatewayFactory, pki: TestPki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[SmsGateway]:
    """The SMS tests' gateway and stub provider, on a rules folder of its own."""
    folder = copy_shipped(tmp_path / "policy")

    async def with_rules(**overrides: Any) -> Running:
        running: Running = await make_gateway(rules={"dir": str(folder)}, **overrides)
        return running

    async with sms_gateway(with_rules, pki, monkeypatch) as gateway:
        yield gateway


async def test_every_decision_entry_in_both_channels_names_the_policy_rules_check_prints(
    sg: SmsGateway, tmp_path: Path
) -> None:
    r = sg.running
    assert r.gw.store is not None
    await r.gw.store.opt_out("email", pseud(r, PAT), all=True, source="test", now=time.time())
    await sg.opt_out(NUMBER, all=True)
    assert (await r.send([PAT, KIM], category="marketing"))[0] == 250  # suppress + allow
    assert (await r.send([KIM], category="emergency-alert"))[0] == 550  # not granted: reject
    assert (await r.send([KIM], category="no-such-category"))[0] == 550  # unknown: reject
    await sg.send("+15550100001")  # allow
    assert (await sg.rejected(NUMBER)).code == 21610  # suppress
    status, _, _ = await sg.post(
        "/v1/messages/sms", json={"to": NUMBER, "from": "+15005550006", "body": "Hi.",
                                  "category": "emergency-alert"},
        auth=("promo", APP_PASSWORD),
    )  # fmt: skip
    assert status == 403  # not granted: reject
    decisions = r.decisions()
    kinds = {(d["channel"], d["decision"]) for d in decisions}
    assert kinds == {(c, v) for c in ("email", "sms") for v in ("allow", "suppress", "reject")}
    expected = await asyncio.to_thread(rules_check, tmp_path / "policy")
    assert {d["policy"] for d in decisions} == {expected}
    (start,) = [e for e in r.audit_entries() if e["event"] == "start"]
    assert start["policy"] == expected


# -- what the digest depends on ---------------------------------------------------------------


def _respelled(docs: Docs) -> Docs:
    """The same rules spelled otherwise: one file per category under other names, tables in
    another order, every list reversed, header globs in another case."""
    out: Docs = {}
    rest: dict[str, Any] = {}
    for doc in docs.values():
        for table, value in doc.items():
            if table == "categories":
                for given in value:
                    cat = dict(given, channels=list(reversed(given.get("channels", []))))
                    out[f"{len(out):02d}-{cat['name'][::-1]}.toml"] = {"categories": [cat]}
            else:
                rest[table] = value
    twisted: dict[str, Any] = {}
    for table in reversed(list(rest)):
        value = copy.deepcopy(rest[table])
        if isinstance(value, list):
            value.reverse()
        else:
            for k, v in value.items():
                if isinstance(v, list):
                    value[k] = list(reversed(v))
        twisted[table] = value
    twisted["strip"]["headers"] = [g.swapcase() for g in twisted["strip"]["headers"]]
    out["zz-everything-else.toml"] = twisted
    return dict(reversed(list(out.items())))


async def test_digest_ignores_file_names_order_whitespace_and_comments(tmp_path: Path) -> None:
    original = tmp_path / "original"
    copy_shipped(original)
    respelled = write_docs(tmp_path / "respelled", _respelled(shipped_docs()), comments=True)
    assert rules_files.load_dir(original).version != rules_files.load_dir(respelled).version
    one, two = await asyncio.gather(
        asyncio.to_thread(rules_check, original), asyncio.to_thread(rules_check, respelled)
    )
    assert one == two == policy_of(SHIPPED)


def _set(file: str, table: str, key: str, value: Any) -> Callable[[Docs], None]:
    def change(docs: Docs) -> None:
        docs[file][table][key] = value

    return change


def _category(name: str, key: str, value: Any) -> Callable[[Docs], None]:
    def change(docs: Docs) -> None:
        (cat,) = [c for c in docs["categories.toml"]["categories"] if c["name"] == name]
        cat[key] = value

    return change


def _append(file: str, table: str, key: str | None, value: Any) -> Callable[[Docs], None]:
    def change(docs: Docs) -> None:
        target = docs[file].setdefault(table, [] if key is None else {})
        (target if key is None else target.setdefault(key, [])).append(value)

    return change


CHANGES: list[Callable[[Docs], None]] = [
    _category("billing", "opt_out", False),
    _category("marketing", "unsubscribe", False),
    _category("marketing", "channels", ["email"]),
    _category("marketing", "basis", "another basis"),
    _append("categories.toml", "categories", None,
            {"name": "newsletter", "opt_out": True, "unsubscribe": True, "channels": ["email"]}),
    _set("categories.toml", "defaults", "category", "fundraising"),
    _set("categories.toml", "defaults", "category_header", "X-Category"),
    _append("strip.toml", "strip", "headers", "X-Trace-*"),
    _set("sms.toml", "sms", "footer", "Text STOP to opt out."),
    _append("sms.toml", "keywords", "stop", "HALT"),
    _append("sms.toml", "revocations", None, {"id": "r-en-leave-me", "phrase": "leave me be"}),
]  # fmt: skip


@pytest.mark.parametrize(
    "change",
    CHANGES,
    ids=[
        "category-opt-out-flipped", "category-unsubscribe-flipped", "category-channel-dropped",
        "category-basis-changed", "category-added", "default-category-changed",
        "category-header-changed", "strip-glob-added", "sms-footer-changed",
        "stop-keyword-added", "revocation-added",
    ],
)  # fmt: skip
def test_any_rule_change_changes_the_digest(
    tmp_path: Path, change: Callable[[Docs], None]
) -> None:
    docs = shipped_docs()
    before = policy_of(write_docs(tmp_path / "before", docs))
    assert before == policy_of(SHIPPED)
    change(docs)
    after = policy_of(write_docs(tmp_path / "after", docs))
    assert re.fullmatch(r"[0-9a-f]{32}", after) and after != before


# -- a reload names the policy before and after ------------------------------------------------


async def test_reload_audits_old_and_new_policy_and_decisions_follow(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    folder = copy_shipped(tmp_path / "policy")
    r: Running = await make_gateway(rules={"dir": str(folder)})
    old = policy_of(folder)
    assert (await r.send([KIM], category="marketing"))[0] == 250
    text = (folder / "strip.toml").read_text()
    (folder / "strip.toml").write_text(text.replace('"List-*",', '"List-*",\n    "X-Trace-*",'))
    new = await asyncio.to_thread(rules_check, folder)
    assert new != old
    assert await r.gw.reload()  # what SIGHUP runs
    assert (await r.send([KIM], category="marketing"))[0] == 250
    (folder / "zz.toml").write_text("[[categories]\nbroken")
    assert not await r.gw.reload()  # refused: the new policy stays in force
    assert (await r.send([KIM], category="marketing"))[0] == 250
    reloads = [e for e in r.audit_entries() if e["event"] == "config_reload"]
    assert [(e["ok"], e["policy_before"], e["policy"]) for e in reloads] == [
        (True, old, new), (False, new, new)
    ]  # fmt: skip
    assert [d["policy"] for d in r.decisions()] == [old, new, new]


@pytest.mark.slow
async def test_sighup_to_serve_audits_old_and_new_policy(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[processes.ServeProcess]
) -> None:
    folder = copy_shipped(tmp_path / "policy")
    port = processes.free_port()
    doc = processes.with_upstream(processes.base_doc(tmp_path, pki, sink, "gw-p", port), sink, pki)
    doc["rules"] = {"dir": str(folder)}
    gw = processes.ServeProcess(
        processes.write_config(tmp_path / "gw.toml", doc), port, tmp_path / "gw.log"
    )
    served.append(gw)
    await gw.wait_ready()
    old = await asyncio.to_thread(rules_check, folder)
    assert (await processes.send(pki, port, [KIM]))[0] == 250
    text = (folder / "sms.toml").read_text()
    (folder / "sms.toml").write_text(text.replace('footer = "Reply STOP to opt out."',
                                                  'footer = "Text STOP to opt out."'))  # fmt: skip
    new = await asyncio.to_thread(rules_check, folder)
    assert new != old
    gw.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reloaded" not in gw.log.read_text() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert (await processes.send(pki, port, [KIM], message_id="<test-2@sender.example>"))[0] == 250
    gw.stop()
    entries = [
        orjson.loads(line)
        for f in (tmp_path / "var" / "audit").glob("*.jsonl")
        for line in f.read_bytes().splitlines()
    ]
    (reload,) = [e for e in entries if e["event"] == "config_reload"]
    assert (reload["ok"], reload["policy_before"], reload["policy"]) == (True, old, new)
    assert [e["policy"] for e in entries if e["event"] == "decision"] == [old, new]


# -- the strip globs the digest reads -----------------------------------------------------------


async def test_narrow_strip_glob_listed_first_does_not_drop_a_wide_one(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """`X-Patient-?` listed before `X-Patient-*`: the narrow glob's pattern matches the wide
    glob's text, which once counted as "already covered" and dropped `X-Patient-*`, so a
    patient identifier in `X-Patient-Name` reached the recipient."""
    folder = copy_shipped(tmp_path / "policy")
    (folder / "strip.toml").write_text(
        '[strip]\nheaders = ["X-Patient-?", "X-Patient-*", "X-Internal-*"]\n'
    )
    r: Running = await make_gateway(rules={"dir": str(folder)})
    code, _ = await r.send(
        [KIM], category="billing", headers={"X-Patient-Name": "Pat Example", "X-Patient-A": "1"}
    )
    assert code == 250
    (got,) = r.sink.messages
    forwarded = email.message_from_bytes(got.data)
    assert "X-Patient-Name" not in forwarded and "X-Patient-A" not in forwarded
    assert b"Pat Example" not in got.data
    (d,) = r.decisions()
    assert d["decision"] == "allow" and d["policy"] == policy_of(folder)
