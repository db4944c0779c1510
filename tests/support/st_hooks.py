"""Schemathesis hooks (SCHEMATHESIS_HOOKS=tests.support.st_hooks): bodies for the bulk
import's media types, mixing valid records, invalid ones and junk lines."""

from __future__ import annotations

import orjson
import schemathesis
from hypothesis import strategies as st

_ADDRESSES = ["pat@example.org", "Kim+x@Example.ORG", "+15555550100", "0", "", "a@b", "@@"]
_CATEGORIES = ["marketing", "billing", "emergency-alert", "nope", ""]

_record = st.fixed_dictionaries(
    {"channel": st.sampled_from(["email", "sms", "fax"]), "address": st.sampled_from(_ADDRESSES)},
    optional={
        "categories": st.lists(st.sampled_from(_CATEGORIES), max_size=3),
        "all": st.one_of(st.booleans(), st.text(max_size=4)),
        "source": st.text(max_size=12),
    },
)
_junk = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" "))
_ndjson = st.lists(st.one_of(_record.map(orjson.dumps), _junk), max_size=8).map(
    lambda lines: b"\n".join(lines) + b"\n"
)


def _csv_line(r: dict[str, object]) -> bytes:
    cats = ";".join(str(c) for c in r.get("categories", []))  # type: ignore[attr-defined]
    return f"{r['channel']},{r['address']},{cats},{r.get('all', '')}".encode()


_csv = st.lists(st.one_of(_record.map(_csv_line), _junk), max_size=8).map(
    lambda lines: b"\n".join([b"channel,address,categories,all", *lines]) + b"\n"
)

schemathesis.openapi.media_type("application/x-ndjson", _ndjson)
schemathesis.openapi.media_type("text/csv", _csv)


@schemathesis.serializer("application/x-ndjson", "text/csv")
def _as_bytes(ctx: object, value: object) -> dict[str, bytes]:
    """The documented examples are strings; generated bodies are bytes already."""
    return {"data": value if isinstance(value, bytes) else str(value).encode()}
