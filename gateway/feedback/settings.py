"""The `[feedback]` config section (docs/feedback.md, docs/configuration.md): where provider
feedback comes from and how long an undeliverable mark lasts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gateway.config.schema import setting

# Provider feedback (docs/feedback.md).
# A mailbox or number that failed hard rarely works again within a month; the providers keep
# their own hard-bounce suppressions longer (SES and SendGrid: until removed).
UNDELIVERABLE_DAYS = 30
# A signed report older than this is refused: SendGrid retries a failed POST for up to a day
# and SNS delivery policies retry for at most about an hour, so three days covers both; each
# event's dedupe key is kept a day longer, so a replay inside the window is a duplicate and
# one after it is stale.
FEEDBACK_MAX_AGE_S = 3 * 86400


@dataclass(frozen=True, slots=True, kw_only=True)
class FeedbackConfig:
    undeliverable_days: int = setting(
        UNDELIVERABLE_DAYS,
        "Days a hard bounce or an unreachable number (reported by a provider) suppresses"
        " every opt-outable category for that recipient (reason undeliverable; not an"
        " opt-out).",
        kind="int",
        minimum=1,
        maximum=3650,
    )
    sendgrid_public_key: str = setting(
        "",
        "The SendGrid Event Webhook verification key, base64 as SendGrid shows it;"
        ' "" = POST /feedback/sendgrid answers 404.',
        kind="str",
    )
    ses_topic_arns: tuple[str, ...] = setting(
        (),
        "SNS topics whose SES notifications are accepted at POST /feedback/ses; empty ="
        " SES feedback off (404).",
        kind="strings",
    )
    ses_cert_host: str = setting(
        "sns.*.amazonaws.com",
        "Where SNS signing certificates and subscription confirmations may be fetched from"
        ' (https only); "*" stands for exactly one DNS label.',
        kind="str",
    )
    ca_file: Path | None = setting(
        None,
        "Extra CA to verify the host SNS certificates are fetched from (system trust"
        " otherwise).",
        kind="path",
        default_doc="(none)",
    )
    max_age_s: int = setting(
        FEEDBACK_MAX_AGE_S,
        "Signed reports (SendGrid, SNS) older than this many seconds are refused (403);"
        " three days covers SendGrid's and SNS's retries. Each event is remembered a day"
        " longer, so a replay is refused either way.",
        kind="int",
        minimum=60,
        maximum=30 * 86400,
    )
