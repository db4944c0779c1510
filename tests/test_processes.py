"""Whole-process tests: `optgate serve` subprocesses, the CLI, and what lands on disk.

- read-your-writes across two gateway processes sharing one embedded store;
- the PHI canary: distinctive addresses never appear in any file of the data dir (outbox
  excluded), in any Redis key or value, or in the processes' logs;
- clean errors: a bad config names every problem, exit code 2, no traceback;
- SIGHUP: a bad rules folder keeps the old rules, a good one is applied;
- a worker SIGKILLed under load loses no message it acknowledged.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import orjson
import pytest
import redis

from tests.conftest import APP_PASSWORD
from tests.support import phi
from tests.support.processes import ServeProcess, optgate, send, serve_gateway, write_config
from tests.support.raw_smtp import RawSMTP
from tests.support.smtp_sink import Sink, TestPki

pytestmark = pytest.mark.slow


@pytest.fixture
async def two_gateways(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> AsyncIterator[list[ServeProcess]]:
    for name in ("gw-a", "gw-b"):
        await serve_gateway(tmp_path, pki, sink, served, instance=name)
    yield served


async def test_optout_via_cli_is_enforced_by_every_process(
    two_gateways: list[ServeProcess], pki: TestPki, sink: Sink
) -> None:
    a, b = two_gateways
    for gw in (a, b):
        code, _ = await send(pki, gw.port, ["pat@example.org"])
        assert code == 250
    assert len(sink.messages) == 2
    out = optgate(
        "optout",
        "add",
        "--channel",
        "email",
        "--category",
        "marketing",
        "Pat@Example.org",
        config=a.config,
    )
    assert out.returncode == 0, out.stderr
    assert orjson.loads(out.stdout)["categories"] == ["marketing"]
    for gw in (a, b):
        code, text = await send(pki, gw.port, ["pat@example.org"])
        assert code == 250 and "1 of 1 recipients suppressed" in text
    assert len(sink.messages) == 2
    got = orjson.loads(
        optgate("optout", "get", "--channel", "email", "pat@example.org", config=b.config).stdout
    )
    assert got["categories"] == ["marketing"] and got["source"] == "cli" and got["all"] is False
    out = optgate(
        "optout",
        "remove",
        "--channel",
        "email",
        "--category",
        "marketing",
        "pat@example.org",
        config=b.config,
    )
    assert out.returncode == 0
    code, text = await send(pki, b.port, ["pat@example.org"])
    assert "0 of 1" in text and len(sink.messages) == 3


CANARIES = ["Canary.Patient+7F3A@Canary-Clinic.example", "zz.canary.q9x@Canary-Clinic.example"]


def forms(address: str) -> set[bytes]:
    return phi.needles(phi.email_forms(address) | {"zz.canary.q9x", "canary-clinic"})


async def test_phi_canary_appears_nowhere(
    two_gateways: list[ServeProcess], tmp_path: Path, pki: TestPki, sink: Sink
) -> None:
    a, b = two_gateways
    out = optgate("optout", "add", "--channel", "email", "--all", CANARIES[1], config=a.config)
    assert out.returncode == 0, out.stderr
    named_id = f"<{CANARIES[0]}.1700000000@app.example>"  # an app that puts one in
    local, _, domain = CANARIES[0].partition("@")
    base_id = f"<{local.split('+')[0]}@{domain}>"  # the +tag recipient's base address alone
    for gw, mid in ((a, named_id), (b, base_id)):
        await send(pki, gw.port, CANARIES, category="marketing", message_id=mid)
        await send(pki, gw.port, CANARIES, category="emergency-alert")
    # a rejected and a deferred decision too
    sink.fail_data = (451, "4.3.0 later")
    await send(pki, a.port, CANARIES)
    sink.fail_data = None
    assert len(sink.messages) >= 3  # the test did deliver the canaries upstream
    r = redis.Redis(unix_socket_path=str(tmp_path / "var" / "redis" / "redis.sock"))
    try:
        r.config_set("appendfsync", "always")
        stored = phi.store_blobs(r)
    finally:
        r.close()
    needles = set().union(*(forms(c) for c in CANARIES))
    blobs = [*stored, *phi.files_under(tmp_path / "var", skip={"outbox"})]
    a.stop()
    b.stop()
    for gw in (a, b):
        blobs.append((str(gw.log), gw.log.read_bytes()))
    assert phi.find(needles, blobs) == []
    assert any(p.suffix == ".jsonl" for p in (tmp_path / "var" / "audit").iterdir())
    # The keyed Message-ID is still found by the id the application logged.
    out = optgate("audit", "search", "--message-id", named_id, config=a.config)
    found = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert out.returncode == 0 and found
    assert {e["event"] for e in found} == {"decision", "delivery"}
    assert all(e["message_id"].startswith("hmac-sha256:") for e in found)


def test_bad_config_names_every_problem_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[smtp]\nmax_recipients = "many"\nbogus = 1\n'
        '[redis]\nurl = "http://x"\n[[senders]]\nname = "a"\n'
    )
    out = optgate("serve", config=cfg)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    for fragment in ("max_recipients", "bogus", "unsupported scheme", "senders[0]"):
        assert fragment in out.stderr
    bad_rules = tmp_path / "rules"
    bad_rules.mkdir()
    (bad_rules / "x.toml").write_text(
        '[defaults]\ncategory = "nope"\n[[categories]]\nname = "Bad Name"\n'
    )
    out = optgate("rules", "check", str(bad_rules))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "x.toml" in out.stderr
    assert optgate("rules", "check").returncode == 0


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_reload_keeps_old_rules_on_error(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess], workers: int
) -> None:
    """SIGHUP to `serve` (the supervisor, with 2 workers) reaches every worker: each
    worker's own audit stream records the failed and then the good reload."""
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    shipped = Path(__file__).resolve().parent.parent / "rules"
    for f in shipped.glob("*.toml"):
        (rules_dir / f.name).write_bytes(f.read_bytes())
    gw, _ = await serve_gateway(
        tmp_path, pki, sink, served, workers=workers, instance="gw-r", rules={"dir": str(rules_dir)}
    )
    port = gw.port
    if workers > 1:
        await asyncio.sleep(1.0)  # every worker up before the signals
    extra = (
        '[[categories]]\nname = "newsletter"\nopt_out = true\nunsubscribe = true\n'
        'channels = ["email"]\nbasis = "test"\n'
    )
    (rules_dir / "zz.toml").write_text("[[categories]\nbroken")
    gw.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(1.0)
    code, _ = await send(pki, port, ["pat@example.org"], category="newsletter")
    assert code == 550  # old rules still in force
    code, _ = await send(pki, port, ["pat@example.org"], category="marketing")
    assert code == 250  # and still serving
    (rules_dir / "zz.toml").write_text(extra)
    gw.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(1.0)
    code, _ = await send(pki, port, ["pat@example.org"], category="newsletter")
    assert code == 250
    gw.stop()
    log = gw.log.read_text()
    assert "reload_failed" in log and "zz.toml" in log
    streams = list((tmp_path / "var" / "audit").glob("*.jsonl"))  # one stream per worker
    assert len(streams) == workers
    for f in streams:
        events = [orjson.loads(line) for line in f.read_bytes().splitlines()]
        assert [e["ok"] for e in events if e["event"] == "config_reload"] == [False, True]


