"""Build a `Config` from a TOML document: each section read by its dataclass, then the checks
that span keys (a URL's scheme, a secret's variable, defaults derived from `data_dir`).

Problems are collected, not raised one at a time: one `ConfigError` names all of them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.config.schema import read, unknown_key
from gateway.config.sections import (
    AdminConfig,
    AuditConfig,
    DkimKey,
    GatewayConfig,
    HttpConfig,
    KeysConfig,
    LogConfig,
    RedisConfig,
    ReviewConfig,
    RulesConfig,
    Sender,
    SmsConfig,
    SmtpConfig,
    TlsConfig,
    UpstreamEmailConfig,
    UpstreamSmsConfig,
)
from gateway.errors import ConfigError
from gateway.feedback.settings import FeedbackConfig
from gateway.outboxes import Retention
from gateway.sync.settings import SyncSettings
from gateway.sync.settings import parse as parse_sync

DEFAULT_CONFIG_NAME = "optgate.toml"
_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")
_SENDER_NAME = re.compile(r"[A-Za-z0-9_-]+")
REDIS_SCHEMES = ("", "redis", "rediss", "redis+cluster", "rediss+cluster", "unix")

# TOML table -> its section class; the order is the reference's order.
SECTIONS: dict[str, type] = {
    "gateway": GatewayConfig,
    "keys": KeysConfig,
    "tls": TlsConfig,
    "smtp": SmtpConfig,
    "http": HttpConfig,
    "redis": RedisConfig,
    "upstream.email": UpstreamEmailConfig,
    "upstream.sms": UpstreamSmsConfig,
    "sms": SmsConfig,
    "audit": AuditConfig,
    "log": LogConfig,
    "admin": AdminConfig,
    "rules": RulesConfig,
    "review": ReviewConfig,
    "feedback": FeedbackConfig,
}
ARRAYS: dict[str, type] = {"senders": Sender, "dkim": DkimKey}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    path: Path | None
    base_dir: Path
    gateway: GatewayConfig
    keys: KeysConfig
    tls: TlsConfig
    smtp: SmtpConfig
    http: HttpConfig
    redis: RedisConfig
    upstream_email: UpstreamEmailConfig
    upstream_sms: UpstreamSmsConfig
    sms: SmsConfig
    audit: AuditConfig
    admin: AdminConfig
    rules: RulesConfig
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    review: ReviewConfig = dataclasses.field(default_factory=ReviewConfig)
    feedback: FeedbackConfig = dataclasses.field(default_factory=FeedbackConfig)
    senders: tuple[Sender, ...] = ()
    dkim: tuple[DkimKey, ...] = ()
    sync: SyncSettings = dataclasses.field(default_factory=SyncSettings)

    @property
    def outbox_dir(self) -> Path | None:
        if self.upstream_email.url.startswith("outbox:"):
            return self.resolve(self.upstream_email.url.removeprefix("outbox:"))
        return None

    @property
    def email_outbox_retention(self) -> Retention:
        return Retention.of(self.upstream_email, companions=(".eml",))

    @property
    def sms_outbox_retention(self) -> Retention:
        return Retention.of(self.upstream_sms)

    @property
    def sms_outbox_dir(self) -> Path | None:
        if self.upstream_sms.url.startswith("outbox:"):
            return self.resolve(self.upstream_sms.url.removeprefix("outbox:"))
        return None

    def resolve(self, p: str | Path) -> Path:
        path = Path(p)
        return path if path.is_absolute() else self.base_dir / path

    @property
    def dev_sender_secret(self) -> Path:
        return self.gateway.data_dir / "dev-sender.secret"


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
    p: list[str] = []

    def resolve(v: str) -> Path:
        q = Path(v)
        return q if q.is_absolute() else base_dir / q

    tables = _tables(doc, p)
    s: dict[str, Any] = {
        name.replace(".", "_"): read(cls, f"[{name}]", tables.get(name, {}), p, resolve)
        for name, cls in SECTIONS.items()
    }
    gw: GatewayConfig = s["gateway"]
    data_dir = gw.data_dir
    s["keys"] = _default(s["keys"], file=data_dir / "keys.json")
    s["audit"] = _default(s["audit"], dir=data_dir / "audit")
    s["review"] = dataclasses.replace(
        s["review"], audit_dirs=tuple(resolve(str(d)) for d in s["review"].audit_dirs)
    )
    s["upstream_email"] = _default(s["upstream_email"], url=f"outbox:{data_dir / 'outbox'}")
    sms_table = tables.get("upstream.sms", {})
    if not (isinstance(sms_table, dict) and "url" in sms_table):  # an explicit "" = none
        s["upstream_sms"] = _default(s["upstream_sms"], url=f"outbox:{data_dir / 'sms-outbox'}")
    if not _INSTANCE.fullmatch(gw.instance):
        p.append(
            "[gateway] instance must be 1-48 letters, digits, '.', '_' or '-'"
            " (it names the audit stream)"
        )
    s["gateway"] = dataclasses.replace(gw, public_url=gw.public_url.rstrip("/"))
    _check_redis(s["redis"], p)
    s["upstream_email"] = _check_upstream_email(s["upstream_email"], p, resolve)
    s["upstream_sms"] = _check_upstream_sms(s["upstream_sms"], p, resolve)
    _check_feedback(s["feedback"], p)
    senders = _array(doc, "senders", Sender, p, resolve)
    s["senders"] = tuple(_check_senders(senders, p))
    s["dkim"] = tuple(_check_dkim(_array(doc, "dkim", DkimKey, p, resolve), p))
    s["sync"] = parse_sync(doc.get("sync", {}), p, resolve)
    if p:
        where = f"config file {path}" if path else "built-in config"
        raise ConfigError([f"{where}: {problem}" for problem in p])
    return Config(path=path, base_dir=base_dir, **s)


def _tables(doc: dict[str, Any], p: list[str]) -> dict[str, Any]:
    """The document's tables by section name (`upstream.email` for [upstream.email])."""
    known = [*SECTIONS, *ARRAYS, "upstream", "sync"]
    tables: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "upstream":
            if not isinstance(value, dict):
                p.append("[upstream] must be a table")
                continue
            for sub, inner in value.items():
                if f"upstream.{sub}" in SECTIONS:
                    tables[f"upstream.{sub}"] = inner
                else:
                    p.append(f"[upstream] unknown table {sub!r}")
        elif key in SECTIONS:
            tables[key] = value
        elif key not in known:
            p.append(unknown_key("", key, known).replace("unknown key", "unknown table").strip())
    return tables


