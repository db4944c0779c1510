"""No bypass of the audit log by deleting its end: every stream's head is anchored in the
store (and can be copied off the host), so `optgate audit verify` catches a cut tail, a
missing newest file and a whole missing stream, not only edits between entries; and the
audit writer recovers by itself from a full disk without acknowledging what it lost.

Each case runs real gateways (two audit streams, as two workers have), sends mail through
their SMTP listeners to the TLS sink, stops them cleanly, tampers with the files or the
store, and runs `optgate audit verify` as a process: exit code and the exact line.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.audit import files
from gateway.audit.writer import AuditWriter
from gateway.service import Gateway
from gateway.store.embedded import EmbeddedRedis
from tests.conftest import GatewayFactory, Running
from tests.support.entries import Sample
from tests.support.processes import optgate, write_config

W0 = "gw-test"  # the in-process gateway's stream (the fixture's instance name)
W1 = "gw-test-w1"  # a second worker's stream
SENDS_W0 = 6  # with 4 KiB files: the first stream spans at least two files
SENDS_W1 = 2
SMALL_FILES = 4096  # the smallest audit.max_file_bytes: rotation after a few entries
ANCHORS = "og:audit:anchors:gw-test"  # the instance's anchors: field = stream, value = head
# Longer than the writer's least interval between two recovery attempts (0.1 s).
RECOVERY_WAIT_S = 0.3


@dataclass
class Log:
    """A cleanly stopped two-stream gateway's audit log, ready to be tampered with."""

    r: Running
    cfg: Path  # the config file for `optgate` processes
    dir: Path
    make_gateway: GatewayFactory
    extra: tuple[str, ...] = ()  # what `audit verify` is given besides the config
    sent: int = SENDS_W0 + SENDS_W1  # what the sink must hold

    def files(self, stream: str) -> list[Path]:
        return [p for _, _, p in files.stream_files(self.dir, stream)]

    def newest(self, stream: str = W0) -> Path:
        return self.files(stream)[-1]

    def last_seq(self, stream: str = W0) -> int:
        return int(orjson.loads(self.newest(stream).read_bytes().splitlines()[-1])["seq"])

    def verify(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return optgate("audit", "verify", *extra, config=self.cfg)

    def decisions(self) -> int:
        return sum(1 for e in self.r.audit_entries() if e["event"] == "decision")


@contextlib.asynccontextmanager
async def store(r: Running) -> AsyncIterator[aioredis.Redis]:
    """The (stopped) gateway's embedded store, started again for the test to change."""
    embedded = await EmbeddedRedis.ensure(r.cfg.gateway.data_dir)
    client = aioredis.Redis.from_url(embedded.url)
    try:
        yield client
    finally:
        await client.aclose()
        await embedded.release()


async def two_streams(make_gateway: GatewayFactory) -> Log:
    r: Running = await make_gateway(audit={"max_file_bytes": SMALL_FILES})
    second = Gateway(r.cfg, stream=W1)
    await second.start()
    try:
        r2 = Running(gw=second, pki=r.pki, sink=r.sink, tmp_path=r.tmp_path)
        for i in range(SENDS_W0):
            assert (await r.send([f"p{i}@example.org"]))[0] == 250
        for i in range(SENDS_W1):
            assert (await r2.send([f"q{i}@example.org"]))[0] == 250
    finally:
        await second.stop(grace_s=2)
        await r.gw.stop(grace_s=2)  # a clean stop: every head is anchored
    doc = {
        "gateway": {"instance": r.cfg.gateway.instance, "data_dir": str(r.cfg.gateway.data_dir)},
        "keys": {"file": str(r.cfg.keys.file)},
        "audit": {"dir": str(r.cfg.audit.dir)},
    }
    cfg = write_config(r.tmp_path / "cli.toml", doc)
    log = Log(r=r, cfg=cfg, dir=r.cfg.audit.dir, make_gateway=make_gateway)
    assert len(r.sink.messages) == SENDS_W0 + SENDS_W1
    assert log.decisions() == SENDS_W0 + SENDS_W1
    assert len(log.files(W0)) >= 2 and log.files(W1)
    return log


def cut_lines(path: Path, n: int) -> None:
    path.write_bytes(b"".join(path.read_bytes().splitlines(keepends=True)[:-n]))


# -- each attack: tamper, and say the line `audit verify` must print ------------------------


async def cut_lines_off_the_newest_file(log: Log) -> str:
    newest, m = log.newest(), log.last_seq()
    cut_lines(newest, 2)
    return f"{newest}: truncated at seq {m - 2}, anchor says {m}"


async def empty_the_newest_file_and_drop_the_checkpoint_naming_it(log: Log) -> str:
    *_, before, newest = log.files(W0)
    m = log.last_seq()
    n = int(orjson.loads(before.read_bytes().splitlines()[-1])["seq"])
    newest.write_bytes(b"")
    files.ckpt_path(before).unlink()
    return f"{newest}: truncated at seq {n}, anchor says {m}"


async def delete_the_newest_file_with_the_checkpoint_naming_it(log: Log) -> str:
    *_, before, newest = log.files(W0)
    m = log.last_seq()
    newest.unlink()
    files.ckpt_path(before).unlink()
    return f"{newest}: missing, anchor says seq {m}"


async def remove_the_last_rotation(log: Log) -> str:
    *_, before, newest = log.files(W0)
    newest.unlink()  # its predecessor's checkpoint still names it
    return f"{newest}:0: missing: named as the next file by {before.name}.ckpt"


async def truncate_the_middle_of_the_newest_line(log: Log) -> str:
    newest = log.newest()
    data = newest.read_bytes()
    lines = data.count(b"\n")
    newest.write_bytes(data[: data.rfind(b"\n", 0, len(data) - 1) + 40])
    return f"{newest}:{lines}: incomplete line"


async def delete_a_whole_worker_stream(log: Log) -> str:
    for path in log.files(W1):
        path.unlink()
        files.ckpt_path(path).unlink(missing_ok=True)
    (log.dir / f"{W1}.lock").unlink(missing_ok=True)
    return f"{W1}: missing"


async def delete_every_stream(log: Log) -> str:
    for path in log.dir.iterdir():
        path.unlink()
    return f"{W0}: missing"


async def delete_the_cli_stream_of_an_opt_out(log: Log) -> str:
    out = optgate("optout", "add", "--channel", "email", "--all", "pat@example.org", config=log.cfg)
    assert out.returncode == 0, out.stderr
    cli = f"{W0}-cli"
    assert log.files(cli)
    for path in log.files(cli):
        path.unlink()
    return f"{cli}: missing"


async def forge_the_store_anchor_to_hide_a_cut(log: Log) -> str:
    newest, m = log.newest(), log.last_seq()
    cut_lines(newest, 3)
    async with store(log.r) as client:
        line = await client.hget(ANCHORS, W0)
        forged = line.replace(f'"seq":{m},'.encode(), f'"seq":{m - 3},'.encode())
        assert forged != line
        await client.hset(ANCHORS, W0, forged)
    return f"{W0}: anchor in the store does not verify: mac mismatch"


async def copy_another_streams_anchor_over_this_one(log: Log) -> str:
    cut_lines(log.newest(), 3)
    async with store(log.r) as client:
        await client.hset(ANCHORS, W0, await client.hget(ANCHORS, W1))
    return f"{W0}: anchor in the store does not verify: belongs to another stream"


async def wipe_the_store_anchors_but_an_earlier_copy_catches_the_cut(log: Log) -> str:
    copy = log.r.tmp_path / "anchors.json"
    out = optgate("audit", "anchor", config=log.cfg)
    assert out.returncode == 0, out.stderr
    copy.write_text(out.stdout)
    newest, m = log.newest(), log.last_seq()
    cut_lines(newest, 2)
    async with store(log.r) as client:
        await client.delete(ANCHORS)
    wiped = log.verify()
    assert (wiped.returncode, wiped.stdout) == (0, "")  # nothing left in the store to say so
    log.extra = ("--anchor", str(copy))
    return f"{newest}: truncated at seq {m - 2}, anchor says {m}"


async def cut_the_tail_and_write_past_the_anchor(log: Log) -> str:
    """After a cut, a restarted writer continues the chain from the cut and seals new
    entries over the anchored seq: the anchor's mac shows the entry there is another."""
    copy = log.r.tmp_path / "anchors.json"
    copy.write_text(optgate("audit", "anchor", config=log.cfg).stdout)
    newest, m = log.newest(), log.last_seq()
    cut_lines(newest, 2)
    writer = AuditWriter(log.dir, instance="gw-test", stream=W0, keyring=log.r.gw.keyring)
    await writer.open()
    await writer.append([Sample(decision="allow", txn=f"x{i}") for i in "abc"])
    await writer.close()
    log.extra = ("--anchor", str(copy))
    line = next(
        i
        for f in [log.newest()]
        for i, raw in enumerate(f.read_bytes().splitlines(), start=1)
        if orjson.loads(raw)["seq"] == m
    )
    return f"{log.newest()}:{line}: seq {m} is not the entry its anchor names"


def where(log: Log, seq: int) -> str:
    """FILE:LINE of the entry `seq` of the first stream."""
    for path in log.files(W0):
        for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
            if orjson.loads(raw)["seq"] == seq:
                return f"{path}:{number}"
    raise AssertionError(f"no seq {seq}")


async def cut_the_tail_and_restart_the_gateway(log: Log) -> str:
    """The restarted writer finds its stored anchor past the disk: it logs the cut and
    never overwrites that anchor, so new entries past it cannot hide the cut."""
    newest, m = log.newest(), log.last_seq()
    cut_lines(newest, 2)
    r: Running = await log.make_gateway(audit={"max_file_bytes": SMALL_FILES})
    for i in range(3):
        assert (await r.send([f"again{i}@example.org"]))[0] == 250
    await r.gw.stop(grace_s=2)
    log.sent += 3
    assert log.last_seq() > m
    return f"{where(log, m)}: seq {m} is not the entry its anchor names"


async def forge_the_anchor_copy(log: Log) -> str:
    copy = log.r.tmp_path / "anchors.json"
    out = optgate("audit", "anchor", config=log.cfg)
    m = log.last_seq()
    copy.write_text(out.stdout.replace(f'"seq":{m},', f'"seq":{m - 2},'))
    cut_lines(log.newest(), 2)
    log.extra = ("--anchor", str(copy))
    return f"{copy}: anchor does not verify: mac mismatch"


ATTACKS: list[Callable[[Log], Awaitable[str]]] = [
    cut_lines_off_the_newest_file,
    empty_the_newest_file_and_drop_the_checkpoint_naming_it,
    delete_the_newest_file_with_the_checkpoint_naming_it,
    remove_the_last_rotation,
    truncate_the_middle_of_the_newest_line,
    delete_a_whole_worker_stream,
    delete_every_stream,
    delete_the_cli_stream_of_an_opt_out,
    forge_the_store_anchor_to_hide_a_cut,
    copy_another_streams_anchor_over_this_one,
    wipe_the_store_anchors_but_an_earlier_copy_catches_the_cut,
    cut_the_tail_and_write_past_the_anchor,
    cut_the_tail_and_restart_the_gateway,
    forge_the_anchor_copy,
]


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.__name__ for a in ATTACKS])
async def test_audit_deletions_are_caught_by_the_anchors(
    make_gateway: GatewayFactory, attack: Callable[[Log], Awaitable[str]]
) -> None:
    log = await two_streams(make_gateway)
    before = log.verify()
    assert before.returncode == 0, before.stdout + before.stderr
    expected = await attack(log)
    out = log.verify(*log.extra)
    assert (out.returncode, out.stdout) == (1, expected + "\n"), out.stderr
    assert len(log.r.sink.messages) == log.sent  # what was sent, and nothing more


