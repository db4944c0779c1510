"""A newcomer's first hour: the README's SMS tour on defaults (the local SMS outbox, the twilio
SDK trusting the development CA, an opt-out by CLI, Twilio's 21610), outboxes that stay
bounded, and logs in the format `[log] format` names."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import ssl
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from twilio.base.exceptions import TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.rest import Client

from gateway import config as config_mod
from gateway import outboxes
from gateway.errors import ConfigError
from gateway.outboxes import Pruner, Retention
from gateway.service import Gateway
from tests.conftest import APP_PASSWORD, GatewayFactory, Running
from tests.support.processes import (
    ServeProcess,
    base_doc,
    free_port,
    with_upstream,
    write_config,
)
from tests.support.processes import send as smtp_send
from tests.support.smtp_sink import Sink, TestPki

README = Path(__file__).resolve().parent.parent / "README.md"
README_URL = "https://127.0.0.1:8443"  # the base URL the README's snippet uses
SID = re.compile(r"SM[0-9a-f]{32}")


def readme_sms_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block in the README's "## SMS" section, in order."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("\n## SMS\n") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def audit(data_dir: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted((data_dir / "audit").glob("*.jsonl")):
        out.extend(json.loads(line) for line in f.read_bytes().splitlines() if line)
    return out


def run_snippet(code: str, namespace: dict[str, Any]) -> str:
    """`code` as the README gives it; what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    return out.getvalue()


# --- item 1: SMS out of the box --------------------------------------------------------------