def test_keys_init_audit_verify_and_hash_password(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.toml", {"gateway": {"data_dir": str(tmp_path / "var")}})
    out = optgate("keys", "init", config=cfg)
    assert out.returncode == 0, out.stderr
    key_file = tmp_path / "var" / "keys.json"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert optgate("keys", "init", config=cfg).returncode == 2  # never overwrites keys
    for addr in ("a@example.org", "b@example.org", "c@example.org"):
        assert (
            optgate("optout", "add", "--channel", "email", "--all", addr, config=cfg).returncode
            == 0
        )
    assert optgate("audit", "verify", config=cfg).returncode == 0
    [f] = list((tmp_path / "var" / "audit").glob("*.jsonl"))
    lines = f.read_bytes().splitlines(keepends=True)
    f.write_bytes(lines[0] + lines[2] + lines[1] + b"".join(lines[3:]))
    out = optgate("audit", "verify", config=cfg)
    assert out.returncode == 1 and out.stdout.startswith(f"{f}:2:")
    out = optgate("senders", "hash-password", input="s3cret\n")
    assert out.returncode == 0 and out.stdout.startswith("scrypt$")
    out = optgate(
        "optout",
        "add",
        "--channel",
        "email",
        "--category",
        "emergency-alert",
        "a@example.org",
        config=cfg,
    )
    assert out.returncode == 2 and "cannot be opted out" in out.stderr


async def serve_two_workers(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess], instance: str
) -> tuple[ServeProcess, int]:
    """`optgate serve --workers 2` relaying to `sink`, both workers listening; its port."""
    gw, _ = await serve_gateway(tmp_path, pki, sink, served, workers=2, instance=instance)
    await asyncio.sleep(1.0)  # let the second worker bind too
    return gw, gw.port


