"""Configuration: frozen dataclasses built from TOML and the environment.

Every key of SPEC §10 has a default that serves on one machine. Problems are collected,
not raised one at a time: `load()` raises one `ConfigError` naming all of them.
Secrets come from environment variables or files, never from the command line.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import ConfigError
from gateway.sync.settings import SyncSettings
from gateway.sync.settings import parse as parse_sync

DEFAULT_CONFIG_NAME = "optgate.toml"

# SMTP limits, each with its reason.
MAX_MESSAGE_BYTES = 26_214_400  # 25 MiB: below common provider caps (SES 40 MB, Gmail 25 MB)
MAX_RECIPIENTS = 100  # RFC 5321 §4.5.3.1.8 minimum a server must accept
IDLE_TIMEOUT_S = 300.0  # RFC 5321 §4.5.3.2.7 server timeout
SESSION_TIMEOUT_S = 900.0  # bounds a client that keeps a session alive with NOOPs
MAX_CONNECTIONS_PER_CLIENT = 50  # Postfix smtpd_client_connection_count_limit
# Failed logins per client address per 60 s before it is refused for 60 s (SPEC §3); as
# Postfix's smtpd_client_auth_rate_limit, counted across SMTP, HTTP and every worker.
MAX_AUTH_FAILURES = 5
# HTTPS connections per client address (threats.md A14): an application's pool is tens; a
# clinic's NAT may put many patients' browsers behind one address. 0 = no cap, for a
# gateway behind a proxy that is then its only client (cap at the proxy instead).
HTTP_MAX_CONNECTIONS_PER_CLIENT = 256
REDIS_TIMEOUT_MS = 250  # a lookup slower than this fails closed (451 4.3.0)
AUDIT_RETENTION_DAYS = 2190  # six years: HIPAA 45 CFR 164.316(b)(2)(i)
AUDIT_MAX_FILE_BYTES = 64 * 1024 * 1024  # a day of a busy gateway, still quick to verify
IMPORT_BATCH = 500  # import lines per store round trip and audit fsync


@dataclass(frozen=True, slots=True, kw_only=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Sender:
    name: str
    password_env: str = ""
    password_hash: str = ""
    password_file: str = ""
    channels: tuple[str, ...] = ("email", "sms")
    default_category: str = ""
    client_cert_cn: str = ""
    # Category grants (SPEC §3): None = every `opt_out = true` category; an `opt_out = false`
    # category (which bypasses opt-outs) is usable only when listed by name.
    categories: tuple[str, ...] | None = None
    # From binding: header From domains (IDNA A-labels) this sender may use; () = any.
    from_domains: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class DkimKey:
    domain: str
    selector: str
    key_file: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    path: Path | None
    base_dir: Path
    instance: str = "gw-1"
    data_dir: Path = Path("var")
    public_url: str = "https://127.0.0.1:8443"
    unsubscribe_domain: str = "unsubscribe.localhost"
    keys_file: Path = Path("var/keys.json")
    tls_cert: Path = Path("certs/server.pem")
    tls_key: Path = Path("certs/server.key")
    tls_client_ca: Path | None = None
    smtp_listen: Listen = field(default_factory=lambda: Listen(host="127.0.0.1", port=2587))
    smtp_listen_tls: Listen = field(default_factory=lambda: Listen(host="127.0.0.1", port=2465))
    smtp_hostname: str = "optgate.localhost"
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_recipients: int = MAX_RECIPIENTS
    idle_timeout_s: float = IDLE_TIMEOUT_S
    session_timeout_s: float = SESSION_TIMEOUT_S
    max_connections_per_client: int = MAX_CONNECTIONS_PER_CLIENT
    max_auth_failures: int = MAX_AUTH_FAILURES
    suppressed_reply: str = "accept"
    http_listen: Listen = field(default_factory=lambda: Listen(host="127.0.0.1", port=8443))
    http_max_connections_per_client: int = HTTP_MAX_CONNECTIONS_PER_CLIENT
    redis_url: str = ""
    redis_timeout_ms: int = REDIS_TIMEOUT_MS
    redis_allow_plaintext: bool = False
    upstream_email_url: str = "outbox:var/outbox"
    upstream_email_username: str = ""
    upstream_email_password_env: str = ""
    upstream_email_ca_file: Path | None = None
    upstream_email_pool_size: int = 8
    upstream_email_timeout_s: float = 30.0
    sms_default_region: str = "US"
    upstream_sms_url: str = ""
    upstream_sms_account_sid: str = ""
    upstream_sms_auth_token_env: str = ""
    upstream_sms_ca_file: Path | None = None
    upstream_sms_timeout_s: float = 10.0
    sms_inbound_forward_url: str = ""
    senders: tuple[Sender, ...] = ()
    audit_dir: Path = Path("var/audit")
    audit_retention_days: int = AUDIT_RETENTION_DAYS
    audit_max_file_bytes: int = AUDIT_MAX_FILE_BYTES
    import_batch: int = IMPORT_BATCH
    sync: SyncSettings = field(default_factory=SyncSettings)
    rules_dir: Path | None = None
    dkim: tuple[DkimKey, ...] = ()

    @property
    def outbox_dir(self) -> Path | None:
        if self.upstream_email_url.startswith("outbox:"):
            return self.resolve(self.upstream_email_url.removeprefix("outbox:"))
        return None

    def resolve(self, p: str | Path) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self.base_dir / path

    @property
    def dev_sender_secret(self) -> Path:
        return self.data_dir / "dev-sender.secret"


_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "gateway": {
        "instance": str,
        "data_dir": str,
        "public_url": str,
        "unsubscribe_domain": str,
        "hostname": str,
    },
    "keys": {"file": str},
    "tls": {"cert": str, "key": str, "client_ca": str},
    "smtp": {
        "listen": str,
        "listen_tls": str,
        "max_message_bytes": int,
        "max_recipients": int,
        "idle_timeout_s": (int, float),
        "session_timeout_s": (int, float),
        "max_connections_per_client": int,
        "max_auth_failures": int,
        "suppressed_reply": str,
    },
    "http": {"listen": str, "max_connections_per_client": int},
    "redis": {"url": str, "timeout_ms": int, "allow_plaintext": bool},
    "sms": {"default_region": str},
    "audit": {"dir": str, "retention_days": int, "max_file_bytes": int},
    "admin": {"import_batch": int},
    "rules": {"dir": str},
}
_UPSTREAM_EMAIL: dict[str, type | tuple[type, ...]] = {
    "url": str,
    "username": str,
    "password_env": str,
    "ca_file": str,
    "pool_size": int,
    "timeout_s": (int, float),
}
_UPSTREAM_SMS: dict[str, type | tuple[type, ...]] = {
    "url": str,
    "account_sid": str,
    "auth_token_env": str,
    "ca_file": str,
    "inbound_forward_url": str,
    "timeout_s": (int, float),
}
_SENDER: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "password_env": str,
    "password_hash": str,
    "password_file": str,
    "channels": list,
    "default_category": str,
    "client_cert_cn": str,
    "categories": list,
    "from_domains": list,
}
_DKIM: dict[str, type | tuple[type, ...]] = {"domain": str, "selector": str, "key_file": str}


class _Reader:
    """Type-checks a TOML document against the schema, collecting problems."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.problems: list[str] = []

    def table(
        self, name: str, schema: dict[str, type | tuple[type, ...]], value: Any
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.problems.append(f"[{name}] must be a table")
            return {}
        out: dict[str, Any] = {}
        for key, item in value.items():
            want = schema.get(key)
            if want is None:
                self.problems.append(f"[{name}] unknown key {key!r}")
            elif (isinstance(item, bool) and want is not bool) or not isinstance(item, want):
                names = want.__name__ if isinstance(want, type) else "number"
                self.problems.append(f"[{name}] {key} must be of type {names}")
            else:
                out[key] = item
        return out


def parse_listen(value: str, where: str, problems: list[str]) -> Listen | None:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        problems.append(f"{where}: expected HOST:PORT, got {value!r}")
        return None
    return Listen(host=host.strip("[]") or "127.0.0.1", port=int(port))


def find_config_path(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    env = os.environ.get("OPTGATE_CONFIG")
    if env:
        return Path(env)
    default = Path(DEFAULT_CONFIG_NAME)
    return default if default.exists() else None


def load(explicit: str | None = None) -> Config:
    """Load the config named by `--config`, $OPTGATE_CONFIG, ./optgate.toml, or defaults."""
    path = find_config_path(explicit)
    if path is None:
        return build({}, path=None, base_dir=Path.cwd())
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    return build(doc, path=path, base_dir=path.resolve().parent)


def build(doc: dict[str, Any], *, path: Path | None, base_dir: Path) -> Config:
    r = _Reader(doc)
    p = r.problems
    t: dict[str, dict[str, Any]] = {}
    for name, schema in _SCHEMA.items():
        t[name] = r.table(name, schema, doc.get(name, {}))
    upstream = doc.get("upstream", {})
    if not isinstance(upstream, dict):
        p.append("[upstream] must be a table")
        upstream = {}
    for key in upstream:
        if key not in ("email", "sms"):
            p.append(f"[upstream] unknown table {key!r}")
    up_email = r.table("upstream.email", _UPSTREAM_EMAIL, upstream.get("email", {}))
    up_sms = r.table("upstream.sms", _UPSTREAM_SMS, upstream.get("sms", {}))
    known = {*_SCHEMA, "upstream", "senders", "dkim", "sync"}
    for key in doc:
        if key not in known:
            p.append(f"unknown table [{key}]")

    def resolve(v: str) -> Path:
        q = Path(v)
        return q if q.is_absolute() else base_dir / q

    gw, smtp, redis, tls = t["gateway"], t["smtp"], t["redis"], t["tls"]
    data_dir = resolve(gw.get("data_dir", "var"))
    values: dict[str, Any] = {
        "instance": gw.get("instance", "gw-1"),
        "data_dir": data_dir,
        "public_url": gw.get("public_url", "https://127.0.0.1:8443").rstrip("/"),
        "unsubscribe_domain": gw.get("unsubscribe_domain", "unsubscribe.localhost"),
        "smtp_hostname": gw.get("hostname", "optgate.localhost"),
        "keys_file": resolve(t["keys"]["file"]) if "file" in t["keys"] else data_dir / "keys.json",
        "tls_cert": resolve(tls.get("cert", "certs/server.pem")),
        "tls_key": resolve(tls.get("key", "certs/server.key")),
        "tls_client_ca": resolve(tls["client_ca"]) if tls.get("client_ca") else None,
        "audit_dir": resolve(t["audit"]["dir"]) if "dir" in t["audit"] else data_dir / "audit",
        "redis_url": redis.get("url", ""),
        "redis_timeout_ms": redis.get("timeout_ms", REDIS_TIMEOUT_MS),
        "sms_default_region": t["sms"].get("default_region", "US"),
        "upstream_email_url": up_email.get("url", f"outbox:{data_dir / 'outbox'}"),
        "upstream_email_username": up_email.get("username", ""),
        "upstream_email_password_env": up_email.get("password_env", ""),
        "upstream_email_ca_file": resolve(up_email["ca_file"]) if up_email.get("ca_file") else None,
        "upstream_email_pool_size": up_email.get("pool_size", 8),
        "upstream_email_timeout_s": float(up_email.get("timeout_s", 30.0)),
    }
    values["upstream_sms_url"] = up_sms.get("url", "").rstrip("/")
    values["upstream_sms_account_sid"] = up_sms.get("account_sid", "")
    values["upstream_sms_auth_token_env"] = up_sms.get("auth_token_env", "")
    values["upstream_sms_ca_file"] = resolve(up_sms["ca_file"]) if up_sms.get("ca_file") else None
    values["upstream_sms_timeout_s"] = float(up_sms.get("timeout_s", 10.0))
    values["sms_inbound_forward_url"] = up_sms.get("inbound_forward_url", "")
    if values["upstream_sms_url"] and urlsplit(values["upstream_sms_url"]).scheme != "https":
        p.append("[upstream.sms] url must be https:// (TLS 1.3 only)")
    if values["upstream_sms_url"] and not values["upstream_sms_account_sid"]:
        p.append("[upstream.sms] account_sid is required when url is set")
    token_env = values["upstream_sms_auth_token_env"]
    if token_env and not os.environ.get(token_env):
        p.append(f"[upstream.sms] environment variable {token_env} is not set")
    fwd = values["sms_inbound_forward_url"]
    if fwd and urlsplit(fwd).scheme != "https":
        p.append("[upstream.sms] inbound_forward_url must be https://")
    if "dir" in t["rules"]:
        values["rules_dir"] = resolve(t["rules"]["dir"])
    for key, default in (
        ("max_message_bytes", MAX_MESSAGE_BYTES),
        ("max_recipients", MAX_RECIPIENTS),
        ("max_connections_per_client", MAX_CONNECTIONS_PER_CLIENT),
        ("max_auth_failures", MAX_AUTH_FAILURES),
    ):
        values[key] = smtp.get(key, default)
        if values[key] < 1:
            p.append(f"[smtp] {key} must be at least 1")
    for key, fdefault in (
        ("idle_timeout_s", IDLE_TIMEOUT_S),
        ("session_timeout_s", SESSION_TIMEOUT_S),
    ):
        values[key] = float(smtp.get(key, fdefault))
        if values[key] <= 0:
            p.append(f"[smtp] {key} must be positive")
    cap = t["http"].get("max_connections_per_client", HTTP_MAX_CONNECTIONS_PER_CLIENT)
    values["http_max_connections_per_client"] = cap
    if cap < 0:
        p.append("[http] max_connections_per_client must be 0 (no cap) or more")
    values["suppressed_reply"] = smtp.get("suppressed_reply", "accept")
    if values["suppressed_reply"] not in ("accept", "reject"):
        p.append('[smtp] suppressed_reply must be "accept" or "reject"')
    for key, where, default in (
        ("smtp_listen", "[smtp] listen", smtp.get("listen", "127.0.0.1:2587")),
        ("smtp_listen_tls", "[smtp] listen_tls", smtp.get("listen_tls", "127.0.0.1:2465")),
        ("http_listen", "[http] listen", t["http"].get("listen", "127.0.0.1:8443")),
    ):
        parsed = parse_listen(default, where, p)
        if parsed is not None:
            values[key] = parsed
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}", values["instance"]):
        p.append(
            "[gateway] instance must be 1-48 letters, digits, '.', '_' or '-'"
            " (it names the audit stream)"
        )
    if not 1 <= values["redis_timeout_ms"] <= 60_000:
        p.append("[redis] timeout_ms must be between 1 and 60000")
    scheme = urlsplit(values["redis_url"]).scheme if values["redis_url"] else ""
    if scheme not in ("", "redis", "rediss", "redis+cluster", "rediss+cluster", "unix"):
        p.append(f"[redis] url: unsupported scheme {scheme!r}")
    values["redis_allow_plaintext"] = redis.get("allow_plaintext", False)
    if scheme in ("redis", "redis+cluster") and not values["redis_allow_plaintext"]:
        host = urlsplit(values["redis_url"]).hostname or ""
        if not _is_loopback(host):
            p.append(
                "[redis] url: plaintext redis:// to a host other than loopback; use rediss://"
                " or set [redis] allow_plaintext = true"
            )
    up_url = values["upstream_email_url"]
    up_scheme = urlsplit(up_url).scheme
    if up_scheme == "outbox":
        values["upstream_email_url"] = f"outbox:{resolve(up_url.removeprefix('outbox:'))}"
    elif up_scheme not in ("smtp", "smtps"):
        p.append(
            "[upstream.email] url: expected outbox:DIR, smtp://HOST:PORT or smtps://HOST:PORT,"
            f" got {up_url!r}"
        )
    elif not urlsplit(up_url).hostname:
        p.append(f"[upstream.email] url: no host in {up_url!r}")
    if values["upstream_email_pool_size"] < 1:
        p.append("[upstream.email] pool_size must be at least 1")
    values["senders"] = tuple(_senders(doc.get("senders", []), p))
    values["dkim"] = tuple(_dkim(doc.get("dkim", []), p, resolve))
    values["sync"] = parse_sync(doc.get("sync", {}), p, resolve)
    for key, conf_key, floor, default in (
        ("audit_retention_days", "retention_days", 1, AUDIT_RETENTION_DAYS),
        ("audit_max_file_bytes", "max_file_bytes", 4096, AUDIT_MAX_FILE_BYTES),
    ):
        values[key] = t["audit"].get(conf_key, default)
        if values[key] < floor:
            p.append(f"[audit] {conf_key} must be at least {floor}")
    values["import_batch"] = t["admin"].get("import_batch", IMPORT_BATCH)
    if not 1 <= values["import_batch"] <= 10_000:
        p.append("[admin] import_batch must be between 1 and 10000")
    if p:
        where = f"config file {path}" if path else "built-in config"
        raise ConfigError([f"{where}: {problem}" for problem in p])
    return Config(path=path, base_dir=base_dir, **values)


def _senders(items: Any, p: list[str]) -> list[Sender]:
    if not isinstance(items, list):
        p.append("[[senders]] must be an array of tables")
        return []
    out: list[Sender] = []
    names: set[str] = set()
    for i, item in enumerate(items):
        where = f"senders[{i}]"
        sub = _Reader({})
        s = sub.table(where, _SENDER, item)
        p.extend(sub.problems)
        name = s.get("name", "")
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            p.append(f"{where}: name must be letters, digits, '-' or '_'")
            continue
        if name in names:
            p.append(f"{where}: duplicate sender name {name!r}")
        names.add(name)
        secrets = [k for k in ("password_env", "password_hash", "password_file") if s.get(k)]
        if len(secrets) > 1:
            p.append(f"{where}: give only one of password_env, password_hash, password_file")
        if not secrets and not s.get("client_cert_cn"):
            p.append(f"{where}: needs password_env, password_hash, password_file or client_cert_cn")
        if s.get("password_env") and s["password_env"] not in os.environ:
            p.append(f"{where}: environment variable {s['password_env']} is not set")
        grants = s.get("categories")
        if grants is not None and not all(isinstance(c, str) and c for c in grants):
            p.append(f"{where}: categories must be a list of category names")
            grants = None
        domains: list[str] = []
        for d in s.get("from_domains", []):
            a_label = _a_label(d) if isinstance(d, str) else None
            if a_label is None:
                p.append(f"{where}: from_domains has an entry that is not a valid domain")
            else:
                domains.append(a_label)
        channels = tuple(s.get("channels", ["email", "sms"]))
        bad = [c for c in channels if c not in ("email", "sms")]
        if bad:
            p.append(f"{where}: unknown channels {bad}")
        out.append(
            Sender(
                name=name,
                password_env=s.get("password_env", ""),
                password_hash=s.get("password_hash", ""),
                password_file=s.get("password_file", ""),
                channels=channels,
                default_category=s.get("default_category", ""),
                client_cert_cn=s.get("client_cert_cn", ""),
                categories=tuple(grants) if grants is not None else None,
                from_domains=tuple(domains),
            )
        )
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _a_label(domain: str) -> str | None:
    """A domain as its IDNA 2008 A-label form (UTS #46, non-transitional), or None."""
    from gateway.core.addresses import domain_a_label

    return domain_a_label(domain)


def _dkim(items: Any, p: list[str], resolve: Any) -> list[DkimKey]:
    if not isinstance(items, list):
        p.append("[[dkim]] must be an array of tables")
        return []
    out: list[DkimKey] = []
    for i, item in enumerate(items):
        sub = _Reader({})
        d = sub.table(f"dkim[{i}]", _DKIM, item)
        p.extend(sub.problems)
        missing = [k for k in ("domain", "selector", "key_file") if not d.get(k)]
        if missing:
            p.append(f"dkim[{i}]: missing {', '.join(missing)}")
            continue
        out.append(
            DkimKey(
                domain=d["domain"].lower(), selector=d["selector"], key_file=resolve(d["key_file"])
            )
        )
    return out
