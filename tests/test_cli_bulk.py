"""`optgate optout import` and `optgate optout export` as real processes, on a real store.

- a bad line in the middle is reported with its line number and writes nothing, the
  other lines are applied and audited as the CLI's (NDJSON and CSV, file and stdin);
- export → import onto a fresh store (other keys) gives the same records; the file is
  0600 and appears only once complete; the export is audited without addresses;
- an import is enforced at once by a gateway already serving the same store;
- a store that is down, at the start or part-way: one clean line, exit 75, the resume
  point, and nothing written after it;
- usage errors exit 2 without a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from gateway import config as config_mod
from gateway import keyfile
from gateway.audit.verify import verify_path
from gateway.core.records import CHANNELS, Record, pseudonym
from gateway.service import open_store
from gateway.store import bulk
from gateway.store.redis_store import OptOutStore
from tests.conftest import APP_PASSWORD, Running
from tests.support.processes import free_port, optgate, write_config

pytestmark = pytest.mark.slow

ADDRESSES = ["one@example.org", "+1 (555) 201-0001", "three@example.org", "four@example.org"]


def make_config(home: Path, **sections: dict[str, Any]) -> Path:
    doc: dict[str, Any] = {"gateway": {"instance": "cli-test", "data_dir": str(home / "var")}}
    doc.update(sections)
    home.mkdir(parents=True, exist_ok=True)
    return write_config(home / "optgate.toml", doc)


@contextlib.asynccontextmanager
async def opened(cfg_path: Path) -> AsyncIterator[tuple[OptOutStore, Any]]:
    """The store the CLI wrote to, reached as the CLI reaches it."""
    cfg = config_mod.load(str(cfg_path))
    ring = keyfile.load(cfg.keys.file)
    store, embedded = await open_store(cfg, ring)
    try:
        yield store, ring
    finally:
        await store.close()
        if embedded is not None:
            await embedded.release()


async def records(cfg_path: Path) -> dict[tuple[str, str], Record]:
    """Every record in the store, by (channel, address)."""
    async with opened(cfg_path) as (store, _):
        out = {}
        async for channel, _pseud, state in bulk.scan(store, CHANNELS):
            assert isinstance(state, Record)
            out[(channel, state.address)] = state
        return out


def audit_entries(cfg_path: Path) -> list[dict[str, Any]]:
    audit_dir = config_mod.load(str(cfg_path)).audit.dir
    return [
        orjson.loads(line)
        for f in sorted(audit_dir.glob("*.jsonl"))
        for line in f.read_bytes().splitlines()
        if line
    ]


def summary_of(out: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert "Traceback" not in out.stderr, out.stderr
    doc: dict[str, Any] = orjson.loads(out.stdout)
    return doc


def as_lines(fmt: str, rows: list[dict[str, Any]], bad: str) -> str:
    """`rows` in `fmt`, with the raw line `bad` after the second row."""
    if fmt == "ndjson":
        lines = [orjson.dumps(r).decode() for r in rows]
    else:
        lines = ["channel,address,categories,all,source"]
        for r in rows:
            cats = ";".join(r.get("categories", []))
            lines.append(f"{r['channel']},{r['address']},{cats},{r.get('all', False)},")
            lines[-1] += r.get("source", "")
    lines.insert(len(lines) - len(rows) + 2, bad)
    return "\n".join(lines) + "\n"


# -- optout add|remove: audited as the admin API audits the same change -------------------


def test_optout_add_and_remove_audit_what_changed(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "home")

    def cli(action: str, *scope: str) -> dict[str, Any]:
        out = optgate("optout", action, "--channel", "email", *scope, "Pat@Example.org", config=cfg)
        assert out.returncode == 0, out.stderr
        return summary_of(out)

    assert cli("add", "--category", "marketing")["categories"] == ["marketing"]
    cli("add", "--category", "marketing", "--category", "research")  # one new, one kept
    assert cli("remove", "--all")["categories"] == []
    cli("remove", "--all")  # nothing left to remove

    ring = keyfile.load(config_mod.load(str(cfg)).keys.file)
    pseud = pseudonym(ring, "email", "pat@example.org")
    changes = [e for e in audit_entries(cfg) if e["event"] in ("optout", "optin")]
    assert [(e["event"], e["categories"], e["all"]) for e in changes] == [
        ("optout", ["marketing"], False),
        ("optout", ["research"], False),  # what the write added, not what was asked
        ("optin", ["marketing", "research"], False),  # what it removed
        ("optin", [], False),  # a write that changed nothing is still on record
    ]
    for e in changes:
        assert (e["channel"], e["recipient"], e["source"], e["by"], e["via"]) == (
            "email", pseud, "cli", "cli", "cli",
        )  # fmt: skip
    # Audited before the store is written, so no change-stream id exists yet to name.
    assert all(e["change"] == "" for e in changes)
    assert optgate("audit", "verify", config=cfg).returncode == 0


# -- import: bad lines ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "bad", "detail"),
    [
        (
            "ndjson",
            '{"channel": "email", "address": "bad@example.org", "categories": ["nope"]}',
            "unknown category",
        ),
        ("ndjson", '{"channel": "email", "address": "bad@example.org", "all": tru', "JSON"),
        ("csv", "email,bad@example.org,marketing,maybe,", "all must be true or false"),
        ("csv", "email,bad@example.org,marketing", "expected 5 columns, got 3"),
    ],
)
def test_a_bad_line_is_reported_by_number_and_the_rest_applied(
    tmp_path: Path, fmt: str, bad: str, detail: str
) -> None:
    cfg = make_config(tmp_path)
    rows = [
        {"channel": "email", "address": "One@Example.org", "categories": ["marketing"]},
        {"channel": "sms", "address": "+1 (555) 201-0001", "all": True, "source": "old-crm"},
        {"channel": "email", "address": "four@example.org", "categories": ["research"]},
    ]
    data = tmp_path / f"optouts.{fmt}"  # the extension chooses the format
    data.write_text(as_lines(fmt, rows, bad))
    bad_line, total = (3, 4) if fmt == "ndjson" else (4, 5)  # a CSV's header is line 1

    out = optgate("optout", "import", str(data), config=cfg)

    assert out.returncode == 1
    result = summary_of(out)
    assert (result["applied"], result["rejected"], result["lines"]) == (3, 1, total)
    assert [e["line"] for e in result["errors"]] == [bad_line]
    assert detail in result["errors"][0]["detail"]
    assert "bad@" not in out.stdout + out.stderr  # no error quotes the input
    assert "1 line(s) rejected" in out.stderr

    got = asyncio.run(records(cfg))
    assert set(got) == {
        ("email", "One@example.org"),
        ("sms", "+15552010001"),
        ("email", "four@example.org"),
    }
    assert got[("email", "One@example.org")].categories == {"marketing"}
    assert got[("email", "One@example.org")].source == "import"
    sms = got[("sms", "+15552010001")]
    assert sms.all and sms.source == "old-crm"

    async def bad_absent() -> None:
        async with opened(cfg) as (store, ring):
            assert await store.get("email", pseudonym(ring, "email", "bad@example.org")) is None

    asyncio.run(bad_absent())

    entries = audit_entries(cfg)
    changes = [e for e in entries if e["event"] in ("optout", "optin")]
    assert sorted((e["event"], e["channel"], e["source"]) for e in changes) == [
        ("optout", "email", "import"),
        ("optout", "email", "import"),
        ("optout", "sms", "old-crm"),
    ]
    assert all(e["by"] == "cli" and e["via"] == "import" and "key_id" not in e for e in changes)
    assert all(e["change"] == "" for e in changes)  # audited before the write: no id yet
    ring = keyfile.load(config_mod.load(str(cfg)).keys.file)
    assert {e["recipient"] for e in changes} == {
        pseudonym(ring, "email", "one@example.org"),  # the key form
        pseudonym(ring, "sms", "+15552010001"),
        pseudonym(ring, "email", "four@example.org"),
    }
    [done] = [e for e in entries if e.get("action") == "optout.import"]
    assert done["event"] == "admin_access" and done["by"] == "cli"
    assert (done["applied"], done["rejected"], done["lines"]) == (3, 1, total)
    text = b"".join(p.read_bytes() for p in config_mod.load(str(cfg)).audit.dir.glob("*.jsonl"))
    assert b"example.org" not in text.lower() and b"5552010001" not in text
    assert optgate("audit", "verify", config=cfg).returncode == 0


def test_import_from_stdin_only_adds_and_a_bad_header_writes_nothing(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    first = '{"channel":"email","address":"pat@example.org","all":true}\n'
    assert optgate("optout", "import", "-", config=cfg, input=first).returncode == 0
    # CSV on stdin needs --format; a category added to a record that is `all` keeps `all`.
    csv = "channel,address,categories\nemail,pat@example.org,billing\n"
    out = optgate("optout", "import", "--format", "csv", config=cfg, input=csv)
    assert out.returncode == 0, out.stderr
    assert summary_of(out) == {
        "applied": 1, "rejected": 0, "lines": 2, "errors": [], "errors_truncated": False,
    }  # fmt: skip
    [record] = asyncio.run(records(cfg)).values()
    assert record.all and record.categories == {"billing"}

    # NDJSON read as CSV: the header is unusable, so the whole input is refused.
    other = '{"channel":"email","address":"kim@example.org","all":true}\n'
    out = optgate("optout", "import", "--format", "csv", config=cfg, input=other)
    assert out.returncode == 2 and out.stdout == ""
    assert "line 1: the CSV header must name channel and address" in out.stderr
    assert "Traceback" not in out.stderr
    assert set(asyncio.run(records(cfg))) == {("email", "pat@example.org")}


# -- export, and back ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["ndjson", "csv"])
def test_export_then_import_onto_a_fresh_store_gives_the_same_records(
    tmp_path: Path, fmt: str
) -> None:
    a = make_config(tmp_path / "a")
    lines = [
        {"channel": "email", "address": "one@example.org", "categories": ["marketing"]},
        {"channel": "email", "address": "two@example.org", "categories": ["marketing", "research"]},
        {"channel": "email", "address": "three@example.org", "all": True, "source": "crm"},
        {"channel": "sms", "address": "+15552010001", "all": True, "source": "old-crm"},
        {"channel": "sms", "address": "+15552010002", "categories": ["billing"]},
    ]
    data = "".join(orjson.dumps(x).decode() + "\n" for x in lines)
    assert optgate("optout", "import", config=a, input=data).returncode == 0
    out = optgate("optout", "add", "--channel", "email", "--all", "four@example.org", config=a)
    assert out.returncode == 0

    exported = tmp_path / f"export.{fmt}"
    exported.write_text("an older file, readable by all\n")
    exported.chmod(0o644)
    out = optgate("optout", "export", "--output", str(exported), config=a)
    assert out.returncode == 0, out.stderr
    assert "exported 6 records" in out.stderr and out.stdout == ""
    assert exported.stat().st_mode & 0o777 == 0o600  # it holds addresses
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
    body = exported.read_text()
    assert "older file" not in body and "four@example.org" in body
    if fmt == "csv":
        assert body.splitlines()[0] == "channel,address,recipient,all,categories,updated_at,source"
    stdout = optgate("optout", "export", "--format", fmt, config=a)
    assert sorted(stdout.stdout.splitlines()) == sorted(body.splitlines())

    b = make_config(tmp_path / "b")  # its own key file: other pseudonyms, same records
    out = optgate("optout", "import", str(exported), config=b)
    assert out.returncode == 0, out.stderr
    assert summary_of(out)["applied"] == 6

    def comparable(got: dict[tuple[str, str], Record]) -> set[tuple[Any, ...]]:
        return {(k, r.all, frozenset(r.categories), r.source) for k, r in got.items()}

    before, after = asyncio.run(records(a)), asyncio.run(records(b))
    assert len(before) == 6 and comparable(after) == comparable(before)

    # The export is on record, with the count and without an address.
    access = [e for e in audit_entries(a) if e["event"] == "admin_access"]
    exports = [e for e in access if e["action"].startswith("optout.export")]
    assert [(e["action"], e["by"]) for e in exports][-2:] == [
        ("optout.export", "cli"),
        ("optout.export_done", "cli"),
    ]
    assert exports[-1]["records"] == 6 and exports[-1]["unreadable"] == 0
    assert exports[-2]["channels"] == ["email", "sms"]
    assert "example.org" not in orjson.dumps(exports).decode()

    only_sms = optgate("optout", "export", "--channel", "sms", "--format", "csv", config=a)
    rows = only_sms.stdout.splitlines()
    assert len(rows) == 3 and all(r.startswith("sms,+1555201000") for r in rows[1:])


# -- with a gateway serving ----------------------------------------------------------------


async def test_an_import_is_enforced_by_a_serving_gateway(gateway: Running) -> None:
    cfg = write_config(
        gateway.tmp_path / "cli.toml",
        {"gateway": {"instance": "gw-test", "data_dir": str(gateway.cfg.gateway.data_dir)}},
    )
    code, _ = await gateway.send(["pat@example.org", "kim@example.org"], category="marketing")
    assert code == 250
    before = len(gateway.sink.messages)
    assert {r for m in gateway.sink.messages for r in m.rcpts} == {
        "pat@example.org",
        "kim@example.org",
    }
    data = gateway.tmp_path / "in.ndjson"
    data.write_text('{"channel":"email","address":"Pat@Example.org","categories":["marketing"]}\n')

    out = await asyncio.to_thread(optgate, "optout", "import", str(data), config=cfg)

    assert out.returncode == 0, out.stderr
    code, text = await gateway.send(["pat@example.org", "kim@example.org"], category="marketing")
    assert code == 250 and "1 of 2 recipients suppressed" in text
    assert [r for m in gateway.sink.messages[before:] for r in m.rcpts] == ["kim@example.org"]
    ring = gateway.gw.keyring
    suppressed = [e for e in gateway.decisions() if e["decision"] == "suppress"]
    assert [e["recipient"] for e in suppressed] == [pseudonym(ring, "email", "pat@example.org")]
    assert verify_path(gateway.cfg.audit.dir, ring).ok  # gateway and CLI streams both intact


# -- a store that is down ------------------------------------------------------------------


def test_a_store_down_at_the_start_is_one_clean_line(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, redis={"url": f"redis://127.0.0.1:{free_port()}"})
    data = tmp_path / "in.ndjson"
    data.write_text('{"channel":"email","address":"pat@example.org","all":true}\n')

    out = optgate("optout", "import", str(data), config=cfg)

    assert out.returncode == 75
    [line] = out.stderr.splitlines()
    assert line.startswith("optgate: error: opt-out store unavailable") and "line 1" in line
    result = summary_of(out)
    assert (result["applied"], result["resume_from_line"]) == (0, 1)
    assert not [e for e in audit_entries(cfg) if e["event"] == "optout"]

    target = tmp_path / "out.ndjson"
    out = optgate("optout", "export", "--output", str(target), config=cfg)
    assert out.returncode == 75 and "Traceback" not in out.stderr
    assert out.stderr.startswith("optgate: error: opt-out store unavailable")
    assert not target.exists() and not list(tmp_path.glob("*.part"))


def test_a_store_down_mid_import_reports_where_to_resume(tmp_path: Path) -> None:
    from tests.support.redis_servers import short_tempdir, start_standalone

    server = start_standalone(short_tempdir())
    try:
        cfg = make_config(
            tmp_path, redis={"url": server.url, "timeout_ms": 200}, admin={"import_batch": 100}
        )
        lines = [
            orjson.dumps({"channel": "email", "address": f"p{n}@example.org", "all": True}) + b"\n"
            for n in range(1, 1001)
        ]
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "optout", "import", "--config", str(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "OPTGATE_TEST_APP": APP_PASSWORD},
        )
        assert proc.stdin is not None
        proc.stdin.write(b"".join(lines[:300]))
        proc.stdin.flush()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # three batches durable in store and audit log
            if sum(1 for e in audit_entries(cfg) if e["event"] == "optout") == 300:
                break
            time.sleep(0.05)
        server.pause()
        try:
            stdout, stderr = proc.communicate(b"".join(lines[300:]), timeout=30)
        finally:
            server.resume()

        assert proc.returncode == 75
        [line] = stderr.decode().splitlines()
        assert "opt-out store unavailable mid-import" in line and "resume from line 301" in line
        result = orjson.loads(stdout)
        assert (result["applied"], result["resume_from_line"]) == (300, 301)
        assert sum(1 for e in audit_entries(cfg) if e["event"] == "optout") == 300

        async def present() -> list[Any]:
            async with opened(cfg) as (store, ring):
                pseuds = [pseudonym(ring, "email", f"p{n}@example.org") for n in range(1, 1001)]
                return list(await store.lookup("email", pseuds))

        got = asyncio.run(present())
        assert all(isinstance(r, Record) and r.all for r in got[:300])
        assert all(r is None for r in got[300:])  # the paused server took none of the rest

        rest = tmp_path / "rest.ndjson"
        rest.write_bytes(b"".join(lines[result["resume_from_line"] - 1 :]))
        out = optgate("optout", "import", str(rest), config=cfg)
        assert out.returncode == 0 and summary_of(out)["applied"] == 700
        assert all(isinstance(r, Record) and r.all for r in asyncio.run(present()))
    finally:
        server.stop()


# -- usage ---------------------------------------------------------------------------------


def test_help_and_usage_errors_exit_2_without_a_traceback(tmp_path: Path) -> None:
    out = optgate("optout", "--help")
    assert out.returncode == 0 and "import" in out.stdout and "export" in out.stdout
    out = optgate("optout", "import", "--help")
    assert out.returncode == 0 and "1 some lines rejected" in out.stdout.replace("\n", " ")
    out = optgate("optout", "export", "--help")
    assert out.returncode == 0 and "0600" in out.stdout
    cfg = make_config(tmp_path)
    for args, fragment in [
        (("optout", "import", "--format", "xml", "-"), "invalid choice"),
        (("optout", "import", str(tmp_path / "missing.ndjson")), "No such file"),
        (("optout", "import", str(tmp_path)), "is a directory"),
        (("optout", "export", "--channel", "fax"), "invalid choice"),
        (("optout", "export", "--output", str(tmp_path / "no" / "x.csv")), "No such file"),
        (("optout", "export", "--output", str(tmp_path)), "is a directory"),
    ]:
        out = optgate(*args, config=cfg)
        assert out.returncode == 2, (args, out.stderr)
        assert fragment in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[redis]\nurl = "http://x"\n')
    out = optgate("optout", "import", "-", config=bad, input="")
    assert out.returncode == 2 and "unsupported scheme" in out.stderr
    assert "Traceback" not in out.stderr