async def test_readme_sms_tour_sends_to_the_outbox_and_an_opted_out_number_gets_21610(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defaults except the ports (0: any free one), in a folder laid out as a fresh clone's.
    doc = {
        "smtp": {"listen": "127.0.0.1:0", "listen_tls": "127.0.0.1:0"},
        "http": {"listen": "127.0.0.1:0"},
    }
    toml = tmp_path / "optgate.toml"
    toml.write_text(
        '[smtp]\nlisten = "127.0.0.1:0"\nlisten_tls = "127.0.0.1:0"\n'
        '[http]\nlisten = "127.0.0.1:0"\n'
    )
    cfg = config_mod.build(doc, path=toml, base_dir=tmp_path)
    assert cfg.sms_outbox_dir == tmp_path / "var" / "sms-outbox"
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "OPTGATE_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    gw = Gateway(cfg)
    await gw.start()
    try:
        blocks = readme_sms_blocks()
        assert [lang for lang, _ in blocks] == ["python", "sh", "python"]
        (_, send), (_, shell), (_, refused) = blocks
        namespace: dict[str, Any] = {}
        code = send.replace(README_URL, f"https://127.0.0.1:{gw.ports.http}")
        printed = await asyncio.to_thread(run_snippet, code, namespace)
        sid, status = printed.split()
        assert SID.fullmatch(sid) and status == "queued"
        outbox = tmp_path / "var" / "sms-outbox"
        (kept,) = outbox.iterdir()
        assert kept.name == f"{sid}.json" and stat.S_IMODE(kept.stat().st_mode) == 0o600
        text = json.loads(kept.read_bytes())
        assert text["to"] == "+15555550100" and text["body"].startswith("See you soon.")
        (delivery,) = [e for e in audit(cfg.gateway.data_dir) if e["event"] == "delivery"]
        assert delivery["message_id"] == sid and delivery["outcome"] == "accepted"

        # The README's shell command, as written, in the same folder.
        argv = shell.split()
        assert argv[0] == "optgate"
        cli = subprocess.run(
            [sys.executable, "-m", "gateway", *argv[1:]],
            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert cli.returncode == 0, cli.stderr

        printed = await asyncio.to_thread(run_snippet, refused, namespace)
        assert printed.split() == ["400", "21610"]
        assert list(outbox.iterdir()) == [kept]  # nothing more reached the outbox
        decisions = [e for e in audit(cfg.gateway.data_dir) if e["event"] == "decision"]
        assert [d["decision"] for d in decisions] == ["allow", "suppress"]
    finally:
        await gw.stop(grace_s=2)


def sdk(running: Running, user: str = "app") -> Client:
    http = TwilioHttpClient(timeout=15)
    assert http.session is not None
    http.session.verify = str(running.pki.ca_pem)
    http.session.trust_env = False
    client = Client(user, APP_PASSWORD, http_client=http)
    client.api.base_url = f"https://127.0.0.1:{running.gw.ports.http}"
    return client


async def test_explicitly_empty_sms_url_means_no_provider_and_503(
    make_gateway: GatewayFactory,
) -> None:
    running: Running = await make_gateway(upstream={"sms": {"url": ""}})
    with pytest.raises(TwilioRestException) as caught:
        await asyncio.to_thread(
            sdk(running).messages.create, to="+15555550100", from_="+15555550199", body="hi"
        )
    assert caught.value.status == 503 and "No SMS provider" in caught.value.msg
    assert not (running.tmp_path / "var" / "sms-outbox").exists()


def test_sms_upstream_config_defaults_and_refusals(tmp_path: Path) -> None:
    cfg = config_mod.build({}, path=None, base_dir=tmp_path)
    assert cfg.upstream_sms.url == f"outbox:{tmp_path / 'var' / 'sms-outbox'}"
    assert cfg.sms_outbox_retention == Retention(keep=10_000, max_age_s=7 * 24 * 3600.0)
    assert cfg.email_outbox_retention.companions == (".eml",)
    assert cfg.log.format == "console"
    doc = {"upstream": {"sms": {"url": "outbox:texts", "outbox_keep": 5}}}
    cfg = config_mod.build(doc, path=None, base_dir=tmp_path)
    assert cfg.sms_outbox_dir == tmp_path / "texts" and cfg.sms_outbox_retention.keep == 5
    cases: list[tuple[dict[str, Any], str]] = [
        ({"upstream": {"sms": {"url": "outbox:"}}}, "outbox: needs a folder"),
        ({"upstream": {"sms": {"url": "http://sms.example"}}}, "outbox:DIR or https://"),
        ({"upstream": {"sms": {"url": "https://sms.example"}}}, "account_sid is required"),
        ({"upstream": {"email": {"outbox_keep": -1}}}, "outbox_keep must be at least 0"),
        ({"log": {"format": "jsn"}}, "did you mean 'json'"),
    ]
    for bad, says in cases:
        with pytest.raises(ConfigError) as caught:
            config_mod.build(bad, path=None, base_dir=tmp_path)
        assert says in str(caught.value.problems), caught.value.problems


# --- item 7: outboxes stay bounded -----------------------------------------------------------


@pytest.fixture
def prune_every_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outboxes, "PRUNE_EVERY_S", 0.0)


@pytest.mark.usefixtures("prune_every_write")
async def test_email_outbox_keeps_only_the_newest_outbox_keep_messages(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    box = tmp_path / "mail-outbox"
    running: Running = await make_gateway(
        upstream={"email": {"url": f"outbox:{box}", "outbox_keep": 3}}
    )
    for i in range(5):
        code, _ = await smtp_send(
            running.pki, running.gw.ports.smtp, [f"pat{i}@example.org"],
            message_id=f"<m{i}@sender.example>",
        )  # fmt: skip
        assert code == 250
        await asyncio.sleep(0.02)  # distinct modification times
    marks = sorted(box.glob("*.json"))
    assert len(marks) == 3 and len(list(box.glob("*.eml"))) == 3
    kept = {json.loads(m.read_bytes())["rcpts"][0] for m in marks}
    assert kept == {"pat2@example.org", "pat3@example.org", "pat4@example.org"}
    for mark in marks:  # each kept envelope still has its message
        assert mark.with_suffix(".eml").exists()


@pytest.mark.usefixtures("prune_every_write")
async def test_email_outbox_removes_messages_older_than_outbox_max_age_s(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    box = tmp_path / "mail-outbox"
    running: Running = await make_gateway(
        upstream={"email": {"url": f"outbox:{box}", "outbox_keep": 0}}
    )
    port = running.gw.ports.smtp
    assert (await smtp_send(running.pki, port, ["old@example.org"]))[0] == 250
    (old,) = box.glob("*.json")
    eight_days_ago = time.time() - 8 * 24 * 3600
    for path in (old, old.with_suffix(".eml")):
        os.utime(path, (eight_days_ago, eight_days_ago))
    code, _ = await smtp_send(running.pki, port, ["new@example.org"], message_id="<n@x.example>")
    assert code == 250
    (mark,) = box.glob("*.json")
    assert json.loads(mark.read_bytes())["rcpts"] == ["new@example.org"]
    assert sorted(p.suffix for p in box.iterdir()) == [".eml", ".json"]


@pytest.mark.usefixtures("prune_every_write")
async def test_sms_outbox_keeps_only_the_newest_outbox_keep_texts(
    make_gateway: GatewayFactory,
) -> None:
    running: Running = await make_gateway(upstream={"sms": {"outbox_keep": 2}})
    client = sdk(running)
    for n in range(3):
        await asyncio.to_thread(
            client.messages.create, to=f"+1555555010{n}", from_="+15555550199", body="hi"
        )
        await asyncio.sleep(0.02)
    texts = [json.loads(p.read_bytes()) for p in running.cfg.sms_outbox_dir.iterdir()]  # type: ignore[union-attr]
    assert sorted(t["to"] for t in texts) == ["+15555550101", "+15555550102"]


def test_outbox_retention_is_checked_at_most_once_per_interval(tmp_path: Path) -> None:
    def write(n: int) -> None:
        for i in range(n):
            (tmp_path / f"{time.time_ns()}-{i}.json").write_bytes(b"{}")

    pruner = Pruner(tmp_path, Retention(keep=2))
    write(5)
    assert pruner.maybe_prune() == 3
    write(5)
    assert pruner.maybe_prune() == 0  # within PRUNE_EVERY_S of the last check: no scan
    assert len(list(tmp_path.iterdir())) == 7
    (tmp_path / ".x.json.tmp").write_bytes(b"")  # a write in flight is not a message
    assert outboxes.prune(tmp_path, Retention(keep=2)) == 5
    assert len(list(tmp_path.iterdir())) == 3


# --- item 6: logs ------------------------------------------------------------------------------

CONSOLE_LINE = re.compile(r"\d{4}-\d\d-\d\dT[\d:.]+Z \[\w+ *\] event='[^']+'( \w+=\S.*)?")
TOKEN = "A" * 43  # the shape of an unsubscribe token; it must not reach the log
ADDRESS = "pat.canary@example.org"


async def _traffic(pki: TestPki, smtp_port: int, http_port: int) -> None:
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    async with aiohttp.ClientSession() as session:
        for path in (f"/u/{TOKEN}", f"/v1/optouts/email/{ADDRESS}", "/healthz"):
            async with session.get(f"https://127.0.0.1:{http_port}{path}", ssl=ctx) as resp:
                await resp.read()
    assert (await smtp_send(pki, smtp_port, [ADDRESS]))[0] == 250


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["json", "console"], ids=["json", "console"])
async def test_serve_logs_every_line_in_the_configured_format_without_paths(
    tmp_path: Path, pki: TestPki, sink: Sink, fmt: str
) -> None:
    port = free_port()
    doc = with_upstream(base_doc(tmp_path, pki, sink, "gw-log", port), sink, pki)
    doc["log"] = {"format": fmt}
    cfg = write_config(tmp_path / "gw.toml", doc)
    http_port = int(tomllib.loads(cfg.read_text())["http"]["listen"].rpartition(":")[2])
    gw = ServeProcess(cfg, port, tmp_path / "gw.log")
    try:
        await gw.wait_ready()
        await _traffic(pki, port, http_port)
    finally:
        gw.stop()
    text = gw.log.read_text()
    lines = text.splitlines()
    assert lines and TOKEN not in text and ADDRESS not in text
    if fmt == "json":
        docs = [json.loads(line) for line in lines]  # every line, or this raises
        assert all(isinstance(d["event"], str) and d["timestamp"] for d in docs)
        access = [d for d in docs if d["event"] == "http_access"]
    else:
        assert [line for line in lines if not CONSOLE_LINE.fullmatch(line)] == []
        access = [
            dict(re.findall(r"(\w+)='?([^' ]+)", line.partition("] ")[2]))
            for line in lines
            if "event='http_access'" in line
        ]
    routes = {(str(a["route"]), str(a["status"])) for a in access}
    assert ("/u/{token}", "404") in routes or ("/u/{token}", "400") in routes, routes
    assert ("/v1/optouts/{channel}/{address}", "401") in routes, routes
