"""CI smoke test of loadtests/locustfile.py: a few seconds of headless locust against a
real `optgate serve` with its default SMS upstream (the local SMS outbox), then the CSV must
show email delivered and suppressed, SMS sent and suppressed, and zero failures."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import APP_PASSWORD
from tests.support.processes import ServeProcess, opt_out, serve_gateway
from tests.support.smtp_sink import Sink, TestPki


def cfg_http_port(path: Path) -> int:
    return int(tomllib.loads(path.read_text())["http"]["listen"].rpartition(":")[2])


pytestmark = pytest.mark.slow
LOCUSTFILE = Path(__file__).resolve().parent.parent / "loadtests" / "locustfile.py"


async def test_locust_smoke_run_has_requests_and_no_failures(
    tmp_path: Path, pki: TestPki, sink: Sink, served: list[ServeProcess]
) -> None:
    locust = shutil.which("locust", path=str(Path(sys.executable).parent))
    if locust is None:
        pytest.skip("locust is not installed (pip install -e '.[test]' installs it)")
    gw, _ = await serve_gateway(tmp_path, pki, sink, served, instance="gw-l")
    port, cfg = gw.port, gw.config
    for n in range(5):  # a few opted-out recipients from the pool the locustfile draws on
        opt_out(cfg, f"optout-{n}@loadtest.invalid")
        opt_out(cfg, f"+1202555{n:04d}", channel="sms")  # the locustfile's opted-out numbers
    http_port = cfg_http_port(cfg)
    env = {
        **os.environ,
        "OPTGATE_HOST": "127.0.0.1",
        "OPTGATE_SMTP_PORT": str(port),
        "OPTGATE_SENDER": "app",
        "OPTGATE_PASSWORD": APP_PASSWORD,
        "OPTGATE_CA": str(pki.ca_pem),
        "OPTGATE_HTTP_PORT": str(http_port),
        "OPTGATE_SMS_WEIGHT": "1",  # the default SMS upstream: the local SMS outbox
        "OPTGATE_RECIPIENTS": "5",  # every optout-N of the pool is opted out above
        "OPTGATE_OPTED_OUT_SHARE": "0.3",
    }
    prefix = tmp_path / "out"
    cmd = [locust, "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4", "-t", "4s",
           "--csv", str(prefix), "--only-summary", "--exit-code-on-error", "1"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, output.decode()[-2000:]
    with (tmp_path / "out_stats.csv").open() as fh:
        rows = {row["Name"]: row for row in csv.DictReader(fh)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0
    # Told apart by the gateway's 250 text, not by what the locustfile meant to send.
    assert "smtp delivered" in rows and "smtp suppressed" in rows, sorted(rows)
    assert "smtp error" not in rows
    delivered = [r for m in sink.messages for r in m.rcpts]
    assert not [r for r in delivered if r.startswith("optout-")], "opted-out recipient sent to"
    # Locust's CSV covers its stats window; the sink saw at least every counted send.
    assert len(delivered) >= int(rows["smtp delivered"]["Request Count"]) > 0
    # SMS with defaults: every allowed text is a 201 from the outbox, every opted-out
    # number Twilio's 21610; none reached the outbox.
    assert int(rows["sms send"]["Request Count"]) > 0
    assert int(rows["sms suppressed"]["Request Count"]) > 0
    outbox = tmp_path / "var" / "sms-outbox"
    texts = [json.loads(p.read_bytes()) for p in outbox.glob("SM*.json")]
    assert len(texts) >= int(rows["sms send"]["Request Count"])
    assert not [t for t in texts if t["to"].startswith("+1202555")], "opted-out number sent to"
