"""Diagnostic logging: structlog key/value events on stderr, one line each, in the format
`[log] format` names (docs/configuration.md):

- `console`: structlog's ConsoleRenderer, `TIMESTAMP [level] event='name' key=value ...`
  (the event keeps its `event=` key, so `grep "event='listening'"` works on either form);
- `json`: structlog's JSONRenderer, one object per line with `timestamp`, `level`, `event`.

Lines from the standard library's loggers (aiohttp's server errors, the HTTPS access lines
of `gateway.http.app`) go through the same renderer; an access line becomes the event
`http_access` with `method`, `route` (the route template, never the path: paths carry
unsubscribe tokens and, on admin routes, addresses), `status`, `bytes` and `ms`.

One SMTP transaction or SMS request binds its transaction id once (`transaction()`, through
structlog's contextvars): every event logged inside it, down to the upstream's, carries
`txn` without passing it by hand, and nothing logged after it does.

Never a body, password, token or plaintext recipient (STYLE habit 7): tracebacks are plain
(no local variables, which could hold any of those), and third-party loggers that would
write addresses or paths are raised above INFO here, in one place.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import structlog
from structlog.dev import Column, ConsoleRenderer, KeyValueColumnFormatter, LogLevelColumnFormatter
from structlog.typing import EventDict, Processor, WrappedLogger

# aiosmtpd logs every command line, MAIL/RCPT addresses included, at INFO,
# and a deprecation WARNING on every successful AUTH. aiohttp's access log writes request
# paths, which carry unsubscribe tokens.
_PHI_LOGGERS = {"mail.log": logging.ERROR, "aiohttp.access": logging.WARNING}
FORMATS = ("console", "json")
ACCESS_LOGGER = "optgate.access"  # gateway.http.app's access logger (route templates only)
ACCESS_FIELDS = ("method", "route", "status", "bytes", "ms")  # its five arguments, in order


def _kv(value_repr: Any, *, key: bool = True) -> KeyValueColumnFormatter:
    return KeyValueColumnFormatter(
        key_style="" if key else None, value_style="", reset_style="", value_repr=value_repr
    )


def console_renderer() -> ConsoleRenderer:
    """ConsoleRenderer without colour or locals: timestamp, level, then key='value' pairs in
    the order they were given, `event` first."""
    return ConsoleRenderer(
        sort_keys=False,
        exception_formatter=structlog.dev.plain_traceback,
        columns=[
            Column("", _kv(repr)),  # every other key
            Column("timestamp", _kv(str, key=False)),
            Column("level", LogLevelColumnFormatter({}, reset_style="")),
            Column("event", _kv(repr)),
        ],
    )


class _Switch:
    """The last processor of every chain: renders with whichever format was chosen last, so
    loggers structlog cached before the config was read follow a later `configure()`."""

    def __init__(self) -> None:
        self.renderer: Processor = console_renderer()
        self.json = False

    def set(self, fmt: str) -> None:
        self.json = fmt == "json"
        self.renderer = structlog.processors.JSONRenderer() if self.json else console_renderer()

    def __call__(self, logger: WrappedLogger, name: str, event_dict: EventDict) -> Any:
        if self.json:
            event_dict = structlog.processors.format_exc_info(logger, name, event_dict)
        return self.renderer(logger, name, event_dict)


_RENDER = _Switch()


def _access_fields(logger: WrappedLogger, name: str, event_dict: EventDict) -> EventDict:
    """A standard-library access record as the structured event `http_access`."""
    args = event_dict.pop("positional_args", None)  # the record's arguments, for all
    record = event_dict.get("_record")
    named = getattr(record, "name", "") == ACCESS_LOGGER
    if named and isinstance(args, tuple) and len(args) == len(ACCESS_FIELDS):
        event_dict["event"] = "http_access"
        event_dict.update(zip(ACCESS_FIELDS, args, strict=True))
        event_dict["ms"] = round(float(event_dict["ms"]), 1)
    return event_dict


_SHARED: list[Processor] = [
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def configure(fmt: str = "console", level: int = logging.INFO) -> None:
    """Log to stderr in `fmt` ("console" or "json"); may be called again (e.g. once the
    config is read) and every logger follows."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}")
    _RENDER.set(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, _access_fields],
            pass_foreign_args=True,  # as `positional_args`, which `_access_fields` takes
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _RENDER],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    silence_phi_loggers()
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *_SHARED, _RENDER],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),  # one write per line
        cache_logger_on_first_use=True,
    )


def silence_phi_loggers() -> None:
    """For embedding (tests, other hosts) without taking over logging configuration."""
    for name, floor in _PHI_LOGGERS.items():
        logging.getLogger(name).setLevel(floor)


@contextlib.contextmanager
def transaction(txn: str) -> Iterator[None]:
    """Every structlog event logged inside carries ``txn=<txn>`` (`merge_contextvars`, first
    in every chain `configure()` builds), in this task and in tasks it starts; the binding is
    undone on the way out, so the next transaction on the same session starts clean."""
    with structlog.contextvars.bound_contextvars(txn=txn):
        yield
