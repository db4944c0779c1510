"""`optgate serve` that cannot start: one line on stderr, ``optgate: error: <what> — <what
to do>`` naming the path, exit 2, no traceback, and nothing left running (no embedded
store under the data dir, no worker). Each case is run as a real subprocess, under the
supervisor (``--workers 2``) and as one process (``--workers 1``).

The machine's tests may run as root, for whom a folder's mode grants everything: an
"unwritable" folder is a path that goes through a regular file instead (ENOTDIR), which
no user can write either."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import _servers_under
from tests.support.processes import free_port, write_config

SERVE_TIMEOUT_S = 60  # a store that fails waits for the embedded server's own start-up


def _doc(tmp_path: Path) -> dict[str, dict[str, object]]:
    return {
        "gateway": {"instance": "t", "data_dir": str(tmp_path / "var")},
        "smtp": {"listen": f"127.0.0.1:{free_port()}", "listen_tls": f"127.0.0.1:{free_port()}"},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
    }


def _a_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("a file, not a folder\n")
    return path


def _data_dir(tmp_path: Path, doc: dict[str, dict[str, object]]) -> str:
    _a_file(tmp_path / "var")
    return f"data_dir {tmp_path / 'var'} cannot be used"


def _audit_dir(tmp_path: Path, doc: dict[str, dict[str, object]]) -> str:
    doc["audit"] = {"dir": str(_a_file(tmp_path / "f") / "audit")}
    return f"audit dir {tmp_path / 'f' / 'audit'} cannot be used"


def _store_folder(tmp_path: Path, doc: dict[str, dict[str, object]]) -> str:
    _a_file(tmp_path / "var" / "redis")
    return f"the embedded store's folder {tmp_path / 'var' / 'redis'} cannot be used"


def _tls_pair(tmp_path: Path, doc: dict[str, dict[str, object]]) -> str:
    folder = _a_file(tmp_path / "f")
    doc["tls"] = {"cert": str(folder / "server.pem"), "key": str(folder / "server.key")}
    return f"TLS certificate {folder / 'server.pem'} and key {folder / 'server.key'} are missing"


def _key_file(tmp_path: Path, doc: dict[str, dict[str, object]]) -> str:
    keys = tmp_path / "keys.json"
    keys.write_text("{not json")
    doc["keys"] = {"file": str(keys)}
    return f"key file {keys}: not JSON"


def _corrupt_aof(tmp_path: Path, doc: dict[str, dict[str, object]]) -> str:
    aof = tmp_path / "var" / "redis" / "appendonlydir"
    aof.mkdir(parents=True)
    (aof / "appendonly.aof.1.incr.aof").write_bytes(b"*2\r\n$3\r\nSET\r\nxx\r\n*1\r\n")
    (aof / "appendonly.aof.manifest").write_text(
        "file appendonly.aof.1.incr.aof seq 1 type i\n"
    )
    return f"the embedded store in {(tmp_path / 'var' / 'redis').resolve()} did not start"


def _port_in_use(tmp_path: Path, doc: dict[str, dict[str, object]]) -> str:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    _HELD.append(holder)
    port = holder.getsockname()[1]
    doc["smtp"]["listen"] = f"127.0.0.1:{port}"
    return f"127.0.0.1:{port} is already in use"


_HELD: list[socket.socket] = []
Case = Callable[[Path, dict[str, dict[str, object]]], str]
CASES: list[Case] = [
    _port_in_use, _data_dir, _audit_dir, _store_folder, _tls_pair, _key_file, _corrupt_aof
]  # fmt: skip
IDS = [
    "port_in_use",
    "unwritable_data_dir",
    "unwritable_audit_dir",
    "occupied_store_folder",
    "tls_pair_that_cannot_be_made",
    "key_file_that_is_not_json",
    "store_that_fails_to_start_on_a_corrupt_aof",
]


def _running_under(folder: Path) -> list[str]:
    """Command lines naming `folder`: a worker (its --config) or an embedded store."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(folder) in cmd:
                found.append(cmd)
    return found


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_start_up_failure_is_one_line_exit_2_and_leaves_nothing_running(
    tmp_path: Path, case: Case, workers: str
) -> None:
    doc = _doc(tmp_path)
    expected = case(tmp_path, doc)
    config = write_config(tmp_path / "optgate.toml", doc)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--workers", workers, "--config",
             str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, err = proc.communicate(timeout=SERVE_TIMEOUT_S)
    finally:
        while _HELD:
            _HELD.pop().close()
    errors = [line for line in err.splitlines() if line.startswith("optgate: error:")]
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "Traceback" not in out
    assert len(errors) == 1, err
    assert expected in errors[0], errors[0]
    if case is not _port_in_use:  # that line keeps its own form: what, and that it is taken
        assert " — " in errors[0], errors[0]
    assert "@" not in errors[0]
    assert not _servers_under(tmp_path), "an embedded store was left running"
    assert not _running_under(tmp_path), "a worker or store was left running"
