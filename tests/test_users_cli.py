"""`optgate users add|list|disable|reset-totp` as an operator runs them: subprocesses on a
config with the embedded store (no server running), the password on stdin, the otpauth URI
once on stdout, a QR code only on a terminal, every change audited, and nothing secret in
clear on disk."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import orjson
import pyotp
import pytest

from tests.support.processes import optgate, write_config
from tests.test_cli_forms import audit_entries, on_terminal

PASSWORD = "correct horse battery staple"


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    doc = {"gateway": {"instance": "users", "data_dir": str(tmp_path / "var")}}
    return write_config(tmp_path / "optgate.toml", doc)


def secret_of(uri: str) -> str:
    parts = urlsplit(uri)
    assert parts.scheme == "otpauth" and parts.netloc == "totp", uri
    return parse_qs(parts.query)["secret"][0]


def listed(cfg: Path) -> list[dict[str, object]]:
    got = optgate("users", "list", config=cfg)
    assert got.returncode == 0, got.stderr
    return [orjson.loads(line) for line in got.stdout.splitlines()]


def test_add_prints_the_otpauth_uri_once_and_keeps_no_secret_in_clear(
    cfg: Path, tmp_path: Path
) -> None:
    got = optgate("users", "add", "alice", "--role", "admin", config=cfg, input=PASSWORD + "\n")
    assert got.returncode == 0, got.stderr
    lines = got.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("otpauth://totp/optgate:alice?"), got.stdout
    secret = secret_of(lines[0])
    totp = pyotp.TOTP(secret)
    assert (totp.digits, totp.interval, totp.digest().name) == (6, 30, "sha1")  # RFC 6238
    assert "not shown again" in got.stderr
    assert "\u2580" not in got.stdout + got.stderr  # no QR code: stdout is not a terminal

    rows = listed(cfg)
    assert [{k: r[k] for k in ("name", "role", "disabled")} for r in rows] == [
        {"name": "alice", "role": "admin", "disabled": False}
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(rows[0]["created"]))
    # At rest (the store's files, the audit log): neither the password nor the TOTP secret.
    for path in (tmp_path / "var").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert PASSWORD.encode() not in data, path
            assert secret.encode() not in data, path
    event = [e for e in audit_entries(tmp_path) if e["event"] == "console_access"]
    assert [(e["user"], e["action"], e["result"], e["by"]) for e in event] == [
        ("alice", "user.add", "ok", "cli")
    ]


def test_a_terminal_gets_a_qr_code_beside_the_uri(cfg: Path) -> None:
    code, shown, _ = on_terminal(
        "users", "add", "qr", "--role", "auditor", "--config", str(cfg),
        stdin=(PASSWORD + "\n" + PASSWORD + "\n").encode(),
    )  # fmt: skip
    assert code == 0, shown
    assert "otpauth://totp/optgate:qr?" in shown
    assert "\u2588" in shown or "\u2580" in shown  # the QR's block characters


@pytest.mark.parametrize(
    ("args", "stdin", "code", "says"),
    [
        (("add", "bob", "--role", "auditor"), "short\n", 2, "at least 12 characters"),
        (("add", "pat@example.org", "--role", "auditor"), PASSWORD + "\n", 2, "user name"),
        (("add", "bob", "--role", "root"), PASSWORD + "\n", 2, "invalid choice"),
        (("disable", "nobody"), "", 1, "no user 'nobody'"),
        (("reset-totp", "nobody"), "", 1, "no user 'nobody'"),
    ],
    ids=[
        "short_password_refused",
        "address_as_name_refused_unechoed",
        "unknown_role_refused",
        "disable_unknown_user",
        "reset_unknown_user",
    ],
)
def test_bad_requests_are_refused_and_change_nothing(
    cfg: Path, args: tuple[str, ...], stdin: str, code: int, says: str
) -> None:
    got = optgate("users", *args, config=cfg, input=stdin)
    assert got.returncode == code, got.stderr
    assert says in got.stderr
    assert "pat@example.org" not in got.stderr + got.stdout
    assert not (cfg.parent / "var" / "audit").exists() or not [
        e for e in audit_entries(cfg.parent) if e["event"] == "console_access"
    ]


def test_disable_and_reset_totp_are_audited_and_a_name_is_taken_once(
    cfg: Path, tmp_path: Path
) -> None:
    first = optgate("users", "add", "carol", "--role", "auditor", config=cfg, input=PASSWORD)
    assert first.returncode == 0, first.stderr
    again = optgate("users", "add", "carol", "--role", "admin", config=cfg, input=PASSWORD)
    assert again.returncode == 1 and "exists already" in again.stderr
    reset = optgate("users", "reset-totp", "carol", config=cfg)
    assert reset.returncode == 0, reset.stderr
    assert secret_of(reset.stdout.strip()) != secret_of(first.stdout.strip())
    off = optgate("users", "disable", "carol", config=cfg)
    assert off.returncode == 0, off.stderr
    assert [(r["name"], r["role"], r["disabled"]) for r in listed(cfg)] == [
        ("carol", "auditor", True)
    ]
    events = [e for e in audit_entries(tmp_path) if e["event"] == "console_access"]
    assert [(e["action"], e["user"], e["role"]) for e in events] == [
        ("user.add", "carol", "auditor"),
        ("user.reset_totp", "carol", "auditor"),
        ("user.disable", "carol", "auditor"),
    ]
    assert all(PASSWORD not in orjson.dumps(e).decode() for e in events)