def _default(section: Any, **derived: Any) -> Any:
    """`section` with each of `derived` filled in where the file left it unset."""
    unset = {k: v for k, v in derived.items() if getattr(section, k) in (None, "")}
    return dataclasses.replace(section, **unset) if unset else section


def _array(
    doc: dict[str, Any], name: str, cls: type, p: list[str], resolve: Callable[[str], Path]
) -> list[Any]:
    items = doc.get(name, [])
    if not isinstance(items, list):
        p.append(f"[[{name}]] must be an array of tables")
        return []
    return [read(cls, f"[{name}[{i}]]", item, p, resolve) for i, item in enumerate(items)]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_redis(r: RedisConfig, p: list[str]) -> None:
    scheme = urlsplit(r.url).scheme if r.url else ""
    if scheme not in REDIS_SCHEMES:
        p.append(f"[redis] url: unsupported scheme {scheme!r}")
    plaintext = scheme in ("redis", "redis+cluster") and not r.allow_plaintext
    if plaintext and not _is_loopback(urlsplit(r.url).hostname or ""):
        p.append(
            "[redis] url: plaintext redis:// to a host other than loopback; use rediss://"
            " or set [redis] allow_plaintext = true"
        )


def _check_upstream_email(
    u: UpstreamEmailConfig, p: list[str], resolve: Callable[[str], Path]
) -> UpstreamEmailConfig:
    parts = urlsplit(u.url)
    if parts.scheme == "outbox":
        return dataclasses.replace(u, url=f"outbox:{resolve(u.url.removeprefix('outbox:'))}")
    if parts.scheme not in ("smtp", "smtps"):
        p.append(
            "[upstream.email] url: expected outbox:DIR, smtp://HOST:PORT or smtps://HOST:PORT,"
            f" got {u.url!r}"
        )
    elif not parts.hostname:
        p.append(f"[upstream.email] url: no host in {u.url!r}")
    return u


