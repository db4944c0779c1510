"""The admin API against a real gateway (HTTPS, TLS 1.3, embedded Valkey, real audit log)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from gateway import apikeys
from gateway.audit.verify import verify_path
from gateway.core.records import pseudonym
from tests.conftest import Running

ROLES = ("preferences", "auditor", "admin")
ADDRESS = "Pat.Example+news@Clinic.Example"  # canonical: Pat.Example+news@clinic.example


class Api:
    """A small client for the gateway's admin API, one key per role."""

    def __init__(self, running: Running, session: aiohttp.ClientSession) -> None:
        self.running = running
        self.session = session
        self.base = f"https://127.0.0.1:{running.gw.ports.http}"
        self.keys: dict[str, str] = {}

    async def make_keys(self) -> None:
        gw = self.running.gw
        assert gw.store is not None
        for role in ROLES:
            made = await apikeys.create(gw.store, gw.keyring, role=role, now=time.time())
            self.keys[role] = made.key

    async def call(
        self,
        method: str,
        path: str,
        *,
        role: str | None = "admin",
        key: str | None = None,
        data: bytes | None = None,
        json: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        h = dict(headers or {})
        token = key if key is not None else (self.keys[role] if role else None)
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        if json is not None:
            data, h["Content-Type"] = orjson.dumps(json), "application/json"
        async with self.session.request(
            method, self.base + path, data=data, headers=h, ssl=self.running.client_context()
        ) as resp:
            raw = await resp.read()
            body: Any = raw
            if resp.content_type in ("application/json", "application/problem+json"):
                body = orjson.loads(raw)
            return resp.status, body, resp


@pytest.fixture
async def api(gateway: Running) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        client = Api(gateway, session)
        await client.make_keys()
        yield client


# -- roles: every route x every role ---------------------------------------------------

ROUTES: list[tuple[str, str, str, dict[str, Any]]] = [
    # method, path, role needed, request extras
    ("GET", "/v1/optouts/email/pat@example.org", "preferences", {}),
    ("PUT", "/v1/optouts/email/pat@example.org", "preferences", {"json": {"all": True}}),
    ("DELETE", "/v1/optouts/email/pat@example.org", "preferences", {}),
    (
        "POST",
        "/v1/optouts:import",
        "preferences",
        {
            "data": b'{"channel":"sms","address":"+15551230000","all":true}\n',
            "headers": {"Content-Type": "application/x-ndjson"},
        },
    ),
    ("GET", "/v1/optouts:export", "preferences", {}),
    ("GET", "/v1/audit?limit=5", "auditor", {}),
    ("GET", "/v1/api-keys", "admin", {}),
    ("POST", "/v1/api-keys", "admin", {"json": {"role": "auditor", "label": "t"}}),
    ("DELETE", "/v1/api-keys/0123456789abcdef", "admin", {}),
]


def expected(role: str | None, needed: str) -> str:
    if role is None or role == "bad":
        return "401"
    return "ok" if role in (needed, "admin") else "403"


async def test_role_checks_on_every_route(api: Api) -> None:
    table = []
    for method, path, needed, extra in ROUTES:
        for role in (None, "bad", *ROLES):
            key = None
            if role == "bad":
                # Well-formed, unknown; and a real key with one character changed.
                real = api.keys["admin"]
                key = real[:-1] + ("A" if real[-1] != "A" else "B")
            status, _, resp = await api.call(
                method, path, role=None if role in (None, "bad") else role, key=key, **extra
            )
            got = "401" if status == 401 else "403" if status == 403 else "ok"
            if got == "ok":
                assert status < 500 and status not in (401, 403), (method, path, role, status)
            if status in (401, 403):
                assert resp.content_type == "application/problem+json"
            if status == 401:
                assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            table.append((method, path, role, got, expected(role, needed)))
    wrong = [row for row in table if row[3] != row[4]]
    assert not wrong, wrong
    # Every denial is in the audit log, with the route template and never an address.
    denials = [e for e in api.running.audit_entries() if e["event"] == "auth_failure"]
    assert len(denials) == sum(1 for row in table if row[4] != "ok")
    assert {d["reason"] for d in denials} == {"missing", "bad key", "role"}
    assert all("@" not in orjson.dumps(d).decode() for d in denials)
    assert verify_path(api.running.cfg.audit.dir, api.running.gw.keyring).ok


async def test_a_revoked_or_promoted_key_stops_working(api: Api) -> None:
    status, made, _ = await api.call("POST", "/v1/api-keys", json={"role": "auditor"})
    assert status == 201 and made["key"].startswith("ogk_")
    assert (await api.call("GET", "/v1/audit", key=made["key"]))[0] == 200
    # Someone with write access to Redis promotes the key: it no longer verifies.
    gw = api.running.gw
    assert gw.store is not None
    raw = orjson.loads(await gw.store.client.get(f"og:ak:{made['id']}"))
    raw["role"] = "admin"
    await gw.store.client.set(f"og:ak:{made['id']}", orjson.dumps(raw))
    assert (await api.call("GET", "/v1/api-keys", key=made["key"]))[0] == 401
    raw["role"] = "auditor"
    await gw.store.client.set(f"og:ak:{made['id']}", orjson.dumps(raw))
    status, body, _ = await api.call("DELETE", f"/v1/api-keys/{made['id']}")
    assert status == 200 and body == {"id": made["id"], "revoked": True}
    assert (await api.call("GET", "/v1/audit", key=made["key"]))[0] == 401
    assert (await api.call("DELETE", f"/v1/api-keys/{made['id']}"))[0] == 404
    # The store holds no secret: only a keyed hash, the role and a label.
    listing = (await api.call("GET", "/v1/api-keys"))[1]["keys"]
    assert made["id"] not in {k["id"] for k in listing}
    dump = b"".join(
        [await gw.store.client.get(k) or b"" async for k in gw.store.client.scan_iter("og:ak:*")]
    )
    for key in api.keys.values():
        assert key.split("_", 2)[2].encode() not in dump  # the secret may contain "_" itself


# -- single opt-outs -----------------------------------------------------------------------


async def test_put_get_delete_round_trip_audited_with_key_id(api: Api) -> None:
    path = f"/v1/optouts/email/{ADDRESS}"
    status, body, _ = await api.call("GET", path, role="preferences")
    assert status == 200 and body["all"] is False and body["categories"] == []
    status, body, _ = await api.call(
        "PUT",
        path,
        role="preferences",
        json={"categories": ["marketing", "research"], "source": "crm"},
    )
    assert status == 200
    assert body["categories"] == ["marketing", "research"] and body["source"] == "crm"
    # The gateway now suppresses it: the SMTP path sees the same record.
    code, text = await api.running.send([ADDRESS], category="marketing")
    assert code == 250 and "suppressed" in text
    # PUT that removes one category and adds all: one write, an optout and an optin.
    status, body, _ = await api.call(
        "PUT", path, role="preferences", json={"categories": ["marketing"], "all": True}
    )
    assert body["all"] is True and body["categories"] == ["marketing"]
    status, body, _ = await api.call("DELETE", path, role="preferences")
    assert status == 200 and body["all"] is False and body["categories"] == []
    assert (await api.call("GET", path, role="preferences"))[1]["updated_at"] is None

    kid = apikeys.key_id_of(api.keys["preferences"])
    ring = api.running.gw.keyring
    pseud = pseudonym(ring, "email", "pat.example+news@clinic.example")
    changes = [e for e in api.running.audit_entries() if e["event"] in ("optout", "optin")]
    assert [(e["event"], e["categories"], e["all"]) for e in changes] == [
        ("optout", ["marketing", "research"], False),
        ("optout", [], True),
        ("optin", ["research"], False),
        ("optin", ["marketing"], True),
    ]
    assert all(e["key_id"] == kid and e["recipient"] == pseud for e in changes)
    reads = [e for e in api.running.audit_entries() if e["event"] == "admin_access"]
    assert reads and all(e["key_id"] == kid for e in reads)
    text = b"".join(p.read_bytes() for p in api.running.cfg.audit.dir.glob("*.jsonl"))
    assert b"clinic.example" not in text.lower()


@pytest.mark.parametrize(
    ("path", "body", "status", "detail"),
    [
        ("/v1/optouts/fax/pat@example.org", {"all": True}, 404, None),
        ("/v1/optouts/email/not-an-address", {"all": True}, 400, "not a valid email address"),
        ("/v1/optouts/sms/12", {"all": True}, 400, "not a valid phone number"),
        ("/v1/optouts/email/a@example.org", {"categories": ["nope"]}, 400, "unknown category"),
        (
            "/v1/optouts/email/a@example.org",
            {"categories": ["emergency-alert"]},
            400,
            "cannot be opted out",
        ),
        ("/v1/optouts/email/a@example.org", {"all": "yes"}, 400, "all must be"),
        (
            "/v1/optouts/email/a@example.org",
            {"all": True, "source": "pat@example.org"},
            400,
            "source",
        ),
        ("/v1/optouts/email/a@example.org", {"all": True, "extra": 1}, 400, "unknown member"),
        ("/v1/optouts/email/a@example.org", [1], 400, "JSON object"),
    ],
)
async def test_bad_input_is_a_problem_that_changes_nothing(
    api: Api, path: str, body: Any, status: int, detail: str | None
) -> None:
    got, problem, resp = await api.call("PUT", path, role="preferences", json=body)
    assert got == status and resp.content_type == "application/problem+json"
    if detail:
        assert detail in problem["detail"]
    assert "pat@" not in orjson.dumps(problem).decode()
    assert not [e for e in api.running.audit_entries() if e["event"] in ("optout", "optin")]


# -- import and export ---------------------------------------------------------------------


async def test_import_with_one_bad_line_applies_the_rest(api: Api) -> None:
    lines = [
        {"channel": "email", "address": "one@example.org", "categories": ["marketing"]},
        {"channel": "sms", "address": "+1 (555) 201-0001", "all": True, "source": "old-crm"},
        {"channel": "email", "address": "three@example.org", "categories": ["no-such-cat"]},
        {"channel": "email", "address": "four@example.org", "all": True},
    ]
    body = b"\n".join(orjson.dumps(x) for x in lines) + b"\nnot json\n\n"
    status, result, _ = await api.call(
        "POST",
        "/v1/optouts:import",
        role="preferences",
        data=body,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert status == 200, result
    assert result["applied"] == 3 and result["rejected"] == 2 and result["lines"] == 6
    assert [(e["line"], e["detail"].split(";")[0]) for e in result["errors"]] == [
        (3, "unknown category 'no-such-cat'"),  # named, with the known ones after the ';'
        (5, "not a JSON object"),
    ]
    gw = api.running.gw
    assert gw.store is not None
    ring = gw.keyring
    bad = pseudonym(ring, "email", "three@example.org")
    assert await gw.store.get("email", bad) is None  # nothing of the bad line was written
    sms = await gw.store.get("sms", pseudonym(ring, "sms", "+15552010001"))
    assert sms is not None and sms.all and sms.source == "old-crm"
    assert sms.address == "+15552010001"

    # CSV: header, then the same semantics; categories separated by ';'.
    csv_body = (
        b"\xef\xbb\xbfchannel,address,categories,all\n"
        b"email,five@example.org,marketing;research,false\n"
        b"email,six@example.org,,maybe\n"
        b"email,seven@example.org,,true\n"
    )
    status, result, _ = await api.call(
        "POST",
        "/v1/optouts:import",
        role="preferences",
        data=csv_body,
        headers={"Content-Type": "text/csv"},
    )
    assert status == 200
    assert (result["applied"], result["rejected"]) == (2, 1)
    assert result["errors"] == [
        {"line": 3, "title": "Invalid line", "detail": "all must be true or false"}
    ]

    # Import only adds: a line for an address already opted out of everything keeps it.
    status, result, _ = await api.call(
        "POST",
        "/v1/optouts:import",
        role="preferences",
        data=b'{"channel":"sms","address":"+15552010001","categories":["billing"]}\n',
        headers={"Content-Type": "application/x-ndjson"},
    )
    after = await gw.store.get("sms", pseudonym(ring, "sms", "+15552010001"))
    assert after is not None and after.all and after.categories == {"billing"}

    # Export returns everything, addresses decrypted, and re-imports cleanly.
    status, raw, resp = await api.call("GET", "/v1/optouts:export", role="preferences")
    assert status == 200 and resp.content_type == "application/x-ndjson"
    exported = [orjson.loads(x) for x in raw.splitlines()]
    addresses = sorted(e["address"] for e in exported)
    assert addresses == sorted(
        [
            "one@example.org",
            "+15552010001",
            "four@example.org",
            "five@example.org",
            "seven@example.org",
        ]
    )
    status, result, _ = await api.call(
        "POST",
        "/v1/optouts:import",
        role="preferences",
        data=raw,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert (status, result["applied"], result["rejected"]) == (200, 5, 0)
    status, raw_csv, resp = await api.call(
        "GET", "/v1/optouts:export?format=csv&channel=sms", role="preferences"
    )
    assert resp.content_type == "text/csv"
    assert raw_csv.splitlines()[0] == b"channel,address,recipient,all,categories,updated_at,source"
    assert raw_csv.splitlines()[1].startswith(b"sms,+15552010001,")
    entries = api.running.audit_entries()
    assert sum(1 for e in entries if e["event"] == "optout" and e.get("via") == "import") == 11
    assert [e["action"] for e in entries if e["event"] == "admin_access"][-2:] == [
        "optout.export",
        "optout.export_done",
    ]
    assert verify_path(api.running.cfg.audit.dir, ring).ok


async def test_import_refuses_other_media_and_long_lines(api: Api) -> None:
    status, problem, _ = await api.call(
        "POST",
        "/v1/optouts:import",
        role="preferences",
        data=b"x",
        headers={"Content-Type": "text/plain"},
    )
    assert status == 415
    long = b'{"channel":"email","address":"' + b"a" * 5000 + b'@example.org","all":true}\n'
    ok = b'{"channel":"email","address":"b@example.org","all":true}\n'
    status, result, _ = await api.call(
        "POST",
        "/v1/optouts:import",
        role="preferences",
        data=long + ok,
        headers={"Content-Type": "application/x-ndjson"},
    )
    assert (result["applied"], result["errors"][0]["line"]) == (1, 1)
    assert "longer than" in result["errors"][0]["detail"]
    status, problem, _ = await api.call(
        "POST",
        "/v1/optouts:import",
        role="preferences",
        data=b"email,x@example.org\n",
        headers={"Content-Type": "text/csv"},
    )
    assert status == 400 and "line 1" in problem["detail"]


# -- audit search --------------------------------------------------------------------------


async def test_audit_search_filters_and_pseudonymises_the_address(api: Api) -> None:
    await api.call(
        "PUT", "/v1/optouts/email/pat@example.org", role="preferences", json={"all": True}
    )
    await api.running.send(["pat@example.org", "kim@example.org"], category="marketing")
    status, page, _ = await api.call(
        "GET", "/v1/audit?recipient=PAT@example.org&decision=suppress", role="auditor"
    )
    assert status == 200 and page["count"] == 1 and not page["truncated"]
    (entry,) = page["entries"]
    assert entry["category"] == "marketing" and entry["sender"] == "app"
    status, page, _ = await api.call(
        "GET",
        "/v1/audit?event=decision&channel=email&category=marketing&sender=app&limit=1",
        role="auditor",
    )
    assert page["count"] == 1 and page["truncated"]
    status, page, _ = await api.call("GET", "/v1/audit?since=2999-01-01T00:00:00Z", role="auditor")
    assert page["count"] == 0
    status, _, _ = await api.call("GET", "/v1/audit?decision=maybe", role="auditor")
    assert status == 400
    searches = [e for e in api.running.audit_entries() if e.get("action") == "audit.search"]
    assert searches[0]["filters"]["recipient"] == pseudonym(
        api.running.gw.keyring, "email", "pat@example.org"
    )
    assert "pat@" not in orjson.dumps(searches).decode().lower()


async def test_admin_paths_never_reach_logs(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await api.call("PUT", "/v1/optouts/sms/+15557770000", role="preferences", json={"all": True})
    await api.call("GET", "/v1/optouts/email/secret.person@example.org", role="preferences")
    await api.call("GET", "/v1/audit?recipient=secret.person@example.org", role="auditor")
    text = caplog.text
    assert "/v1/optouts/{channel}/{address}" in text  # the access log names the template
    for canary in ("5557770000", "secret.person", "ogk_"):
        assert canary not in text


async def test_store_down_mid_import_reports_where_to_resume(
    make_gateway: Any, tmp_path: Any
) -> None:
    from tests.support.redis_servers import short_tempdir, start_standalone

    home = short_tempdir()
    server = start_standalone(home)
    try:
        running = await make_gateway(
            redis={"url": server.url, "timeout_ms": 200}, admin={"import_batch": 100}
        )
        async with aiohttp.ClientSession() as session:
            api = Api(running, session)
            await api.make_keys()
            lines = [
                orjson.dumps({"channel": "email", "address": f"p{n}@example.org", "all": True})
                + b"\n"
                for n in range(1, 1001)
            ]

            async def body() -> AsyncIterator[bytes]:
                yield b"".join(lines[:300])
                await asyncio.sleep(1.0)  # the first batches are written meanwhile
                server.pause()
                yield b"".join(lines[300:])

            status, problem, resp = await api.call(
                "POST",
                "/v1/optouts:import",
                role="preferences",
                data=body(),  # type: ignore[arg-type]
                headers={"Content-Type": "application/x-ndjson"},
            )
            server.resume()
            assert status == 503 and resp.headers["Retry-After"] == "1"
            assert problem["applied"] >= 300 and problem["applied"] % 100 == 0
            assert problem["resume_from_line"] == problem["applied"] + 1
            gw = running.gw
            assert gw.store is not None
            present = [
                await gw.store.get("email", pseudonym(gw.keyring, "email", f"p{n}@example.org"))
                for n in range(1, 1001)
            ]
            # Every line before the resume point is in; a record is whole or absent.
            assert all(r is not None and r.all for r in present[: problem["applied"]])
            assert all(r is None or r.all for r in present)
            # Re-sending from the resume line completes it.
            status, result, _ = await api.call(
                "POST",
                "/v1/optouts:import",
                role="preferences",
                data=b"".join(lines[problem["resume_from_line"] - 1 :]),
                headers={"Content-Type": "application/x-ndjson"},
            )
            assert status == 200 and result["rejected"] == 0
    finally:
        server.stop()


async def test_a_stalled_import_body_is_408_with_where_to_resume(
    make_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.http import admin_bulk

    monkeypatch.setattr(admin_bulk, "BODY_IDLE_S", 0.5)
    running = await make_gateway(admin={"import_batch": 100})
    lines = [
        orjson.dumps({"channel": "email", "address": f"s{n}@example.org", "all": True}) + b"\n"
        for n in range(1, 301)
    ]
    release = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b"".join(lines[:250])
        await release.wait()  # stalls: the gateway gives up first
        yield b"".join(lines[250:])

    async with aiohttp.ClientSession() as session:
        api = Api(running, session)
        await api.make_keys()
        started = time.monotonic()
        call = asyncio.create_task(
            api.call(
                "POST",
                "/v1/optouts:import",
                role="preferences",
                data=body(),  # type: ignore[arg-type]
                headers={"Content-Type": "application/x-ndjson"},
            )
        )
        done, _ = await asyncio.wait({call}, timeout=10)
        release.set()
        assert done, "the stalled import was never answered"
        status, problem, _ = call.result()
    assert status == 408 and time.monotonic() - started < 5
    assert problem["applied"] == 200  # two whole batches; the third was never complete
    assert problem["resume_from_line"] == 201
    gw = running.gw
    assert gw.store is not None
    first = await gw.store.get("email", pseudonym(gw.keyring, "email", "s1@example.org"))
    assert first is not None and first.all