async def test_a_tail_written_after_the_anchor_is_ahead_not_cut(
    make_gateway: GatewayFactory,
) -> None:
    log = await two_streams(make_gateway)
    copy = log.r.tmp_path / "anchors.json"
    copy.write_text(optgate("audit", "anchor", config=log.cfg).stdout)
    # Entries the writer made durable but had not anchored yet (it anchors once a second).
    writer = AuditWriter(log.dir, instance="gw-test", stream=W0, keyring=log.r.gw.keyring)
    await writer.open()
    await writer.append([Sample(decision="allow", txn="late")])
    await writer.close()
    for extra in ((), ("--anchor", str(copy))):
        out = log.verify(*extra)
        assert out.returncode == 0, out.stdout
        assert "2 streams reach their anchors" in out.stderr
    assert log.decisions() == SENDS_W0 + SENDS_W1 + 1


# -- the writer recovers from a full disk by itself ------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A real 256 KiB filesystem (tmpfs) for the audit folder."""
    mount = tmp_path / "auditfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


async def test_a_full_audit_disk_refuses_sends_and_recovers_without_restart(
    make_gateway: GatewayFactory, small_disk: Path
) -> None:
    r: Running = await make_gateway(audit={"dir": str(small_disk)})
    filler = fill(small_disk)
    codes: list[int] = []
    for i in range(40):  # the file's last page fills, then a decision cannot be written
        code, _ = await r.send([f"p{i}@example.org"], body=f"try {i} {uuid.uuid4()}")
        codes.append(code)
        if code == 451:
            break
    assert codes[-1] == 451, codes
    delivered = codes.count(250)
    assert len(r.sink.messages) == delivered  # the refused message went nowhere
    assert f"try {len(codes) - 1} ".encode() not in b"".join(m.data for m in r.sink.messages)
    assert not r.gw.audit.healthy  # type: ignore[union-attr]

    filler.unlink()  # the disk is back; no restart, no signal
    await asyncio.sleep(RECOVERY_WAIT_S)
    code, _ = await r.send(["after@example.org"], body="after the disk came back")
    assert code == 250
    assert len(r.sink.messages) == delivered + 1
    assert r.gw.audit.healthy  # type: ignore[union-attr]

    entries = r.audit_entries()
    recovered = [e for e in entries if e["event"] == "audit_recovered"]
    # One per recovery: a small entry may fit before the disk is really back.
    assert recovered and {e["error"] for e in recovered} == {"ENOSPC"}
    assert entries[-3]["event"] == "audit_recovered"  # then the decision and its outcome
    allowed = [e for e in entries if e["event"] == "decision" and e["decision"] == "allow"]
    assert len(allowed) == delivered + 1  # one per message that went out, none for the 451
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))  # no gap
    await r.gw.stop(grace_s=2)
    doc = {
        "gateway": {"instance": r.cfg.gateway.instance, "data_dir": str(r.cfg.gateway.data_dir)},
        "keys": {"file": str(r.cfg.keys.file)},
        "audit": {"dir": str(small_disk)},
    }
    out = optgate("audit", "verify", config=write_config(r.tmp_path / "cli.toml", doc))
    assert out.returncode == 0, out.stdout
    assert os.listdir(small_disk)  # the log is still on the small disk
