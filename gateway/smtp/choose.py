"""Which email upstream a config names: the file outbox (`[gateway] outbox_dir`, for
tests and dry runs) or the provider over SMTP (`[upstream.email]`)."""

from __future__ import annotations

import os

from gateway.config import Config
from gateway.errors import ConfigError
from gateway.smtp.outbox import OutboxUpstream
from gateway.smtp.transport import Upstream
from gateway.smtp.upstream import SmtpUpstream


def from_config(cfg: Config) -> Upstream:
    """The upstream `cfg` names; ConfigError when its password variable is not set."""
    if cfg.outbox_dir is not None:
        return OutboxUpstream(cfg.outbox_dir, retention=cfg.email_outbox_retention)
    env = cfg.upstream_email.password_env
    if env and env not in os.environ:
        raise ConfigError(f"[upstream.email] password_env: {env} is not set")
    password = os.environ[env] if env else ""
    return SmtpUpstream(
        url=cfg.upstream_email.url,
        username=cfg.upstream_email.username,
        password=password,
        ca_file=cfg.upstream_email.ca_file,
        pool_size=cfg.upstream_email.pool_size,
        timeout_s=cfg.upstream_email.timeout_s,
        local_hostname=cfg.gateway.hostname,
    )