def worker_pids(gw: ServeProcess) -> list[int]:
    out = subprocess.check_output(["pgrep", "-P", str(gw.proc.pid), "-f", "worker-index"])
    return [int(p) for p in out.split()]


async def test_workers_share_ports_restart_and_stop_cleanly(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> None:
    gw, port = await serve_two_workers(tmp_path, pki, sink, served, "gw-w")
    cfg = gw.config
    for i in range(16):
        code, _ = await send(pki, port, [f"p{i}@example.org"])
        assert code == 250
    audit = tmp_path / "var" / "audit"
    streams = {f.name.rsplit("-", 3)[0] for f in audit.glob("*.jsonl")}
    assert streams == {"gw-w-w0", "gw-w-w1"}  # the kernel spread connections over both
    os.kill(worker_pids(gw)[0], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and gw.log.read_text().count("worker_started") < 3:
        await asyncio.sleep(0.2)
    await asyncio.sleep(2.0)  # the replacement worker binds after its imports
    for i in range(6):
        code, _ = await send(pki, port, [f"q{i}@example.org"])
        assert code == 250  # still served throughout
    gw.stop()
    assert gw.proc.returncode == 0
    log = gw.log.read_text()
    assert "worker_exited" in log and log.count("worker_started") >= 3
    pid_file = tmp_path / "var" / "redis" / "server.pid"
    assert not pid_file.exists()  # the embedded store was stopped with the service
    out = optgate("audit", "verify", config=cfg)
    assert out.returncode == 0, out.stdout


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigterm_lets_a_transaction_in_flight_finish(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess], workers: int
) -> None:
    """SIGTERM stops accepting, lets a transaction in flight get its 250 after the
    upstream accepted it, sends 421 4.3.2 at once to a session between transactions, and
    exits 0. (Before: every open connection was dropped without a reply.)"""
    gw, _ = await serve_gateway(tmp_path, pki, sink, served, workers=workers, instance="gw-t")
    port = gw.port
    if workers > 1:
        await asyncio.sleep(1.0)  # let the second worker bind too
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))
    idle = await RawSMTP.connect(port)
    await idle.ready(ctx, "app", APP_PASSWORD)
    sink.delay_data_s = 1.5  # the upstream holds its reply to DATA
    busy = asyncio.create_task(send(pki, port, ["pat@example.org"]))
    deadline = time.monotonic() + 10
    while not sink.messages and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert sink.messages, "the message never reached the upstream"
    gw.proc.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    code, text = await idle.reply()
    assert (code, text.split()[1]) == (421, "4.3.2")
    assert time.monotonic() - stopped < 1.0  # not held until the transaction ended
    idle.close()
    code, text = await busy
    assert code == 250, text  # answered once the upstream accepted it
    assert [m.rcpts for m in sink.messages] == [["pat@example.org"]]
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)  # no longer accepting
    assert await asyncio.to_thread(gw.proc.wait, 20) == 0
    assert time.monotonic() - stopped < 8.0  # nothing held it to the 10 s grace period
    entries = [
        orjson.loads(line)
        for f in (tmp_path / "var" / "audit").glob("*.jsonl")
        for line in f.read_bytes().splitlines()
    ]
    outcomes = [(e["event"], e.get("decision") or e.get("outcome")) for e in entries
                if e.get("txn") and e["event"] in ("decision", "delivery")]  # fmt: skip
    assert outcomes == [("decision", "allow"), ("delivery", "accepted")]