def _check_upstream_sms(
    u: UpstreamSmsConfig, p: list[str], resolve: Callable[[str], Path]
) -> UpstreamSmsConfig:
    if u.url.startswith("outbox:"):
        folder = u.url.removeprefix("outbox:")
        if not folder:
            p.append("[upstream.sms] url: outbox: needs a folder (outbox:DIR)")
        else:
            u = dataclasses.replace(u, url=f"outbox:{resolve(folder)}")
    else:
        u = dataclasses.replace(u, url=u.url.rstrip("/"))
        if u.url and urlsplit(u.url).scheme != "https":
            p.append("[upstream.sms] url must be outbox:DIR or https:// (TLS 1.3 only)")
    if u.url.startswith("https:") and not u.account_sid:
        p.append("[upstream.sms] account_sid is required when url is set")
    if u.auth_token_env and not os.environ.get(u.auth_token_env):
        p.append(f"[upstream.sms] environment variable {u.auth_token_env} is not set")
    if u.inbound_forward_url and urlsplit(u.inbound_forward_url).scheme != "https":
        p.append("[upstream.sms] inbound_forward_url must be https://")
    return u


_TOPIC_ARN = re.compile(r"arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}")
_HOST_LABEL = r"(?:\*|[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)"  # "*" = any one label
_HOST_PATTERN = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*")


def _check_feedback(f: FeedbackConfig, p: list[str]) -> None:
    from gateway.feedback.sendgrid import load_public_key

    if f.sendgrid_public_key:
        try:
            load_public_key(f.sendgrid_public_key)
        except ValueError as exc:
            p.append(f"[feedback] sendgrid_public_key: {exc}")
    bad = [i for i, arn in enumerate(f.ses_topic_arns) if not _TOPIC_ARN.fullmatch(arn)]
    if bad:
        p.append(f"[feedback] ses_topic_arns: entries {bad} are not SNS topic ARNs")
    if not _HOST_PATTERN.fullmatch(f.ses_cert_host) or f.ses_cert_host.count("*") > 1:
        p.append("[feedback] ses_cert_host: expected a host name, at most one label being *")


def _check_senders(senders: list[Sender], p: list[str]) -> list[Sender]:
    from gateway.core.addresses import domain_a_label

    out: list[Sender] = []
    names: set[str] = set()
    for i, s in enumerate(senders):
        where = f"senders[{i}]"
        if not _SENDER_NAME.fullmatch(s.name):
            p.append(f"{where}: name must be letters, digits, '-' or '_'")
            continue
        if s.name in names:
            p.append(f"{where}: duplicate sender name {s.name!r}")
        names.add(s.name)
        secrets = [k for k in ("password_env", "password_hash", "password_file") if getattr(s, k)]
        if len(secrets) > 1:
            p.append(f"{where}: give only one of password_env, password_hash, password_file")
        if not secrets and not s.client_cert_cn:
            p.append(f"{where}: needs password_env, password_hash, password_file or client_cert_cn")
        if s.password_env and s.password_env not in os.environ:
            p.append(f"{where}: environment variable {s.password_env} is not set")
        bad = [c for c in s.channels if c not in ("email", "sms")]
        if bad:
            p.append(f"{where}: unknown channels {bad}")
        if s.categories is not None and not all(s.categories):
            p.append(f"{where}: categories must be a list of category names")
        domains = [domain_a_label(d) for d in s.from_domains]
        if any(d is None for d in domains):
            p.append(f"{where}: from_domains has an entry that is not a valid domain")
        out.append(dataclasses.replace(s, from_domains=tuple(d for d in domains if d)))
    return out


def _check_dkim(keys: list[DkimKey], p: list[str]) -> list[DkimKey]:
    out: list[DkimKey] = []
    for i, d in enumerate(keys):
        missing = [k for k in ("domain", "selector", "key_file") if not getattr(d, k)]
        if missing:
            p.append(f"dkim[{i}]: missing {', '.join(missing)}")
            continue
        out.append(dataclasses.replace(d, domain=d.domain.lower()))
    return out
