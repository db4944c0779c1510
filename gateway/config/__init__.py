"""Configuration: frozen dataclasses built from TOML and the environment, one per section.

Every key has a default that serves on one machine (docs/configuration.md lists them all,
generated from `sections.py` by `python -m gateway.config.reference`). Problems are
collected, not raised one at a time: `load()` raises one `ConfigError` naming all of them.
Secrets come from environment variables or files, never from the command line.
"""

from gateway.config.load import DEFAULT_CONFIG_NAME, Config, build, find_config_path, load
from gateway.config.schema import Listen, parse_listen
from gateway.config.sections import (
    AdminConfig,
    AuditConfig,
    DkimKey,
    GatewayConfig,
    HttpConfig,
    KeysConfig,
    LogConfig,
    RedisConfig,
    RulesConfig,
    Sender,
    SmsConfig,
    SmtpConfig,
    TlsConfig,
    UpstreamEmailConfig,
    UpstreamSmsConfig,
)

__all__ = [
    "DEFAULT_CONFIG_NAME",
    "AdminConfig",
    "AuditConfig",
    "Config",
    "DkimKey",
    "GatewayConfig",
    "HttpConfig",
    "KeysConfig",
    "Listen",
    "LogConfig",
    "RedisConfig",
    "RulesConfig",
    "Sender",
    "SmsConfig",
    "SmtpConfig",
    "TlsConfig",
    "UpstreamEmailConfig",
    "UpstreamSmsConfig",
    "build",
    "find_config_path",
    "load",
    "parse_listen",
]
