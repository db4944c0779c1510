"""The command line as a newcomer types it: ``--config`` before or after the command, the
channel inferred from the address, ISO 8601 times and ``since`` as a time or an age (CLI
and admin API), tables and progress bars on a terminal only (what scripts read is the same
bytes when stdout is not one), and errors that name the bad value and the nearest valid
one without ever echoing an address or a number. Every case runs `optgate` as a
subprocess; the terminal cases under a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import Running
from tests.support.processes import optgate, write_config
from tests.test_admin import Api

PTY_TIMEOUT_S = 60
WIDE = {"COLUMNS": "200", "LINES": "50", "TERM": "xterm"}  # a table wide enough not to wrap


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    doc = {
        "gateway": {"instance": "forms", "data_dir": str(tmp_path / "var")},
        "sms": {"default_region": "US"},
    }
    return write_config(tmp_path / "optgate.toml", doc)


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return optgate(*args)


def on_terminal(*args: str, stdout_tty: bool = True, stdin: bytes = b"") -> tuple[int, str, str]:
    """`optgate ARGS` with stderr (and stdout, unless `stdout_tty` is False) on a
    pseudo-terminal: (exit code, what the terminal showed, what the stdout pipe got)."""
    master, slave = pty.openpty()
    env = {**os.environ, **WIDE}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", *args],
        stdin=subprocess.PIPE,
        stdout=slave if stdout_tty else subprocess.PIPE,
        stderr=slave,
        env=env,
    )
    os.close(slave)
    assert proc.stdin is not None
    proc.stdin.write(stdin)
    proc.stdin.close()
    piped: list[bytes] = []
    out = proc.stdout
    reader = threading.Thread(target=lambda: piped.append(out.read() if out else b""))
    reader.start()  # a pipe that fills must not stall the command while the terminal is read
    shown = bytearray()
    deadline = time.monotonic() + PTY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    code = proc.wait(PTY_TIMEOUT_S)
    reader.join(PTY_TIMEOUT_S)
    return code, shown.decode(errors="replace"), b"".join(piped).decode()


def audit_entries(tmp_path: Path) -> list[dict[str, object]]:
    lines = b"".join(p.read_bytes() for p in (tmp_path / "var" / "audit").glob("*.jsonl"))
    return [orjson.loads(line) for line in lines.splitlines() if line]


# -- --config anywhere ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    ["before_the_command", "after_the_command"],
)
def test_config_is_accepted_before_and_after_the_command(
    tmp_path: Path, cfg: Path, where: str
) -> None:
    def form(*cmd: str) -> list[str]:
        return ["--config", str(cfg), *cmd] if where == "before_the_command" else [
            *cmd, "--config", str(cfg)]  # fmt: skip

    added = run(*form("optout", "add", "--category", "marketing", "pat@example.org"))
    assert added.returncode == 0, added.stderr
    got = run(*form("optout", "get", "pat@example.org"))
    assert orjson.loads(got.stdout)["categories"] == ["marketing"]
    checked = run(*form("rules", "check"))
    assert checked.returncode == 0 and checked.stdout.startswith("ok: "), checked.stderr
    listed = run(*form("keys", "api-key", "list"))
    assert listed.returncode == 0, listed.stderr
    # Both given: the one after the command wins.
    other = tmp_path / "missing.toml"
    both = run("--config", str(other), "optout", "get", "--config", str(cfg), "pat@example.org")
    assert both.returncode == 0, both.stderr


# -- the channel from the address's form ---------------------------------------------------


@pytest.mark.parametrize(
    ("address", "channel", "canonical_key"),
    [("Pat@Example.org", "email", "pat@example.org"), ("+1 (555) 201-0173", "sms", None)],
    ids=["email_address_needs_no_channel", "phone_number_needs_no_channel"],
)
def test_optout_add_infers_the_channel_from_the_address(
    tmp_path: Path, cfg: Path, address: str, channel: str, canonical_key: str | None
) -> None:
    added = run("optout", "add", "--category", "marketing", address, "--config", str(cfg))
    assert added.returncode == 0, added.stderr
    assert orjson.loads(added.stdout)["channel"] == channel
    # The SPEC form, with --channel, reads the same record.
    got = run("optout", "get", "--channel", channel, address, "--config", str(cfg))
    assert orjson.loads(got.stdout)["categories"] == ["marketing"]
    (entry,) = [e for e in audit_entries(tmp_path) if e["event"] == "optout"]
    assert entry["channel"] == channel and entry["by"] == "cli"
    removed = run("optout", "remove", "--category", "marketing", address, "--config", str(cfg))
    assert orjson.loads(removed.stdout)["categories"] == []


def test_an_address_of_no_known_form_is_refused_without_echoing_it(
    tmp_path: Path, cfg: Path
) -> None:
    got = run("optout", "add", "--all", "pat.example.org", "--config", str(cfg))
    assert got.returncode == 2
    assert "--channel" in got.stderr and "pat.example" not in got.stderr
    assert not [e for e in audit_entries(tmp_path) if e["event"] == "optout"]


# -- ISO 8601 and since ------------------------------------------------------------------


def test_api_key_list_prints_iso_8601_times(cfg: Path) -> None:
    made = run("keys", "api-key", "create", "--role", "auditor", "--config", str(cfg))
    assert made.returncode == 0 and made.stdout.count("\n") == 1  # the key alone
    (row,) = [orjson.loads(line) for line in run(
        "keys", "api-key", "list", "--config", str(cfg)).stdout.splitlines()]  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["created"]), row
    assert set(row) == {"id", "role", "label", "created"}


@pytest.mark.parametrize(
    ("since", "found"),
    [("24h", True), ("30m", True), ("2000-01-01T00:00:00Z", True), ("2999-01-01", False)],
    ids=["age_in_hours", "age_in_minutes", "iso_time", "iso_time_in_the_future"],
)
def test_audit_search_since_takes_an_age_or_an_iso_time(
    cfg: Path, since: str, found: bool
) -> None:
    assert run("optout", "add", "--all", "pat@example.org", "--config", str(cfg)).returncode == 0
    got = run("audit", "search", "--event", "optout", "--since", since, "--config", str(cfg))
    assert got.returncode == 0, got.stderr
    assert bool(got.stdout.strip()) is found


def test_a_bad_since_names_both_forms(cfg: Path) -> None:
    assert run("keys", "init", "--config", str(cfg)).returncode == 0
    got = run("audit", "search", "--since", "yesterday", "--config", str(cfg))
    assert got.returncode == 2 and "ISO 8601" in got.stderr and "24h" in got.stderr


@pytest.fixture
async def api(gateway: Running) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        client = Api(gateway, session)
        await client.make_keys()
        yield client


async def test_admin_audit_search_since_takes_an_age_as_the_cli_does(api: Api) -> None:
    await api.call("PUT", "/v1/optouts/email/pat@example.org", role="preferences",
                   json={"all": True})  # fmt: skip
    status, page, _ = await api.call("GET", "/v1/audit?event=optout&since=24h", role="auditor")
    assert status == 200 and page["count"] == 1, page
    searches = [e for e in api.running.audit_entries() if e.get("action") == "audit.search"]
    since = datetime.fromisoformat(searches[-1]["filters"]["since"])  # on record, resolved
    age_h = (datetime.now(UTC) - since).total_seconds() / 3600
    assert 23.9 < age_h < 24.1
    status, problem, _ = await api.call("GET", "/v1/audit?since=soon", role="auditor")
    assert status == 400 and "24h" in problem["detail"] and "ISO 8601" in problem["detail"]


# -- tables and JSON lines -----------------------------------------------------------------


def test_optout_get_prints_the_same_json_bytes_when_not_a_terminal(cfg: Path) -> None:
    run("optout", "add", "--category", "marketing", "pat@example.org", "--config", str(cfg))
    got = run("optout", "get", "--channel", "email", "pat@example.org", "--config", str(cfg))
    state = orjson.loads(got.stdout)
    expected = (
        '{"channel":"email","all":false,"categories":["marketing"],'
        f'"updated_at":"{state["updated_at"]}","source":"cli"}}\n'
    )
    assert got.stdout == expected


def test_a_terminal_gets_a_table_and_json_when_asked(cfg: Path) -> None:
    run("optout", "add", "--category", "marketing", "pat@example.org", "--config", str(cfg))
    code, shown, _ = on_terminal("optout", "get", "pat@example.org", "--config", str(cfg))
    assert code == 0 and "┃" in shown and "marketing" in shown and "{" not in shown, shown
    code, shown, _ = on_terminal("--json", "optout", "get", "pat@example.org", "--config",
                                 str(cfg))  # fmt: skip
    assert code == 0 and orjson.loads(shown.strip())["categories"] == ["marketing"]
    code, shown, _ = on_terminal("keys", "api-key", "list", "--config", str(cfg))
    assert code == 0 and "created" in shown and "┃" in shown


def test_import_shows_progress_on_a_terminal_and_keeps_stdout_json(
    tmp_path: Path, cfg: Path
) -> None:
    lines = tmp_path / "in.ndjson"
    lines.write_text(
        "".join(
            orjson.dumps({"channel": "email", "address": f"p{i}@example.org", "all": True}).decode()
            + "\n"
            for i in range(2000)
        )
    )
    code, shown, piped = on_terminal(
        "optout", "import", str(lines), "--config", str(cfg), stdout_tty=False
    )
    assert code == 0, shown
    assert "importing" in shown and "%" in shown  # the bar, on stderr
    assert orjson.loads(piped)["applied"] == 2000  # stdout: the summary alone
    plain = run("optout", "export", "--config", str(cfg))
    assert plain.returncode == 0 and "exporting" not in plain.stderr  # no bar off a terminal
    code, shown, piped = on_terminal("optout", "export", "--config", str(cfg), stdout_tty=False)
    assert code == 0 and "exporting" in shown and piped.count("\n") == 2000
    code, shown, piped = on_terminal(
        "optout", "rebuild", "--from-audit", "--config", str(cfg), stdout_tty=False
    )
    assert code == 0 and "replaying" in shown, shown
    assert orjson.loads(piped)["optouts"] == 2000 and '"progress"' not in shown


# -- errors that name the value and the nearest valid one ----------------------------------


@pytest.mark.parametrize(
    ("args", "named", "suggested"),
    [
        (("servee",), "'servee'", "did you mean 'serve'?"),
        (("optout", "add", "--channel", "emial", "--all", "a@example.org"), "'emial'",
         "did you mean 'email'?"),
        (("audit", "search", "--decision", "supress"), "'supress'", "did you mean 'suppress'?"),
        (("optout", "add", "--category", "marketting", "a@example.org"), "'marketting'",
         "did you mean 'marketing'?"),
    ],
    ids=["unknown_subcommand", "channel_choice", "decision_choice", "category"],
)  # fmt: skip
def test_an_error_names_the_value_and_the_nearest_valid_one(
    cfg: Path, args: tuple[str, ...], named: str, suggested: str
) -> None:
    got = run(*args, "--config", str(cfg))
    assert got.returncode == 2
    assert named in got.stderr and suggested in got.stderr, got.stderr
    assert "a@example.org" not in got.stderr and "Traceback" not in got.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("optout", "pat@example.org"),
        ("optout", "+15552010173"),
        ("optout", "get", "pat@example.org", "extra@example.org"),
        ("optout", "add", "--channel", "sms", "--category", "pat@example.org", "+15552010173"),
    ],
    ids=["address_as_subcommand", "number_as_subcommand", "address_as_extra_argument",
         "address_as_category"],
)  # fmt: skip
def test_an_error_never_echoes_an_address_or_number(cfg: Path, args: tuple[str, ...]) -> None:
    got = run(*args, "--config", str(cfg))
    assert got.returncode == 2, got.stderr
    for secret in ("pat@", "extra@", "2010173"):
        assert secret not in got.stderr, got.stderr


def test_a_number_without_its_area_code_gets_a_hint_not_an_echo(cfg: Path) -> None:
    got = run("optout", "add", "--all", "555-0173", "--config", str(cfg))
    assert got.returncode == 2
    assert "country or area code" in got.stderr and "default_region" in got.stderr
    assert "--region" in got.stderr and "0173" not in got.stderr
    with_region = run("optout", "get", "--region", "GB", "020 7946 0018", "--config", str(cfg))
    assert with_region.returncode == 0 and orjson.loads(with_region.stdout)["channel"] == "sms"


# -- help still works ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "group",
    ["", "serve", "optout", "audit", "keys", "store", "rules", "sync", "certs", "senders",
     "consent", "users"],
)
def test_help_works_for_every_group(group: str) -> None:
    got = run(*([group] if group else []), "--help")
    assert got.returncode == 0 and got.stdout.startswith("usage: optgate"), got.stderr
    assert "--config" in got.stdout or group == ""
