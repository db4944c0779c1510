"""Schemathesis against `/openapi.json` of a running gateway: no 5xx, no undocumented status,
content type, header or body on the admin and health routes."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway import apikeys
from gateway.http import app as http_app
from gateway.http.sms import SHADOW_HEADER
from gateway.service import HTTP_MODULES
from tests.conftest import GatewayFactory, Running
from tests.support.sms_provider import sms_gateway
from tests.support.smtp_sink import TestPki

NUMBER = "+15550104444"

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
# The console script, else the module (a virtualenv made without the script still has it).
SCHEMATHESIS_CMD = (
    [str(SCHEMATHESIS)] if SCHEMATHESIS.exists() else [sys.executable, "-m", "schemathesis.cli"]
)
REPO = Path(__file__).resolve().parents[1]
# Every check but positive_data_acceptance: the API is deliberately stricter than JSON
# Schema can say (an address must canonicalise, a category must exist in the rules, a CSV
# needs its header), so a schema-valid request may rightly get a 400 problem document.
EXCLUDED_CHECKS = "positive_data_acceptance"
ROUTES = r"^/(v1/(optouts|audit|api-keys|consents)|healthz|readyz|metrics|openapi\.json)"


async def test_openapi_is_served_without_auth_and_names_every_route(gateway: Running) -> None:
    url = f"https://127.0.0.1:{gateway.gw.ports.http}/openapi.json"
    async with aiohttp.ClientSession() as s, s.get(url, ssl=gateway.client_context()) as r:
        assert r.status == 200
        doc = orjson.loads(await r.read())
    documented = {
        (method.upper(), path)
        for path, ops in doc["paths"].items()
        for method in ops
        if method != "parameters"
    }
    # The app every gateway serves, built from the same modules (not started).
    gw = gateway.gw
    deps = http_app.HttpDeps(
        cfg=gw.cfg, store=gw.store, audit=gw.audit, rules=lambda: gw.rules,
        keyring=lambda: gw.keyring, senders=None,
    )  # fmt: skip
    app = http_app.build_app(deps, [importlib.import_module(m).setup for m in HTTP_MODULES])
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    assert served and served <= documented, served - documented


async def test_shadow_answers_match_what_the_document_says(
    make_gateway: GatewayFactory, pki: TestPki, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shadow mode's additions, live, against the served document: `/readyz`'s `mode` and
    `warning`, the native send's `shadow` field and both sends' `Optgate-Shadow` header."""

    async def in_shadow(**overrides: Any) -> Running:
        overrides["gateway"] = {**overrides.get("gateway", {}), "mode": "shadow"}
        running: Running = await make_gateway(**overrides)
        return running

    async with sms_gateway(in_shadow, pki, monkeypatch) as g:
        r = g.running
        base = f"https://127.0.0.1:{r.gw.ports.http}"
        async with aiohttp.ClientSession() as s:
            async with s.get(base + "/openapi.json", ssl=r.client_context()) as resp:
                doc = orjson.loads(await resp.read())
            async with s.get(base + "/readyz", ssl=r.client_context()) as resp:
                ready = orjson.loads(await resp.read())
        readiness = doc["components"]["schemas"]["Readiness"]["properties"]
        assert set(ready) == set(readiness)  # status, checks, mode, warning: each described
        assert ready["mode"] in readiness["mode"]["enum"]
        assert isinstance(ready["warning"], str) and readiness["warning"]["type"] == "string"
        await g.opt_out(NUMBER, all=True)
        send = doc["paths"]["/v1/messages/sms"]["post"]["responses"]
        status, headers, sent = await g.post(
            "/v1/messages/sms", json={"to": NUMBER, "from": "+15005550006", "body": "Hi."}
        )
        assert status == 201 and sent["shadow"] == "suppress"
        answer = send["201"]["content"]["application/json"]["schema"]["properties"]
        assert set(sent) == set(answer) and sent["shadow"] in answer["shadow"]["enum"]
        assert headers[SHADOW_HEADER] in send["201"]["headers"][SHADOW_HEADER]["schema"]["enum"]
        twilio = doc["paths"]["/2010-04-01/Accounts/{AccountSid}/Messages.json"]["post"]
        assert SHADOW_HEADER in twilio["responses"]["201"]["headers"]
        for kind in ("opted-out", "no-consent", "undeliverable"):
            assert f"urn:optgate:problem:{kind}" in send["422"]["description"]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("schemathesis") is None, reason="schemathesis is not installed"
)
async def test_schemathesis_finds_no_server_error_or_schema_violation(
    gateway: Running, tmp_path: Path
) -> None:
    gw = gateway.gw
    assert gw.store is not None
    made = await apikeys.create(gw.store, gw.keyring, role="admin", now=time.time())
    base = f"https://127.0.0.1:{gw.ports.http}"
    proc = await asyncio.create_subprocess_exec(
        *SCHEMATHESIS_CMD, "run", f"{base}/openapi.json",
        "--tls-verify", str(gateway.pki.ca_pem),
        "-H", f"Authorization: Bearer {made.key}",
        "--checks", "all", "--exclude-checks", EXCLUDED_CHECKS,
        "--max-examples", "20", "--workers", "1", "--no-color",
        "--include-path-regex", ROUTES,
        "--generation-database", "none",
        "--seed", os.environ.get("OPTGATE_SCHEMATHESIS_SEED", "20261123"),
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": "tests.support.st_hooks", "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=300)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "passed" in text and "failures" not in text.lower().split("summary")[-1], text
