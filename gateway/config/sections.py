"""The config sections, one frozen dataclass per TOML table (docs/configuration.md).

Every key's default, meaning and checks are stated once, here, with `setting()`. Limits
carry their reason in the text, which is also what the generated reference shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config.schema import Listen, setting

# SMTP limits, each with its reason.
MAX_MESSAGE_BYTES = 26_214_400  # 25 MiB: below common provider caps (SES 40 MB, Gmail 25 MB)
MAX_RECIPIENTS = 100  # RFC 5321 §4.5.3.1.8 minimum a server must accept
IDLE_TIMEOUT_S = 300.0  # RFC 5321 §4.5.3.2.7 server timeout
SESSION_TIMEOUT_S = 900.0  # bounds a client that keeps a session alive with NOOPs
MAX_CONNECTIONS_PER_CLIENT = 50  # Postfix smtpd_client_connection_count_limit
# Failed logins per client address per 60 s before it is refused for 60 s; as Postfix's
# smtpd_client_auth_rate_limit, counted across SMTP, HTTP and every worker.
MAX_AUTH_FAILURES = 5
# HTTPS connections per client address: an application's pool is tens; a clinic's NAT may
# put many patients' browsers behind one address. 0 = no cap, for a gateway behind a proxy.
HTTP_MAX_CONNECTIONS_PER_CLIENT = 256
REDIS_TIMEOUT_MS = 250  # a lookup slower than this fails closed (451 4.3.0)
AUDIT_RETENTION_DAYS = 2190  # six years: HIPAA 45 CFR 164.316(b)(2)(i)
AUDIT_MAX_FILE_BYTES = 64 * 1024 * 1024  # a day of a busy gateway, still quick to verify
UPSTREAM_POOL_SIZE = 64  # see UpstreamEmailConfig.pool_size
IMPORT_BATCH = 500  # import lines per store round trip and audit fsync
# The outboxes stand in for a provider on a development or test machine: what is kept is
# for a person to look at, and a load test writes thousands a minute (121 MB of email in a
# minute of locust). Ten thousand messages is more than anyone reads back and, at a typical
# 2-20 KB per email, well under a gigabyte; a week covers a working week's debugging.
OUTBOX_KEEP = 10_000
OUTBOX_MAX_AGE_S = 7 * 24 * 3600.0


def _outbox_keep() -> Any:
    return setting(
        OUTBOX_KEEP,
        "With an outbox: keep at most this many messages, the newest (0 = no limit). Ten"
        " thousand is more than anyone reads back and bounds a load test's litter; checked"
        " about once a minute, so the folder may exceed it by a minute's messages.",
        kind="int",
        minimum=0,
    )


def _outbox_max_age() -> Any:
    return setting(
        OUTBOX_MAX_AGE_S,
        "With an outbox: remove messages older than this many seconds (0 = no limit); a"
        " week (604800) covers a working week's debugging.",
        kind="float",
        minimum=0,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    instance: str = setting(
        "gw-1",
        "Names this gateway in every audit entry and names its audit stream:"
        " 1-48 letters, digits, '.', '_' or '-'.",
        kind="str",
    )
    data_dir: Path = setting(
        Path("var"), "Embedded store, keys, audit log and outboxes live here.", kind="path"
    )
    public_url: str = setting(
        "https://127.0.0.1:8443", "Base of the one-click unsubscribe links.", kind="str"
    )
    unsubscribe_domain: str = setting(
        "unsubscribe.localhost",
        "Domain of the mailto unsubscribe address (unsubscribe+TOKEN@DOMAIN).",
        kind="str",
    )
    hostname: str = setting(
        "optgate.localhost", "The name the SMTP listeners greet with.", kind="str"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class KeysConfig:
    file: Path = setting(
        None,
        "The keys file (0600): pseudonym, record, token and audit keys. Shared by every"
        " instance on one store; mount it as a secret.",
        kind="path",
        default_doc="<data_dir>/keys.json",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TlsConfig:
    cert: Path = setting(
        Path("certs/server.pem"),
        "Server certificate chain (PEM); made with a development CA on first start when"
        " missing. TLS 1.3 is the minimum and is not configurable.",
        kind="path",
    )
    key: Path = setting(Path("certs/server.key"), "Server private key (PEM).", kind="path")
    client_ca: Path | None = setting(
        None,
        "When set, client certificates signed by this CA identify senders (client_cert_cn).",
        kind="path",
        default_doc="(none)",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SmtpConfig:
    listen: Listen = setting(
        Listen(host="127.0.0.1", port=2587), "STARTTLS submission listener.", kind="listen"
    )
    listen_tls: Listen = setting(
        Listen(host="127.0.0.1", port=2465), "Implicit-TLS listener (RFC 8314).", kind="listen"
    )
    max_message_bytes: int = setting(
        MAX_MESSAGE_BYTES,
        "DATA bytes after dot-unstuffing (552 5.3.4, also via MAIL SIZE=); 25 MiB is below"
        " common provider caps.",
        kind="int",
        minimum=1,
    )
    max_recipients: int = setting(
        MAX_RECIPIENTS,
        "RCPTs per message (452 4.5.3); RFC 5321 §4.5.3.1.8's minimum.",
        kind="int",
        minimum=1,
    )
    idle_timeout_s: float = setting(
        IDLE_TIMEOUT_S, "Seconds without a command (RFC 5321 §4.5.3.2.7).", kind="float",
        minimum=0.001,
    )  # fmt: skip
    session_timeout_s: float = setting(
        SESSION_TIMEOUT_S,
        "Seconds a session may last in all (bounds a client that NOOPs forever).",
        kind="float",
        minimum=0.001,
    )
    max_connections_per_client: int = setting(
        MAX_CONNECTIONS_PER_CLIENT,
        "Connections one client address may hold, across all workers (421 4.7.0); as"
        " Postfix's smtpd_client_connection_count_limit.",
        kind="int",
        minimum=1,
    )
    max_auth_failures: int = setting(
        MAX_AUTH_FAILURES,
        "Failed logins per client address within 60 s, across SMTP, HTTPS and all workers,"
        " before the address is refused for 60 s (421 4.7.0 / 429).",
        kind="int",
        minimum=1,
    )
    suppressed_reply: str = setting(
        "accept",
        "When every recipient was suppressed: 250 (accept) or 550 5.7.1 (reject).",
        kind="str",
        choices=("accept", "reject"),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpConfig:
    listen: Listen = setting(
        Listen(host="127.0.0.1", port=8443),
        "HTTPS listener: SMS API, unsubscribe, admin API, health, metrics.",
        kind="listen",
    )
    max_connections_per_client: int = setting(
        HTTP_MAX_CONNECTIONS_PER_CLIENT,
        "HTTPS connections per client address across all workers (503 beyond); 0 = no cap,"
        " for a gateway behind a proxy.",
        kind="int",
        minimum=0,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisConfig:
    url: str = setting(
        "",
        'The store: "" = an embedded Valkey under data_dir; redis://, rediss://,'
        " redis+cluster://, rediss+cluster:// or unix://.",
        kind="str",
    )
    timeout_ms: int = setting(
        REDIS_TIMEOUT_MS,
        "A lookup slower than this fails closed (451 4.3.0 / 503).",
        kind="int",
        minimum=1,
        maximum=60_000,
    )
    allow_plaintext: bool = setting(
        False,
        "Allow plaintext redis:// to a host other than loopback (use rediss:// instead).",
        kind="bool",
    )
    min_replicas_acked: int | None = setting(
        None,
        "An opt-out is acknowledged only once the primary has fsynced it and at least this"
        " many of its replicas have it (WAITAOF 1 N on Valkey/Redis 7.2+, else WAIT N);"
        " within the write budget, else the write fails (503) and the client retries. Unset:"
        " decided when the store is opened, from each primary's INFO replication"
        " connected_slaves: 1 when any primary has a replica connected, else 0 (the embedded"
        " store has none). A failover promotes a replica: with 0, an opt-out acknowledged"
        " just before the primary died can be missing on the new one.",
        kind="int",
        minimum=0,
        default_doc="1 when the store has replicas, else 0",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamEmailConfig:
    url: str = setting(
        "",
        "The email provider: outbox:DIR (a folder), smtp://HOST:PORT (STARTTLS) or"
        " smtps://HOST:PORT (implicit TLS).",
        kind="str",
        default_doc="outbox:<data_dir>/outbox",
    )
    username: str = setting("", "AUTH user at the provider.", kind="str")
    password_env: str = setting(
        "", "Environment variable holding the provider password.", kind="str"
    )
    ca_file: Path | None = setting(
        None, "Extra CA to verify the provider.", kind="path", default_doc="(none)"
    )
    pool_size: int = setting(
        UPSTREAM_POOL_SIZE,
        "Upstream sessions per worker at most; sessions are opened only for copies in flight"
        " and closed when idle, so this bounds a burst, not the idle cost. A provider 20 ms"
        " away takes about 2 round trips per pipelined copy: 64 sessions keep about 1,600"
        " copies/s per worker in flight, so distance costs latency, not capacity.",
        kind="int",
        minimum=1,
    )
    timeout_s: float = setting(
        30.0, "Seconds for one upstream command.", kind="float", minimum=0.001
    )
    outbox_keep: int = _outbox_keep()
    outbox_max_age_s: float = _outbox_max_age()


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamSmsConfig:
    url: str = setting(
        "",
        "The SMS provider: outbox:DIR (a local SMS outbox: each accepted text is written"
        " there as one JSON file and answered with a Twilio-shaped 201) or a Twilio-compatible"
        ' base URL, https:// (e.g. https://api.twilio.com). An explicit url = "" means no'
        " provider: every send is answered 503 (No SMS provider is configured).",
        kind="str",
        default_doc="outbox:<data_dir>/sms-outbox",
    )
    account_sid: str = setting(
        "", "The provider account (required with an https:// url).", kind="str"
    )
    auth_token_env: str = setting(
        "",
        "Environment variable with the provider token; also the key inbound webhook"
        " signatures are checked with.",
        kind="str",
    )
    ca_file: Path | None = setting(
        None, "Extra CA to verify the provider.", kind="path", default_doc="(none)"
    )
    inbound_forward_url: str = setting(
        "", "Where inbound texts that are not keywords go (https://).", kind="str"
    )
    timeout_s: float = setting(10.0, "Seconds for one provider call.", kind="float", minimum=0.001)
    outbox_keep: int = _outbox_keep()
    outbox_max_age_s: float = _outbox_max_age()


@dataclass(frozen=True, slots=True, kw_only=True)
class SmsConfig:
    default_region: str = setting(
        "US", "Region for numbers written without a country code (E.164 otherwise).", kind="str"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditConfig:
    dir: Path = setting(
        None, "The audit log's folder.", kind="path", default_doc="<data_dir>/audit"
    )
    retention_days: int = setting(
        AUDIT_RETENTION_DAYS,
        "Days audit files are kept; six years is HIPAA 45 CFR 164.316(b)(2)(i).",
        kind="int",
        minimum=1,
    )
    max_file_bytes: int = setting(
        AUDIT_MAX_FILE_BYTES,
        "An audit file is rotated at this size.",
        kind="int",
        minimum=4096,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    format: str = setting(
        "console",
        "Diagnostic log lines on stderr, access lines included: console (readable key=value"
        " lines for a terminal) or json (one JSON object per line, with event, level,"
        " timestamp, for a log collector).",
        kind="str",
        choices=("console", "json"),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    import_batch: int = setting(
        IMPORT_BATCH,
        "Import lines per store round trip and audit fsync.",
        kind="int",
        minimum=1,
        maximum=10_000,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RulesConfig:
    dir: Path | None = setting(
        None,
        "The rules folder.",
        kind="path",
        default_doc="./rules when present, else the rules shipped in the package",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReviewConfig:
    audit_dirs: tuple[Path, ...] = setting(
        (),
        "Other gateways' audit folders (a fleet on a shared mount) that the review index"
        " reads too, so one console and `optgate audit search` cover them all; this"
        " gateway's own [audit] dir is always read (docs/audit-index.md).",
        kind="strings",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Sender:
    name: str = setting("", "The sender's name: its AUTH user and Twilio AccountSid.", kind="str")
    password_env: str = setting("", "Environment variable with its password.", kind="str")
    password_hash: str = setting(
        "", "Its password as scrypt$... (optgate senders hash-password).", kind="str"
    )
    password_file: str = setting("", "A file holding its password.", kind="str")
    channels: tuple[str, ...] = setting(("email", "sms"), "Channels it may use.", kind="strings")
    default_category: str = setting(
        "", "Category when a message names none; must be within its grants.", kind="str"
    )
    client_cert_cn: str = setting(
        "", "With [tls] client_ca: this certificate subject is this sender.", kind="str"
    )
    categories: tuple[str, ...] | None = setting(
        None,
        "Category grants: the categories it may use. An opt_out = false category (it"
        " bypasses opt-outs) only when named here.",
        kind="strings",
        default_doc="every opt_out = true category",
    )
    from_domains: tuple[str, ...] = setting(
        (),
        "Header From domains it may send with (IDNA; a subdomain must be listed itself);"
        " DKIM signs only these.",
        kind="strings",
        default_doc="any",
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DkimKey:
    domain: str = setting("", "The signing domain (d=).", kind="str")
    selector: str = setting("", "The selector (s=).", kind="str")
    key_file: Path = setting(None, "RSA-2048 or Ed25519 private key (PEM).", kind="path")
