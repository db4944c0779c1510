"""The local SMS outbox: a folder standing in for the SMS provider (the zero-setup default,
`[upstream.sms] url = "outbox:DIR"`).

Every text the gateway decided to send is written there as `<sid>.json`, durably (a
temporary name, fsync, rename, fsync of the folder: `gateway.outboxes.write_durably`), and
only then answered with what Twilio answers a send: `201` and a message resource whose
`sid` is `SM` + 32 hex digits, so applications using the `twilio` SDK work unchanged. An
opted-out number never gets here: the gateway answers it Twilio's 21610 itself. The file
holds what the provider would have been given (number, sender id, body, pass-through
parameters) and no more, as the email outbox does: it is the provider's side of the
boundary. The folder is bounded by `[upstream.sms] outbox_keep` and `outbox_max_age_s`.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import orjson
import structlog

from gateway.outboxes import MARK, NO_LIMIT, Pruner, Retention, clean_incomplete, write_durably
from gateway.sms.provider import Provider, ProviderError, Reply

log = structlog.get_logger("optgate.sms.outbox")

API_VERSION = "2010-04-01"
SID_PREFIX = "SM"  # Twilio's prefix for a Message resource
SID_HEX_BYTES = 16  # 32 hex digits after the prefix, as Twilio's SIDs
DEFAULT_ACCOUNT = "outbox"  # the resource's account_sid when [upstream.sms] names none
# Characters per segment (3GPP TS 23.038): 160 GSM-7 or 70 UCS-2 alone, 153 / 67 per part
# of a concatenated message (the rest is the user data header). ASCII stands in for GSM-7.
GSM_SINGLE, GSM_PART, UCS2_SINGLE, UCS2_PART = 160, 153, 70, 67


def new_sid() -> str:
    return SID_PREFIX + secrets.token_hex(SID_HEX_BYTES)


def segments(body: str) -> int:
    single, part = (GSM_SINGLE, GSM_PART) if body.isascii() else (UCS2_SINGLE, UCS2_PART)
    return 1 if len(body) <= single else math.ceil(len(body) / part)


class OutboxProvider(Provider):
    """A `Provider` whose sends are written to `directory` and answered as Twilio would."""

    def __init__(
        self, directory: Path, *, account_sid: str = "", retention: Retention = NO_LIMIT
    ) -> None:
        # Not the HTTPS provider's constructor: there is no client, URL or credential.
        self.directory = directory
        self.account_sid = account_sid or DEFAULT_ACCOUNT
        self.messages_url = f"outbox:{directory}"
        self.pruner = Pruner(directory, retention)
        removed = clean_incomplete(directory)
        if removed:
            log.info("outbox_litter_removed", files=removed)

    async def send(self, fields: Sequence[tuple[str, str]]) -> Reply:
        sid = new_sid()
        resource = self._resource(sid, fields)
        kept = {**resource, "params": _params(fields)}
        payload = orjson.dumps(kept)
        try:
            await asyncio.to_thread(self._write, f"{sid}{MARK}", payload)
        except OSError as exc:
            log.error("sms_outbox_write_failed", errno=exc.errno)
            raise ProviderError("outbox write failed", status=502, outcome="failed") from exc
        return Reply(status=201, body=orjson.dumps(resource), content_type="application/json")

    def _write(self, name: str, payload: bytes) -> None:
        write_durably(self.directory, name, payload)
        self.pruner.maybe_prune()

    def _resource(self, sid: str, fields: Sequence[tuple[str, str]]) -> dict[str, Any]:
        """Twilio's Message resource for a send just queued."""
        first = {k: v for k, v in reversed(fields)}  # the first value of each field
        body = first.get("Body", "")
        now = format_datetime(datetime.now(UTC))
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Messages/{sid}"
        return {
            "account_sid": self.account_sid,
            "api_version": API_VERSION,
            "body": body,
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": first.get("From"),
            "messaging_service_sid": first.get("MessagingServiceSid"),
            "num_media": str(sum(1 for k, _ in fields if k == "MediaUrl")),
            "num_segments": str(segments(body)),
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "subresource_uris": {"media": f"{uri}/Media.json"},
            "to": first.get("To", ""),
            "uri": f"{uri}.json",
        }


def _params(fields: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """The pass-through parameters (everything but To, From and Body), as given."""
    out: dict[str, list[str]] = {}
    for key, value in fields:
        if key not in ("To", "From", "Body"):
            out.setdefault(key, []).append(value)
    return out