async def test_a_client_that_connects_and_leaves_frees_its_slot_at_once(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> None:
    """Under serve's loop, a TCP health check (connect, close, nothing said) left a
    half-open connection holding a per-client slot and a descriptor until the idle timeout
    (aiosmtpd keeps the connection on EOF; its session task was cancelled before it ran)."""
    gw, _ = await serve_gateway(  # its readiness wait is itself such a probe
        tmp_path, pki, sink, served, instance="gw-p", smtp={"max_connections_per_client": 2}
    )
    port = gw.port
    for _ in range(5):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.3)
    for _ in range(3):  # more than the limit, one after the other, each served
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220 ")
        finally:
            writer.close()
            await writer.wait_closed()
        await asyncio.sleep(0.1)


async def test_keys_rotate_and_sighup_keep_records_and_chain(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> None:
    gw, _ = await serve_gateway(tmp_path, pki, sink, served, instance="gw-k")
    port, cfg = gw.port, gw.config
    assert (
        optgate(
            "optout", "add", "--channel", "email", "--all", "old@example.org", config=cfg
        ).returncode
        == 0
    )
    out = optgate("keys", "rotate", config=cfg)
    assert out.returncode == 0 and "audit=a2" in out.stdout
    gw.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(1.0)
    code, text = await send(pki, port, ["old@example.org"])
    assert code == 250 and "1 of 1" in text  # a record sealed under r1 still decrypts
    assert (
        optgate(
            "optout", "add", "--channel", "email", "--all", "new@example.org", config=cfg
        ).returncode
        == 0
    )
    code, text = await send(pki, port, ["new@example.org"])
    assert "1 of 1" in text  # and one sealed under r2 too
    gw.stop()
    entries = [
        orjson.loads(line)
        for f in sorted((tmp_path / "var" / "audit").glob("gw-k-2*.jsonl"))
        for line in f.read_bytes().splitlines()
    ]
    assert entries[0]["kid"] == "a1" and entries[-1]["kid"] == "a2"
    assert optgate("audit", "verify", config=cfg).returncode == 0


async def test_idle_timeout_closes_every_kind_of_connection_under_serve(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> None:
    """`serve` runs on uvloop, whose transports are not asyncio's classes: the idle limit
    must still answer 421 and close, before STARTTLS, after it, and on implicit TLS."""
    proc, doc = await serve_gateway(
        tmp_path, pki, sink, served, instance="gw-idle", smtp={"idle_timeout_s": 1}
    )
    port = proc.port
    tls_port = int(doc["smtp"]["listen_tls"].rsplit(":", 1)[1])
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))

    async def idle_until_closed(reader: asyncio.StreamReader) -> bytes:
        async with asyncio.timeout(10):
            return await reader.read()  # everything until the server closes

    # plaintext, before STARTTLS
    r, w = await asyncio.open_connection("127.0.0.1", port)
    assert (await r.readline()).startswith(b"220")
    assert b"421 4.4.2" in await idle_until_closed(r)
    w.close()

    # after STARTTLS (the TLS layer is the loop's own, see smtp.server)
    r, w = await asyncio.open_connection("127.0.0.1", port)
    await r.readline()
    w.write(b"EHLO client.example\r\n")
    while not (await r.readline()).startswith(b"250 "):
        pass
    w.write(b"STARTTLS\r\n")
    assert (await r.readline()).startswith(b"220")
    await w.start_tls(ctx, server_hostname="127.0.0.1")
    w.write(b"EHLO client.example\r\n")
    lines = [await r.readline()]
    while not lines[-1].startswith(b"250 "):
        lines.append(await r.readline())
    assert any(b"AUTH" in line for line in lines)  # the session really is over TLS now
    assert b"421 4.4.2" in await idle_until_closed(r)
    w.close()

    # implicit TLS
    r, w = await asyncio.open_connection(
        "127.0.0.1", tls_port, ssl=ctx, server_hostname="127.0.0.1"
    )
    assert (await r.readline()).startswith(b"220")
    assert b"421 4.4.2" in await idle_until_closed(r)
    w.close()


