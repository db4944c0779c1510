"""Diagnostic logging: structlog key=value events on stderr. Never a body, password,
token or plaintext recipient (STYLE habit 7). Third-party loggers that would write
addresses or paths are raised above INFO here, in one place."""

from __future__ import annotations

import logging
import sys

import structlog

# aiosmtpd logs every command line, MAIL/RCPT addresses included, at INFO (threats.md S14),
# and a deprecation WARNING on every successful AUTH. aiohttp's access log writes request
# paths, which carry unsubscribe tokens (S17).
_PHI_LOGGERS = {"mail.log": logging.ERROR, "aiohttp.access": logging.WARNING}


def configure(level: int = logging.INFO) -> None:
    logging.basicConfig(stream=sys.stderr, level=level, format="%(message)s")
    silence_phi_loggers()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "event"]),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),  # one write per line
        cache_logger_on_first_use=True,
    )


def silence_phi_loggers() -> None:
    """For embedding (tests, other hosts) without taking over logging configuration."""
    for name, floor in _PHI_LOGGERS.items():
        logging.getLogger(name).setLevel(floor)