async def test_plaintext_pipelined_after_starttls_is_discarded_under_serve(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> None:
    """The same guard as tests/test_smtp_e2e.py's, on serve's loop (uvloop's TLS layer)."""
    proc, _ = await serve_gateway(tmp_path, pki, sink, served, instance="gw-inject")
    port = proc.port
    ctx = ssl.create_default_context(cafile=str(pki.ca_pem))

    async def reply(r: asyncio.StreamReader) -> bytes:
        lines = [await r.readline()]
        while lines[-1][3:4] == b"-":
            lines.append(await r.readline())
        return lines[-1]

    r, w = await asyncio.open_connection("127.0.0.1", port)
    await reply(r)
    w.write(b"EHLO client.example\r\n")
    await reply(r)
    w.write(b"STARTTLS\r\nRSET\r\nMAIL FROM:<evil@z.example>\r\n")
    assert (await reply(r)).startswith(b"220")
    await w.start_tls(ctx, server_hostname="127.0.0.1")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await r.readline()  # no reply to the injected commands ever arrives
    w.write(b"EHLO client.example\r\n")
    assert (await reply(r)).startswith(b"250 ")
    w.write(b"RCPT TO:<a@b.example>\r\n")
    assert (await reply(r)).startswith(b"503")  # the injected MAIL was never run
    w.close()


async def test_a_record_under_a_rotated_key_is_read_without_sighup(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> None:
    """`keys rotate`, then an opt-out written under the new record key by the CLI: a
    gateway that was not signalled re-reads the key file and enforces it (it used to
    fail closed, 451, on that recipient until SIGHUP)."""
    gw, _ = await serve_gateway(tmp_path, pki, sink, served, instance="gw-r")
    port, cfg = gw.port, gw.config
    code, _ = await send(pki, port, ["first@example.org"])  # the gateway is in use
    assert code == 250
    assert optgate("keys", "rotate", config=cfg).returncode == 0
    add = ["optout", "add", "--channel", "email", "--all", "rotated@example.org"]
    assert optgate(*add, config=cfg).returncode == 0
    code, text = await send(pki, port, ["rotated@example.org", "other@example.org"])
    assert code == 250 and "1 of 2" in text, text
    assert sink.messages[-1].rcpts == ["other@example.org"]
    gw.stop()
    entries = [
        orjson.loads(line)
        for f in sorted((tmp_path / "var" / "audit").glob("gw-r-2*.jsonl"))
        for line in f.read_bytes().splitlines()
    ]
    reloads = [e for e in entries if e["event"] == "config_reload"]
    assert (
        len(reloads) == 1 and reloads[0]["ok"] and "a record under a new key" in reloads[0]["why"]
    )
    assert optgate("audit", "verify", config=cfg).returncode == 0


async def test_a_worker_killed_under_load_loses_no_acknowledged_message(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> None:
    """docs/guarantees.md §2.2 under worker crashes (no message lost): four clients send messages
    with unique Message-IDs, a connection each, while one of two workers is SIGKILLed.
    Every message answered 250 is at the upstream; the ones the kill cut off got no 250
    (an error or a dropped connection: the sender still has them). The service goes on."""
    gw, port = await serve_two_workers(tmp_path, pki, sink, served, "gw-k")
    acked: list[tuple[float, str]] = []
    cut_off: list[str] = []
    stop = asyncio.Event()

    async def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            mid = f"<load-{n}-{i}@sender.example>"
            i += 1
            try:
                code, _ = await send(pki, port, [f"r{n}@example.org"], message_id=mid)
            except (OSError, aiosmtplib.SMTPException):
                code = 0
            if code == 250:
                acked.append((time.monotonic(), mid))
            else:
                cut_off.append(mid)
                await asyncio.sleep(0.05)

    clients = [asyncio.create_task(client(n)) for n in range(4)]
    await asyncio.sleep(1.5)
    os.kill(worker_pids(gw)[0], signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.sleep(3.0)  # the other worker serves on; the victim is replaced
    stop.set()
    await asyncio.wait_for(asyncio.gather(*clients), 30)

    delivered = {
        m.group(0).decode()
        for msg in sink.messages
        if (m := re.search(rb"<load-\d+-\d+@sender\.example>", msg.data)) is not None
    }
    assert {mid for _, mid in acked} <= delivered  # nothing acknowledged was lost
    assert any(t < killed_at for t, _ in acked) and any(t > killed_at + 1 for t, _ in acked)
    assert gw.log.read_text().count("worker_started") >= 3  # the victim was replaced
